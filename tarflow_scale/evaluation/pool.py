"""The evaluation's Ray side: joining a cluster, a pool of EvalWorker actors that replaces lost ones, and the
driver's progress lines."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import ray
from ray.autoscaler.sdk import request_resources

from ..capacity import WorkerRequest, wait_for_capacity
from ..config import RunConfig, to_dict
from ..models.tarflow import TarFlow
from .worker import EvalWorker


class Progress:
    """Periodic progress lines on the driver: done/total, rate and ETA."""

    def __init__(self, name: str, total: int, every_s: float, unit: str = "images", stream=None):
        self.name, self.total, self.every_s, self.unit = name, total, every_s, unit
        self.stream = stream or sys.stdout
        self.done = 0
        self.start = self.last = time.perf_counter()
        self._print(f"[{name}] started: {total} {unit}")

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every_s and self.done < self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            self._print(
                f"[{self.name}] {self.done}/{self.total} {self.unit} ({100 * self.done / self.total:.0f}%), "
                f"{rate:.1f} {self.unit}/s, ETA {eta:.0f}s"
            )

    def finish(self) -> dict[str, float]:
        seconds = time.perf_counter() - self.start
        rate = self.done / max(seconds, 1e-9)
        self._print(f"[{self.name}] done: {self.done} {self.unit} in {seconds:.1f}s ({rate:.1f} {self.unit}/s)")
        return {"seconds": seconds, f"{self.unit}_per_s": rate}


def _a(what: str) -> str:
    """`an evaluation`, `a sampling`: the workers' name with its article."""
    return f"{'an' if what[:1] in 'aeiou' else 'a'} {what}"


def init_ray(address: str | None, verbose: bool = False) -> bool:
    """Join `address`, else RAY_ADDRESS, else start an embedded local cluster; True when this call started Ray.

    Quiet unless `verbose`: the driver's Ray logger and the workers' Ray loggers at ERROR (no start-up chatter);
    worker warnings printed by our code and every error still reach the console."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    level = logging.INFO if verbose else logging.ERROR
    runtime_env = {} if verbose else {"env_vars": {"RAY_LOGGER_LEVEL": "error"}}
    ray.init(address=address, log_to_driver=True, logging_level=level, runtime_env=runtime_env)
    return True


class WorkerPool:
    """N worker actors (EvalWorker unless told otherwise); work items go to whichever worker is free, and a lost
    worker is replaced.

    A worker that dies (its process or its node) loses only the item it was running: the item goes back to the
    queue and a new actor is started wherever the cluster has room. Errors raised by the work itself (DataError,
    FidError, ...) are not retried: they would repeat.
    """

    MAX_REPLACEMENTS_PER_WORKER = 3  # then the cluster is failing, not occasionally losing a node

    def __init__(
        self,
        model: TarFlow,
        config: RunConfig,
        num_workers: int,
        source: str = "the evaluated model",
        *,
        worker: type = EvalWorker,
        worker_args: tuple | None = None,
        what: str = "evaluation",
    ):
        """`worker` is the actor class, built as `worker(payload, *worker_args)` (payload: the model config, its
        weights and `source`); the default is EvalWorker with (config, use_gpu, threads). `what` names the
        workers in messages."""
        cluster = config.cluster
        self.what = what
        per_worker = {"CPU": cluster.cpus_per_worker, "GPU": 1 if cluster.use_gpu else 0}
        wait_for_capacity(
            WorkerRequest(what, num_workers, per_worker),
            lambda: [node["Resources"] for node in ray.nodes() if node["Alive"]],
            autoscale=cluster.autoscale,
            timeout_s=cluster.startup_timeout_s,
            request_resources=lambda bundles: request_resources(bundles=bundles),
            say=lambda line: print(line, flush=True),
        )
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        # One copy of the weights in the object store; every worker builds its model from it (no shared FS needed);
        # `source` names the checkpoint in a worker's error.
        self._payload = ray.put({"model_config": to_dict(model.config), "state": state, "source": source})
        # SPREAD: one lost node takes as few workers as possible with it.
        self._actor = ray.remote(worker).options(
            num_cpus=cluster.cpus_per_worker, num_gpus=1 if cluster.use_gpu else 0, scheduling_strategy="SPREAD"
        )
        default_args = (to_dict(config), cluster.use_gpu, cluster.cpus_per_worker)
        self._args = default_args if worker_args is None else tuple(worker_args)
        self.actors = [self._new_actor() for _ in range(num_workers)]
        start = time.perf_counter()
        try:
            self.devices = ray.get([a.ready.remote() for a in self.actors])
        except ray.exceptions.RayActorError as e:
            raise RuntimeError(f"{_a(what)} worker failed to start: {e}") from e
        self.startup_s = time.perf_counter() - start
        self.size = num_workers
        self.replaced = 0  # workers lost and replaced during this evaluation

    def _new_actor(self):
        return self._actor.remote(self._payload, *self._args)

    def map(
        self,
        method: str,
        items: list[tuple],
        progress: Progress,
        count: Callable[[Any], int],
        on_result: Callable[[int, Any], None] | None = None,
        keep_results: bool = True,
    ) -> list[Any]:
        """Run `method(*item)` for every item; `on_result(i, result)` runs on the driver as each one finishes
        (it saves the unit). Returns the results in item order (None each when not `keep_results`: results that
        `on_result` has written out need not stay in the driver's memory)."""
        from collections import deque

        results: list[Any] = [None] * len(items)
        queue = deque(range(len(items)))
        idle = list(self.actors)
        running: dict[Any, tuple[Any, int]] = {}  # ref -> (actor, item index)
        starting: dict[Any, Any] = {}  # ready() ref -> replacement actor
        while queue or running:
            while idle and queue:
                actor, i = idle.pop(), queue.popleft()
                running[getattr(actor, method).remote(*items[i])] = (actor, i)
            if not running and not starting:
                raise RuntimeError(f"every {self.what} worker was lost; {len(queue)} {method} items left")
            ready, _ = ray.wait([*running, *starting], num_returns=1)
            ref = ready[0]
            if ref in starting:
                actor = starting.pop(ref)
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError:
                    self._replace(actor, starting, reason="its replacement failed to start")
                    continue
                idle.append(actor)
                continue
            actor, i = running.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                cause = getattr(e, "cause", None)
                if isinstance(cause, Exception) and type(cause).__module__.startswith("tarflow_scale."):
                    raise cause from None  # ours (DataError, FidError, ...): its message names the culprit, one line
                raise e.as_instanceof_cause() from None  # anything else keeps the worker's traceback
            except ray.exceptions.RayActorError as e:  # the process or its node is gone: redo its item elsewhere
                print(f"[{method}] {_a(self.what)} worker was lost ({type(e).__name__}); redoing its unit", flush=True)
                queue.appendleft(i)
                self._replace(actor, starting, reason=str(e))
                continue
            if on_result is not None:
                on_result(i, result)
            progress.update(count(result))
            results[i] = result if keep_results else None
            idle.append(actor)
        return results

    def _replace(self, actor, starting: dict, reason: str) -> None:
        self.replaced += 1
        if self.replaced > self.MAX_REPLACEMENTS_PER_WORKER * self.size:
            raise RuntimeError(f"{self.replaced} {self.what} workers lost; the last: {reason}")
        self.actors = [a for a in self.actors if a is not actor]
        with contextlib.suppress(Exception):
            ray.kill(actor)
        new = self._new_actor()
        self.actors.append(new)
        starting[new.ready.remote()] = new

    def close(self) -> None:
        for a in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(a)
