"""Lost nodes, on one machine, with Ray's own multi-node test cluster (ray.cluster_utils.Cluster): evaluation
finishes with exactly the FID of an uninterrupted run, and training resumes from its checkpoint with identical
losses. The head has 1 CPU, each worker node 1 CPU, so two workers always straddle two nodes; the test removes the
worker node mid-run and adds a fresh one, as an autoscaler replacing a lost machine would."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tarflow_scale.data import write_split
from tarflow_scale.data.sources import ArraySource
from tarflow_scale.training.metrics import read_metrics

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    ray.init(address=c.address, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Blocky 8x8 images in 2 classes (train = val), as tests/test_training.py uses."""
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    images = np.kron(rng.integers(0, 256, size=(64, 2, 2, 3)), np.ones((1, 4, 4, 1))).astype(np.uint8)
    for split in ("train", "val"):
        source = ArraySource(
            images=images, labels=np.arange(64) % 2, keys=[f"img{i:03d}" for i in range(64)], num_classes=2,
            class_names=["a", "b"], description={"kind": "test"},
        )  # fmt: skip
        write_split(str(root), source, name="tiny", split=split, samples_per_shard=16, progress=False)
    return root


def fresh_worker_node(cluster):
    node = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    return node


def run_losing_a_node(cluster, work, ready, timeout_s: float = 600):
    """Run `work()` in a thread on head + one worker node (1 CPU each: two workers straddle both); once
    `ready()` holds, remove the worker node (killing its processes) and add a fresh one, as an autoscaler
    replacing a lost machine would. Ray starts nodes from the main thread only, so the work runs beside it."""
    node = fresh_worker_node(cluster)
    outcome: dict = {}

    def target():
        try:
            outcome["result"] = work()
        except BaseException as e:  # re-raised on the main thread
            outcome["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    deadline = time.time() + timeout_s
    while time.time() < deadline and thread.is_alive() and not ready():
        time.sleep(0.02)
    lost_mid_run = thread.is_alive()
    cluster.remove_node(node)
    replacement = fresh_worker_node(cluster)
    thread.join(timeout_s)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"], lost_mid_run, replacement


def test_evaluation_survives_a_lost_node_with_the_exact_fid(cluster, dataset, tmp_path):
    import torch

    from tarflow_scale.artifacts import read_provenance, save_export
    from tarflow_scale.config import DataConfig, RunConfig, TarFlowConfig
    from tarflow_scale.evaluation.orchestrate import evaluate
    from tarflow_scale.evaluation.resolve import resolve_config
    from tarflow_scale.models.tarflow import TarFlow

    torch.manual_seed(0)
    model_config = TarFlowConfig(
        image_size=8, patch_size=2, channels=32, head_dim=16, num_blocks=2, layers_per_block=1, num_classes=2
    )
    model = TarFlow(model_config)
    run = RunConfig(model=model_config, data=DataConfig(path=str(dataset)))
    export = save_export(model.state_dict(), run, tmp_path / "m.safetensors", source="test", tag="t", ema=False)
    info = read_provenance(export)
    overrides = [
        "eval.jobs=[fid_stats,fid]", "cluster.num_workers=2", "eval.batch_size=2", "eval.fid_num_samples=256",
        "eval.kid_max_features=16", "eval.fid_feature_extractor=pooled_pixels", "eval.progress_every_s=60",
        f"eval.fid_reference={tmp_path / 'ref.npz'}", "data.num_workers=0", "cluster.cpus_per_worker=1",
    ]  # fmt: skip

    lost_dir = tmp_path / "lost"
    lost, lost_mid_run, replacement = run_losing_a_node(
        cluster,
        lambda: evaluate(resolve_config(info, None, overrides), info, lost_dir),
        lambda: len(list(lost_dir.glob("units/fid-*/chunk_*.npz"))) >= 3,
    )
    assert lost_mid_run, "the FID job finished before the node could be removed"
    assert lost["cluster"]["workers_replaced"] >= 1
    assert lost["results"]["fid"]["units"]["computed"] == 128  # 256 samples in chunks of 2

    uninterrupted = evaluate(resolve_config(info, None, overrides), info, tmp_path / "clean")
    assert uninterrupted["cluster"]["workers_replaced"] == 0
    cluster.remove_node(replacement)  # back to the head alone for the next test
    for key in ("fid", "kid", "num_generated", "num_nonfinite_redrawn"):
        assert lost["results"]["fid"][key] == uninterrupted["results"]["fid"][key], key


def test_training_resumes_after_a_lost_node_with_identical_losses(cluster, dataset, tmp_path):
    from tarflow_scale.config import load_config
    from tarflow_scale.training.cluster import launch

    def config(run_dir: Path):
        return load_config(
            None,
            [
                f"run_dir={run_dir}", f"data.path={dataset}", "data.shuffle_buffer=16", "data.num_workers=0",
                "model.image_size=8", "model.patch_size=2", "model.channels=32", "model.head_dim=16",
                "model.num_blocks=2", "model.layers_per_block=1", "model.num_classes=2", "optim.lr=3e-3",
                "optim.warmup_steps=1", "train.num_steps=6", "train.global_batch_size=16", "train.micro_batch_size=4",
                "train.log_every=1", "train.checkpoint_every=3", "train.sample_every=0", "train.num_samples=4",
                "cluster.num_workers=2", "cluster.max_failures=1",
            ],
        )  # fmt: skip

    def losses(run_dir: Path) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}

    reference = tmp_path / "reference"
    lost = tmp_path / "lost"
    _, lost_mid_run, replacement = run_losing_a_node(
        cluster, lambda: launch(config(lost)), lambda: (lost / "checkpoint_00000003" / "complete.json").is_file()
    )
    assert lost_mid_run, "training finished before the node could be removed"
    launch(config(reference))  # uninterrupted, on the head and the replacement node
    cluster.remove_node(replacement)
    resumes = [r for r in read_metrics(lost) if "resumed_from" in r]
    assert resumes, "the node loss must have restarted the workers"
    assert all(r["step"] >= 3 and r["resumed_from"].endswith(f"checkpoint_{r['step']:08d}") for r in resumes)
    assert sorted({r["step"] for r in read_metrics(lost) if "loss" in r}) == list(range(1, 7))
    assert losses(lost) == losses(reference)  # every step, including those redone from checkpoint 3, bit for bit


def test_shard_sampling_survives_a_lost_node_and_a_rerun_finds_every_index_once(cluster, tmp_path):
    """`tarflow-sample --format shards` losing a worker's node mid-run: its shard is redrawn by a replacement, the
    shards equal an uninterrupted run's byte for byte, and re-running the command finds every index exactly once."""
    import tarfile

    import torch

    from tarflow_scale.config import Guidance, TarFlowConfig
    from tarflow_scale.data import read_manifest, verify
    from tarflow_scale.evaluation.shard_sampling import sample_to_shards
    from tarflow_scale.evaluation.shard_worker import ShardSampling
    from tarflow_scale.models.tarflow import TarFlow

    torch.manual_seed(0)
    model = TarFlow(TarFlowConfig(image_size=8, patch_size=2, channels=32, head_dim=16, num_blocks=2,
                                  layers_per_block=1, num_classes=2))  # fmt: skip
    with torch.no_grad():
        for block in model.blocks:
            block.proj_out.weight.normal_(0, 0.05)  # non-zero heads: the images depend on the weights
    spec = ShardSampling(num=128, seed=2, labels="balanced", guidance=Guidance(1.0), shard_size=2)

    def run(out: Path, workers: int = 2):
        out.mkdir(exist_ok=True)
        return sample_to_shards(model, out, spec, num_workers=workers, batch_size=2, progress_every_s=60)

    lost_dir = tmp_path / "lost"
    lost, lost_mid_run, replacement = run_losing_a_node(
        cluster, lambda: run(lost_dir), lambda: len(list(lost_dir.glob("samples-train-*.tar"))) >= 3
    )
    assert lost_mid_run, "sampling finished before the node could be removed"
    assert lost.workers_replaced >= 1 and lost.images_sampled == 128
    clean = run(tmp_path / "clean")  # uninterrupted, on the head and the replacement node
    cluster.remove_node(replacement)  # back to the head alone for the next test
    assert clean.workers_replaced == 0
    names = [f"samples-train-{i:06d}.tar" for i in range(64)]
    assert [(lost_dir / n).read_bytes() for n in names] == [(tmp_path / "clean" / n).read_bytes() for n in names]

    again = run(lost_dir, workers=1)  # the same command again: nothing left to draw
    assert (again.shards_reused, again.images_sampled) == (64, 0)
    manifest = read_manifest(str(lost_dir), "train")
    assert verify(str(lost_dir), manifest, deep=True) == []
    keys = []
    for name in manifest.shards:
        with tarfile.open(lost_dir / name) as tar:
            keys += [m.name.split(".")[0] for m in tar if m.name.endswith(".png")]
    assert sorted(int(k) for k in keys) == list(range(128))


def test_a_sweep_across_nodes_survives_a_lost_node_with_each_setting_s_exact_fid(cluster, dataset, tmp_path):
    """A 2 x 2 sweep (guidance.weight x decoding.mode) on two nodes, one lost mid-run: each setting's FID/KID
    equal the same setting computed in this process, chunk by chunk (the fid job's units), without Ray."""
    import torch

    from tarflow_scale.artifacts import read_provenance, save_export
    from tarflow_scale.config import DataConfig, Decoding, Guidance, RunConfig, TarFlowConfig
    from tarflow_scale.evaluation import fid as fidlib
    from tarflow_scale.evaluation.generate import generate
    from tarflow_scale.evaluation.orchestrate import evaluate
    from tarflow_scale.evaluation.resolve import resolve_config
    from tarflow_scale.models.tarflow import TarFlow
    from tarflow_scale.sampling import to_uint8

    torch.manual_seed(1)
    model_config = TarFlowConfig(
        image_size=8, patch_size=2, channels=32, head_dim=16, num_blocks=2, layers_per_block=1, num_classes=2
    )
    model = TarFlow(model_config).eval()
    with torch.no_grad():
        for block in model.blocks:  # live heads: guidance and decoding modes change the samples
            block.proj_out.weight.normal_(0, 0.05)
    run = RunConfig(model=model_config, data=DataConfig(path=str(dataset)))
    export = save_export(model.state_dict(), run, tmp_path / "m.safetensors", source="test", tag="t", ema=False)
    info = read_provenance(export)
    reference = tmp_path / "ref.npz"
    num, batch, kid_max = 32, 4, 12
    overrides = [
        "eval.jobs=[fid_stats,fid]", "cluster.num_workers=2", f"eval.batch_size={batch}",
        f"eval.fid_num_samples={num}", f"eval.kid_max_features={kid_max}", "eval.fid_feature_extractor=pooled_pixels",
        "eval.progress_every_s=60", f"eval.fid_reference={reference}", "data.num_workers=0",
        "cluster.cpus_per_worker=1", "eval.sweep.guidance=[0,2]", "eval.sweep.decoding_mode=[sequential,jacobi]",
        "eval.decoding.tol=0.05",
    ]  # fmt: skip
    out = tmp_path / "sweep"
    report, lost_mid_run, replacement = run_losing_a_node(
        cluster,
        lambda: evaluate(resolve_config(info, None, overrides), info, out),
        lambda: len(list(out.glob("units/fid-*/chunk_*.npz"))) >= 3,
    )
    cluster.remove_node(replacement)  # back to the head alone for the next test
    assert lost_mid_run, "the sweep finished before the node could be removed"
    rows = report["results"]["fid"]["sweep"]["rows"]
    assert [(r["setting"]["guidance.weight"], r["setting"]["decoding.mode"]) for r in rows] == [
        (0.0, "sequential"), (0.0, "jacobi"), (2.0, "sequential"), (2.0, "jacobi"),
    ]  # fmt: skip
    assert sum(r["units"]["computed"] for r in rows) == 4 * num // batch  # every unit exactly once

    ref = fidlib.load_reference(reference, {})
    chunks = [list(range(c, min(c + batch, num))) for c in range(0, num, batch)]
    for row in rows:
        guidance = Guidance(row["setting"]["guidance.weight"])
        decoding = Decoding(mode=row["setting"]["decoding.mode"], tol=0.05)
        stats = fidlib.FeatureStats()
        for chunk in chunks:
            pixels = to_uint8(generate(model, chunk, guidance, decoding, seed=0)[0])
            stats.add(fidlib.extract_features(pixels, fidlib.pooled_pixels, "cpu"), chunk, [i < kid_max for i in chunk])
        direct = fidlib.fid_and_kid(stats, ref, seed=0)
        for key in ("fid", "kid", "kid_std"):
            assert row[key] == direct[key], (row["setting"], key)
    assert len({r["fid"] for r in rows}) == 4
