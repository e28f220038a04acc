"""The trainer's per-worker function in one process without Ray (training/single_rank.py, what the GPU proof runs):
one data loader per launch across checkpoints, and a resumed run that sees the batches of an uninterrupted one."""

from __future__ import annotations

import numpy as np
import pytest

from tarflow_scale.artifacts.checkpoints import complete_checkpoints
from tarflow_scale.config import load_config
from tarflow_scale.data import write_split
from tarflow_scale.data.sources import ArraySource
from tarflow_scale.training.metrics import read_metrics

pytestmark = pytest.mark.slow  # a DeepSpeed engine per test (its CPU op build starts a process)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    images = np.random.default_rng(0).integers(0, 256, size=(48, 8, 8, 3), dtype=np.uint8)
    source = ArraySource(images, np.zeros(48, int), [f"img{i:03d}" for i in range(48)], 0, [], {"kind": "test"})
    write_split(str(root), source, name="t", split="train", samples_per_shard=16, progress=False)
    return root


def config(shards, run_dir, num_steps: int):
    return load_config(
        None,
        [
            f"run_dir={run_dir}", f"data.path={shards}", "data.num_workers=1", "data.shuffle_buffer=8",
            "model.image_size=8", "model.patch_size=2", "model.channels=32", "model.head_dim=16",
            "model.num_blocks=2", "model.layers_per_block=1", "cluster.num_workers=1", "train.global_batch_size=4",
            "train.micro_batch_size=2", f"train.num_steps={num_steps}", "train.checkpoint_every=2",
            "train.log_every=1", "train.sample_every=0", "train.num_samples=1", "optim.warmup_steps=1",
        ],
    )  # fmt: skip


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


@pytest.mark.parametrize("stop_after", [2, 3], ids=["at_a_boundary", "between_boundaries"])
def test_checkpoints_keep_the_loader_and_a_resumed_run_sees_the_same_batches(shards, tmp_path, monkeypatch, stop_after):
    """Six steps, a checkpoint every two: one loader serves every segment; a run stopped (as by Ctrl-C) after
    `stop_after` steps and resumed logs the uninterrupted run's losses bit for bit (between boundaries, the resumed
    launch replays its segment up to where the stop left it)."""
    from tarflow_scale.training import trainer
    from tarflow_scale.training.single_rank import run_single_rank

    built = []
    make = trainer.make_train_loader
    monkeypatch.setattr(trainer, "make_train_loader", lambda *args, **kwargs: built.append(1) or make(*args, **kwargs))
    whole = tmp_path / "whole"
    reports = run_single_rank(config(shards, whole, 6))
    assert [r["step"] for r in reports] == [2, 4, 6]  # a checkpoint at every boundary
    assert len(built) == 1, "the loader must outlive the checkpoints"
    assert [p.name for p in complete_checkpoints(whole)][-1] == "checkpoint_00000006"
    assert (whole / "model.safetensors").is_file()

    asked = []  # rank 0 asks once per step, at its last micro-batch: stop after `stop_after` steps
    monkeypatch.setattr(trainer, "stop_requested", lambda run_dir: asked.append(1) or len(asked) == stop_after)
    split = tmp_path / "split"
    run_single_rank(config(shards, split, 6))
    assert max(losses(split)) == stop_after
    run_single_rank(config(shards, split, 6))  # the same command resumes from the stop's checkpoint
    assert len(built) == 3  # one per launch
    expected, resumed = losses(whole), losses(split)
    assert sorted(resumed) == list(range(1, 7))
    for step, loss in resumed.items():
        assert loss == expected[step], (step, loss, expected[step])
