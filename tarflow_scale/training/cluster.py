"""Ray side of training: start or join a cluster, run `train_worker` on N workers, report how the launch went."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..artifacts.checkpoints import checkpoint_step, complete_checkpoints, verified_signatures
from ..artifacts.exports import EXPORT_NAME
from ..capacity import WorkerRequest, wait_for_capacity
from ..config import ConfigError, RunConfig, local_run_dir, to_dict
from ..data import check_first_sample, check_shard_sizes, read_manifest, resolve_data_path
from ..run_lock import OutputDirError, lock_output_dir
from .console import (
    ConsoleOptions,
    TrainingProgress,
    apply_driver_settings,
    ray_init_kwargs,
    ray_train_log_level,
)

DEFAULT_EXTENSIONS_DIR = Path.home() / ".cache" / "tarflow_scale" / "torch_extensions"
CONSOLE_KEY = "_console"  # ConsoleOptions ride along in the train loop config under this key


@dataclass
class LaunchOutcome:
    """What `launch` did: trained (from `start_step` to `end_step`), or found the run already finished."""

    run_dir: Path
    already_finished: bool
    start_step: int
    end_step: int
    seconds: float  # wall-clock of the Ray Train fit (0 when already finished)
    result: Any = None  # Ray's Result


def checkpoint_steps(run_dir: str | Path) -> list[int]:
    """Steps of the complete checkpoints (sealed by their completeness marker) in a run directory, ascending."""
    return [checkpoint_step(path) for path in complete_checkpoints(run_dir, warn=False)]


def finished_step(config: RunConfig) -> int | None:
    """The step a finished run stopped at, or None when there is training (or the final export) left to do.

    Finished means: a complete checkpoint at or beyond `train.num_steps` and the export written. Raising
    `train.num_steps` makes the run unfinished again (it resumes from its newest checkpoint).
    """
    run_dir = Path(config.run_dir)
    steps = checkpoint_steps(run_dir)
    if not steps or steps[-1] < config.train.num_steps or not (run_dir / EXPORT_NAME).is_file():
        return None
    return steps[-1]


def check_data_matches_model(config: RunConfig) -> None:
    """Fail before any worker starts when the shards cannot feed this model."""
    manifest = read_manifest(config.data.path, config.data.train_split)
    check_shard_sizes(config.data.path, manifest)  # cheap; `tarflow-data verify` is the full check
    model = config.model
    size = config.data.image_size or manifest.image_size  # the loader can downsample, never upsample
    if size != model.image_size or size > manifest.image_size or manifest.channels != model.in_channels:
        raise ConfigError(
            f"data.path={config.data.path} holds {manifest.channels}x{manifest.image_size}x{manifest.image_size} "
            f"images but the model expects {model.in_channels}x{model.image_size}x{model.image_size} "
            "(set model.image_size / model.in_channels to match, or data.image_size to downsample)"
        )
    if model.num_classes and manifest.num_classes != model.num_classes:
        raise ConfigError(
            f"model.num_classes={model.num_classes} but data.path={config.data.path} has {manifest.num_classes} classes"
        )
    check_first_sample(config.data.path, manifest)  # a split in a form the loaders refuse (16-bit, alpha) fails here


def init_ray(address: str | None, console: ConsoleOptions | None = None) -> None:
    """Join `address` (or RAY_ADDRESS); with neither, start a fresh embedded local cluster."""
    import ray

    if ray.is_initialized():
        return
    console = console or ConsoleOptions()
    apply_driver_settings(console)
    settings = ray_init_kwargs(console)
    # Workers JIT-build DeepSpeed's CPU comm op once; keep it out of the temp dir so later runs reuse it.
    env = {"TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(DEFAULT_EXTENSIONS_DIR))}
    env.update(settings["env_vars"])
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    ray.init(
        address=address,
        runtime_env={"env_vars": env},
        log_to_driver=settings["log_to_driver"],
        logging_level=settings["logging_level"],
    )


def wait_for_workers(request: WorkerRequest, config: RunConfig) -> None:
    """Refuse (or, with cluster.autoscale, wait for) a worker group the cluster cannot hold: Ray would wait forever."""
    import ray
    from ray.autoscaler.sdk import request_resources

    wait_for_capacity(
        request,
        lambda: [node["Resources"] for node in ray.nodes() if node["Alive"]],
        autoscale=config.cluster.autoscale,
        timeout_s=config.cluster.startup_timeout_s,
        request_resources=lambda bundles: request_resources(bundles=bundles),
        say=_say,
    )


def _say(message: str) -> None:
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def launch(
    config: RunConfig,
    address: str | None = None,
    allow_config_change: tuple[str, ...] = (),
    console: ConsoleOptions | None = None,
    trust_checkpoint: bool = False,
) -> LaunchOutcome:
    """Train `config` with Ray Train + DeepSpeed; resumes when `run_dir` already holds checkpoints, and returns at
    once (before Ray starts) when the run already finished.

    Everything that would fail the same way in every worker is checked here first (config, data, run_dir, the
    config and world size of the checkpoint it resumes from). Raises RunStopped after a SIGINT/SIGTERM stop, and a
    repeatable worker error (ConfigError, DataError, ...) as itself, unretried (a GPU out-of-memory as
    GPUOutOfMemoryError, naming the memory estimate and the keys to change). At the end the trainer writes
    `run_dir/model.safetensors` from the live weights. A checkpoint that is not the user's own is resumed (its
    engine state unpickled) only with `trust_checkpoint`.
    """
    console = console or ConsoleOptions()
    config.validate()
    run_dir = local_run_dir(config.run_dir).resolve()  # accepts file:// URIs
    config.run_dir = str(run_dir)
    done = finished_step(config)
    if done is not None:
        return LaunchOutcome(run_dir, True, done, done, 0.0)
    config.data.path = resolve_data_path(config.data, announce=_say)
    check_data_matches_model(config)
    # One launch per run_dir (a second would report the first's progress as its own and rewrite the export); a lock
    # left by a killed driver on this host is taken over, so re-running a crashed command resumes.
    with lock_output_dir(run_dir, f"run_dir={run_dir}"):
        return _launch_locked(config, run_dir, address, allow_config_change, console, trust_checkpoint)


def _launch_locked(
    config: RunConfig,
    run_dir: Path,
    address: str | None,
    allow_config_change: tuple[str, ...],
    console: ConsoleOptions,
    trust_checkpoint: bool = False,
) -> LaunchOutcome:
    previous = checkpoint_steps(run_dir)
    start_step = previous[-1] if previous else 0

    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig

    from .failures import (
        ReliableTorchTrainer,
        is_out_of_memory,
        out_of_memory_error,
        repeatable_failure,
        storage_failure,
    )
    from .run_state import (
        RunAborted,
        RunStopped,
        check_resume,
        clear_stop,
        record_config,
        repair_ray_snapshot,
        stop_requested,
    )
    from .trainer import FAULT_AT_STEP_ENV, TRUST_KEY, VERIFIED_KEY, train_worker

    plan = check_resume(config, tuple(allow_config_change), trust_checkpoint)
    for key, (old, new) in plan.allowed_changes.items():
        _say(f"tarflow-train: config change on resume: {key}: {old!r} -> {new!r}")
    repair_ray_snapshot(run_dir)
    clear_stop(run_dir)
    record_config(config, plan)

    where = f"resuming from step {start_step}" if start_step else "from scratch"
    _say(
        f"training {run_dir.name}: {config.train.num_steps} steps, {config.cluster.num_workers} workers "
        f"({'GPU' if config.cluster.use_gpu else 'CPU'}), {where}; starting Ray and DeepSpeed..."
    )
    init_ray(address or config.cluster.address, console)
    resources = {"CPU": config.cluster.cpus_per_worker}
    # The trainer's test hook reaches the workers even when Ray started before the variable was set.
    fault_at = os.environ.get(FAULT_AT_STEP_ENV)
    if config.cluster.use_gpu:
        resources["GPU"] = 1
    wait_for_workers(WorkerRequest("training", config.cluster.num_workers, resources), config)
    trainer = ReliableTorchTrainer(
        train_worker,
        stop_dir=run_dir,
        train_loop_config={
            **to_dict(config),
            CONSOLE_KEY: console.to_dict(),
            TRUST_KEY: trust_checkpoint,
            VERIFIED_KEY: verified_signatures(),  # check_resume hashed the checkpoint it resumes from
        },
        scaling_config=ScalingConfig(
            num_workers=config.cluster.num_workers, use_gpu=config.cluster.use_gpu, resources_per_worker=resources
        ),
        run_config=RayRunConfig(
            name=run_dir.name,
            storage_path=run_dir.parent.as_uri(),  # Ray Train's storage (pyarrow fs) on the shared path
            failure_config=FailureConfig(max_failures=config.cluster.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.train.keep_checkpoints),
            logging_config=LoggingConfig(log_level=ray_train_log_level(console)),
            worker_runtime_env={"env_vars": {FAULT_AT_STEP_ENV: fault_at}} if fault_at else None,
        ),
    )
    progress = None
    if not console.verbose:  # verbose: rank 0 prints its own progress lines
        progress = TrainingProgress(run_dir / "metrics.jsonl", config.train.num_steps, console.progress_every_s)
        progress.start()
    started = time.time()
    try:
        result = trainer.fit()
    except Exception as e:
        if trainer.aborted_by is not None:  # a second Ctrl-C: Ray's controller exited, ending fit() with its error
            done = complete_checkpoints(run_dir)
            raise RunAborted(trainer.aborted_by, done[-1] if done else None) from None
        cause = repeatable_failure(e)
        if cause is not None and is_out_of_memory(cause):
            raise out_of_memory_error(config, cause) from None
        if cause is not None:  # the worker's own error, not Ray's wrapper: it names the key, file or sample
            raise cause from None
        full = storage_failure(e)
        if full is not None:  # retried up to cluster.max_failures (space may be freed meanwhile), then reported
            done = complete_checkpoints(run_dir, warn=False)
            resume = f"it resumes from {done[-1].name}" if done else "it starts again from step 0"
            raise OutputDirError(
                f"run_dir={run_dir}: a worker could not write ({full}). Free space (or fix the permissions) and "
                f"re-run the same command: {resume}"
            ) from None
        raise
    finally:
        if progress is not None:
            progress.stop()
    seconds = time.time() - started
    if stop_requested(run_dir):
        clear_stop(run_dir)
        done = complete_checkpoints(run_dir)
        last = done[-1] if done else None
        step = checkpoint_step(last) if last else 0
        if step < config.train.num_steps:  # a signal during the last step changes nothing: the run finished
            raise RunStopped(step, last)
    return LaunchOutcome(run_dir, False, start_step, config.train.num_steps, seconds, result)
