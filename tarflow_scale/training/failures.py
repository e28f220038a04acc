"""Which training failures Ray retries, and what Ctrl-C does: a TorchTrainer with our failure policy and stop handler.

Ray Train V2 retries every worker-group failure up to `FailureConfig.max_failures`. A bad config, bad data, a
damaged checkpoint, diverged weights or a step that does not fit in GPU memory fail identically on every retry, so
retrying only wastes the cluster and buries the message: `RepeatableErrorPolicy` raises those at once and keeps
Ray's own accounting for the rest (process and node deaths, preemptions). Ray 2.60 has no public hook for a policy,
so `ReliableTorchTrainer` swaps it in at `_initialize_and_run_controller` (pinned by tests/test_reliability.py).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

import torch
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy
from ray.train.v2._internal.execution.failure_handling.failure_policy import FailureDecision
from ray.train.v2.api.exceptions import WorkerGroupError

from ..artifacts.weights import CheckpointError
from ..atomic import is_storage_error
from ..config import ConfigError, RunConfig
from ..config.memory import GIB, usable_bytes
from ..data import DataError
from .run_state import request_stop


class GPUOutOfMemoryError(RuntimeError):
    """A worker ran out of GPU memory: the same step at the same micro-batch would again, so it is not retried."""


def repeatable_errors() -> tuple[type[BaseException], ...]:
    from .trainer import NonFiniteLossError

    return (ConfigError, DataError, CheckpointError, NonFiniteLossError, torch.OutOfMemoryError)


def is_out_of_memory(error: BaseException) -> bool:
    """torch's OutOfMemoryError (torch.cuda.OutOfMemoryError is the same class), or its message where a wrapper
    lost the type."""
    return isinstance(error, torch.OutOfMemoryError) or "CUDA out of memory" in str(error)


def repeatable_failure(error: BaseException) -> BaseException | None:
    """The first worker error that would repeat on a retry, or None when every failure is worth a retry."""
    if isinstance(error, WorkerGroupError):
        for failure in error.worker_failures.values():
            if isinstance(failure, repeatable_errors()) or is_out_of_memory(failure):
                return failure
    return None


def out_of_memory_error(config: RunConfig, error: BaseException) -> GPUOutOfMemoryError:
    """The driver's one-paragraph report of a worker's OOM: the memory estimate it ran at and the keys to change."""
    memory = config.memory_estimate
    how = "with" if memory.activation_checkpointing else "without"
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return GPUOutOfMemoryError(
        f"a worker ran out of GPU memory (not retried: it would repeat) at micro-batch {memory.micro_batch_size} "
        f"{how} activation checkpointing; the estimated peak was {memory.peak / GIB:.1f} GiB of the "
        f"{usable_bytes(config.cluster.gpu_memory_gib) / GIB:.1f} GiB usable of cluster.gpu_memory_gib="
        f"{config.cluster.gpu_memory_gib:g} (`tarflow-train --dry-run` prints the breakdown). If the GPUs have less "
        "memory free than that, lower cluster.gpu_memory_gib (the micro-batch is then derived smaller); otherwise "
        "lower train.micro_batch_size (or raise train.grad_accum_steps), set deepspeed.activation_checkpointing=true, "
        f"deepspeed.zero_stage=3 or more cluster.num_workers. The worker said: {first_line}"
    )


def storage_failure(error: BaseException) -> str | None:
    """`[Errno 28] No space left on device: '/runs/x/...'` when a worker failed on a file-system error the user must
    act on (atomic.is_storage_error: a full or read-only disk, permissions); Ray retries it like a process death."""
    if isinstance(error, WorkerGroupError):
        for failure in error.worker_failures.values():
            cause = getattr(failure, "cause", failure)  # Ray's RayTaskError keeps the worker's exception here
            for candidate in (failure, cause):
                if is_storage_error(candidate):
                    where = f": {candidate.filename!r}" if candidate.filename else ""
                    return f"[Errno {candidate.errno}] {candidate.strerror or os.strerror(candidate.errno)}{where}"
    return None


def _say(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


class RepeatableErrorPolicy(DefaultFailurePolicy):
    """Ray's default policy, except that errors which will repeat are raised without a retry."""

    def make_decision(self, training_failed_error) -> FailureDecision:
        if repeatable_failure(training_failed_error) is not None:
            return FailureDecision.RAISE
        return super().make_decision(training_failed_error)


class ReliableTorchTrainer(TorchTrainer):
    """TorchTrainer that never retries repeatable errors and turns SIGINT/SIGTERM into a clean stop.

    First signal: write the stop request into run_dir; the workers agree on it at the next step boundary, write
    a final complete checkpoint and return. Second signal: abort the run through Ray's controller (the workers are
    torn down, no final checkpoint; `aborted_by` says so, and launch() raises RunAborted). A third exits at once.
    """

    ABORT_TIMEOUT_S = 30.0  # how long the second signal waits for Ray's controller to tear the workers down

    def __init__(self, *args, stop_dir: str | Path, **kwargs):
        super().__init__(*args, **kwargs)
        self._stop_dir = Path(stop_dir)
        self.stop_signal: int | None = None
        self.aborted_by: str | None = None  # the signal that aborted the run (the second one), if any

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        controller_init_kwargs["failure_policy"] = RepeatableErrorPolicy(self.run_config.failure_config)
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return super()._initialize_and_run_controller(**controller_init_kwargs)
        finally:  # restore the caller's handlers (pytest's, an interactive shell's); Ray sets none off the main thread
            if threading.current_thread() is threading.main_thread():
                for signum, handler in previous.items():
                    signal.signal(signum, handler)

    def _register_sigint_handler(self, controller) -> None:
        def handler(signum, frame):
            name = signal.Signals(signum).name
            if self.stop_signal is None:
                self.stop_signal = signum
                request_stop(self._stop_dir, f"{name} on the driver")
                _say(
                    f"tarflow-train: {name} received: stopping at the next step boundary after a final checkpoint "
                    "(send it again to abort without one)"
                )
            elif self.aborted_by is None:
                # Nothing is raised here: an exception thrown into Ray's wait for the controller surfaces as a
                # SystemError from Ray's C code. The controller's exit ends that wait, and launch() reports it.
                self.aborted_by = name
                _say(f"tarflow-train: second {name}: aborting without a final checkpoint...")
                self._abort(controller)
            else:  # a third while the abort runs: leave now (the next launch takes over the run_dir lock)
                _say(f"tarflow-train: third {name}: exiting at once; Ray's processes end with this one")
                os._exit(130)

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)

    def _abort(self, controller) -> None:
        """Ray's own abort: the controller tears the worker group down and exits (so the call may fail)."""
        import ray

        try:
            ray.get(controller.abort.remote(), timeout=self.ABORT_TIMEOUT_S)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass
