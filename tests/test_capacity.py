"""More workers than the cluster holds (tarflow_scale/capacity.py): refused before any worker starts, with the
numbers, on a fixed cluster; waited for, up to cluster.startup_timeout_s, with cluster.autoscale=true."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from tarflow_scale.capacity import ClusterTooSmall, WorkerRequest, shortfall, wait_for_capacity, workers_that_fit
from tarflow_scale.config import ConfigError, load_config


def brute_force_fit(per_worker: dict[str, float], nodes: list[dict[str, float]], limit: int = 12) -> int:
    """The most workers any assignment of workers to nodes holds, by trying every count per node."""
    best = 0
    for counts in itertools.product(range(limit + 1), repeat=len(nodes)):
        if all(c * v <= node.get(k, 0) for c, node in zip(counts, nodes) for k, v in per_worker.items() if v > 0):
            best = max(best, sum(counts))
    return best


def test_workers_are_packed_per_node_not_against_the_cluster_total():
    # 3 + 3 CPUs hold two 2-CPU workers, although the total (6) would suggest three.
    assert workers_that_fit({"CPU": 2}, [{"CPU": 3}, {"CPU": 3}]) == 2
    rng = np.random.default_rng(0)
    for _ in range(50):
        nodes = [{"CPU": float(rng.integers(0, 9)), "GPU": float(rng.integers(0, 3))} for _ in range(3)]
        per_worker = {"CPU": float(rng.integers(1, 4)), "GPU": float(rng.integers(0, 2))}
        assert workers_that_fit(per_worker, nodes) == brute_force_fit(per_worker, nodes), (per_worker, nodes)


def test_a_fixed_cluster_too_small_is_refused_at_once_with_the_numbers():
    request = WorkerRequest("training", 4, {"CPU": 1})
    polls = []

    def nodes():
        polls.append(1)
        return [{"CPU": 2.0, "memory": 1e9}]

    with pytest.raises(ClusterTooSmall) as e:
        wait_for_capacity(request, nodes, autoscale=False, timeout_s=600, sleep=lambda s: pytest.fail("waited"))
    message = str(e.value)
    assert "cluster.num_workers=4 training workers need 4 CPU (1 CPU each)" in message
    assert "the Ray cluster has 2 CPU on 1 node(s), room for 2 worker(s)" in message
    assert "cluster.autoscale=true" in message and len(polls) == 1
    assert isinstance(e.value, ConfigError)  # the CLIs print one line, exit code 2
    gpu = WorkerRequest("evaluation", 2, {"CPU": 1, "GPU": 1})
    assert "need 2 CPU, 2 GPU" in shortfall(gpu, [{"CPU": 8.0}]) and "has 8 CPU, 0 GPU" in shortfall(gpu, [{"CPU": 8}])
    assert shortfall(gpu, [{"CPU": 8, "GPU": 1}, {"CPU": 1, "GPU": 1}]) is None


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_an_autoscaling_cluster_is_asked_for_the_workers_and_waited_for():
    request = WorkerRequest("training", 3, {"CPU": 2, "GPU": 1})
    clock, asked, lines = FakeClock(), [], []
    node = {"CPU": 4.0, "GPU": 2.0}

    def nodes():  # a second node joins after 100 s
        return [node] if clock.now < 100 else [node, node]

    wait_for_capacity(
        request, nodes, autoscale=True, timeout_s=600, request_resources=asked.append, say=lines.append,
        poll_s=5, clock=clock, sleep=clock.sleep,
    )  # fmt: skip
    assert asked == [[{"CPU": 2, "GPU": 1}] * 3, []]  # the workers' bundles, withdrawn once they fit
    assert 100 <= clock.now < 110
    assert lines[0].startswith("waiting up to 600 s (cluster.startup_timeout_s) for the autoscaler")
    assert any("still waiting" in line for line in lines) and "after 10" in lines[-1]


def test_an_autoscaling_cluster_that_never_grows_fails_after_the_timeout():
    clock, asked = FakeClock(), []
    with pytest.raises(
        ClusterTooSmall, match=r"room for 1 worker\(s\), still, after waiting cluster.startup_timeout_s=30"
    ):
        wait_for_capacity(
            WorkerRequest("evaluation", 2, {"CPU": 1}), lambda: [{"CPU": 1.0}], autoscale=True, timeout_s=30,
            request_resources=asked.append, say=lambda line: None, clock=clock, sleep=clock.sleep,
        )  # fmt: skip
    assert 30 <= clock.now < 36 and asked[-1] == []


def test_startup_timeout_is_validated():
    with pytest.raises(ConfigError, match="cluster.startup_timeout_s=-1"):
        load_config(None, ["cluster.startup_timeout_s=-1"])
    assert load_config(None, ["cluster.autoscale=true"]).cluster.autoscale is True


@pytest.mark.slow
def test_training_and_evaluation_refuse_more_workers_than_the_embedded_cluster_holds(tmp_path):
    """On a 2-CPU embedded Ray, 4 workers are refused in seconds (Ray alone would wait forever)."""
    import ray

    import tarflow_scale.training.cluster as cluster
    from tarflow_scale.data import write_split
    from tarflow_scale.data.sources import ArraySource
    from tarflow_scale.evaluation.pool import WorkerPool
    from tarflow_scale.models.tarflow import TarFlow

    images = np.zeros((8, 8, 8, 3), np.uint8)
    write_split(str(tmp_path / "d"), ArraySource(images, np.zeros(8, int), list("abcdefgh"), 0, [], {}), name="t",
                split="train", progress=False)  # fmt: skip
    tiny = ["model.image_size=8", "model.patch_size=2", "model.channels=32", "model.head_dim=16"]
    config = load_config(
        None, [f"data.path={tmp_path / 'd'}", f"run_dir={tmp_path / 'run'}", "cluster.num_workers=4", *tiny]
    )
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with pytest.raises(ClusterTooSmall, match=r"4 training workers need 4 CPU .* has 2 CPU on 1 node\(s\)"):
            cluster.launch(config)
        model = TarFlow(config.model)
        with pytest.raises(ClusterTooSmall, match=r"3 evaluation workers need 3 CPU .* room for 2 worker"):
            WorkerPool(model, config, 3)
        config.cluster.autoscale, config.cluster.startup_timeout_s = True, 1.0
        with pytest.raises(ClusterTooSmall, match="after waiting cluster.startup_timeout_s=1"):
            WorkerPool(model, config, 3)  # the request to Ray's autoscaler is made, and withdrawn
        assert not [a for a in ray.util.list_named_actors(all_namespaces=True)]  # no worker was started
    finally:
        ray.shutdown()
