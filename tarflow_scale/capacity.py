"""Whether N identical Ray workers fit the cluster, checked before any of them starts: training and evaluation share
this rule. A fixed cluster that cannot hold them is refused at once with the numbers (Ray would wait forever); with
`cluster.autoscale=true` the workers' resources are requested from the autoscaler and the start waits up to
`cluster.startup_timeout_s`. Ray itself is passed in as two callables, so the rule runs (and is tested) without it.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from .config import ConfigError

PROGRESS_EVERY_S = 60.0  # seconds between "still waiting" lines


class ClusterTooSmall(ConfigError):
    """The workers do not fit the cluster (now, or within cluster.startup_timeout_s); the message has the numbers."""


@dataclass(frozen=True)
class WorkerRequest:
    """`num_workers` workers of `per_worker` resources each ({"CPU": 1} or {"CPU": 8, "GPU": 1}); `what` names
    them in messages ("training", "evaluation")."""

    what: str
    num_workers: int
    per_worker: dict[str, float]

    def bundles(self) -> list[dict[str, float]]:
        return [dict(self.per_worker) for _ in range(self.num_workers)]

    def total(self) -> dict[str, float]:
        return {k: v * self.num_workers for k, v in self.per_worker.items() if v > 0}


def workers_that_fit(per_worker: dict[str, float], nodes: list[dict[str, float]]) -> int:
    """How many workers the nodes hold at most: a worker lives on one node, so each node holds
    min over resources of floor(node's total / worker's need), and the nodes add up."""
    needed = {k: v for k, v in per_worker.items() if v > 0}
    if not needed:
        return sys.maxsize
    return sum(min(math.floor(node.get(k, 0.0) / v + 1e-9) for k, v in needed.items()) for node in nodes)


def _amounts(resources: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in sorted(resources.items())) or "nothing"


def shortfall(request: WorkerRequest, nodes: list[dict[str, float]]) -> str | None:
    """None when the workers fit, else what they need against what the cluster has."""
    fit = workers_that_fit(request.per_worker, nodes)
    if fit >= request.num_workers:
        return None
    have = {k: sum(node.get(k, 0.0) for node in nodes) for k in request.total()}
    return (
        f"cluster.num_workers={request.num_workers} {request.what} workers need {_amounts(request.total())} "
        f"({_amounts({k: v for k, v in request.per_worker.items() if v > 0})} each); the Ray cluster has "
        f"{_amounts(have)} on {len(nodes)} node(s), room for {fit} worker(s)"
    )


def wait_for_capacity(
    request: WorkerRequest,
    nodes: Callable[[], list[dict[str, float]]],
    *,
    autoscale: bool,
    timeout_s: float,
    request_resources: Callable[[list[dict[str, float]]], None] | None = None,
    say: Callable[[str], None] = print,
    poll_s: float = 5.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Return once the workers fit `nodes()` (each alive node's total resources); raise ClusterTooSmall otherwise.

    Totals, not free resources: a cluster busy with other work will hold the workers later, and Ray queues them.
    Without `autoscale` the check is made once. With it, `request_resources(bundles)` asks the autoscaler for the
    workers (it adds nodes only for resources someone asked for) and `nodes()` is polled every `poll_s` seconds
    for up to `timeout_s`; the request is withdrawn at the end (the workers' own placement then holds the nodes).
    """
    missing = shortfall(request, nodes())
    if missing is None:
        return
    if not autoscale:
        raise ClusterTooSmall(
            f"{missing}. Lower cluster.num_workers or cluster.cpus_per_worker, join a larger cluster, or set "
            "cluster.autoscale=true if this cluster adds nodes on demand"
        )
    say(f"waiting up to {timeout_s:g} s (cluster.startup_timeout_s) for the autoscaler: {missing}")
    if request_resources is not None:
        request_resources(request.bundles())
    start = last_said = clock()
    try:
        while clock() - start < timeout_s:
            sleep(min(poll_s, max(0.0, timeout_s - (clock() - start))))
            missing = shortfall(request, nodes())
            if missing is None:
                say(f"the cluster holds the {request.num_workers} {request.what} workers after {clock() - start:.0f} s")
                return
            if clock() - last_said >= PROGRESS_EVERY_S:
                last_said = clock()
                say(f"still waiting ({clock() - start:.0f} of {timeout_s:g} s): {missing}")
    finally:
        if request_resources is not None:
            request_resources([])
    raise ClusterTooSmall(
        f"{missing}, still, after waiting cluster.startup_timeout_s={timeout_s:g} s for the autoscaler. Check the "
        "autoscaler's node limits, or lower cluster.num_workers or cluster.cpus_per_worker"
    )
