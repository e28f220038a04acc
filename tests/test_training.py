"""Ray Train + DeepSpeed training on 2 CPU workers (gloo): ZeRO-2/3, checkpoints, exact resume, worker death,
non-finite losses, and export. One embedded Ray cluster serves the whole module."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tarflow_scale.artifacts import CheckpointError, PretrainedTarFlow, export_checkpoint, load_model
from tarflow_scale.artifacts.checkpoints import latest_checkpoint
from tarflow_scale.config import load_config
from tarflow_scale.data import write_split
from tarflow_scale.data.sources import ArraySource
from tarflow_scale.training.metrics import read_metrics
from tarflow_scale.training.trainer import FAULT_AT_STEP_ENV, probe_batch

pytestmark = pytest.mark.slow

NUM_STEPS = 6


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    from tarflow_scale.training.cluster import init_ray

    init_ray("local")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Smooth random 8x8 images in 2 classes: small enough for seconds per run, real PNG shards."""
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(64, 2, 2, 3))
    images = np.kron(base, np.ones((1, 4, 4, 1))).astype(np.uint8)  # (64, 8, 8, 3) blocky images
    source = ArraySource(
        images=images,
        labels=np.arange(64) % 2,
        keys=[f"img{i:03d}" for i in range(64)],
        num_classes=2,
        class_names=["a", "b"],
        description={"kind": "test"},
    )
    write_split(str(root), source, name="tiny", split="train", samples_per_shard=16, progress=False)
    return root


def run_config(dataset: Path, run_dir: Path, *overrides: str):
    return load_config(
        None,
        [
            f"run_dir={run_dir}",
            f"data.path={dataset}",
            "data.image_size=0",
            "data.shuffle_buffer=16",
            "data.num_workers=0",
            "data.noise=gaussian",  # the non-finite test injects an infinite noise_std
            "model.image_size=8",
            "model.patch_size=2",
            "model.channels=32",
            "model.head_dim=16",
            "model.num_blocks=2",
            "model.layers_per_block=1",
            "model.num_classes=2",
            "optim.lr=3e-3",
            "optim.warmup_steps=1",
            f"train.num_steps={NUM_STEPS}",
            "train.global_batch_size=16",
            "train.micro_batch_size=4",  # 2 accumulation steps per optimizer step
            "train.log_every=1",
            "train.checkpoint_every=3",
            "train.sample_every=0",
            "train.num_samples=4",
            "cluster.num_workers=2",
            *overrides,
        ],
    )


def step_losses(run_dir: Path) -> dict[int, float]:
    """Loss per step; a step redone after a restart keeps its last record."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


@pytest.fixture(scope="module")
def zero2_run(ray_cluster, dataset, tmp_path_factory) -> Path:
    from tarflow_scale.training.cluster import launch

    run_dir = tmp_path_factory.mktemp("runs") / "zero2"
    launch(run_config(dataset, run_dir, "deepspeed.zero_stage=2"))
    return run_dir


def check_finished_run(run_dir: Path) -> None:
    losses = step_losses(run_dir)
    assert sorted(losses) == list(range(1, NUM_STEPS + 1))
    assert all(np.isfinite(list(losses.values())))
    first, last = np.mean([losses[1], losses[2]]), np.mean([losses[NUM_STEPS - 1], losses[NUM_STEPS]])
    assert last < first, f"loss did not decrease: {losses}"
    kept = sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert kept == ["checkpoint_00000003", "checkpoint_00000006"]
    for checkpoint in kept:
        assert (run_dir / checkpoint / "latest").read_text().strip() == f"step_{int(checkpoint[-8:]):08d}"
        assert (run_dir / checkpoint / "config.yaml").is_file()
    assert (run_dir / "samples" / f"step_{NUM_STEPS:08d}.png").is_file()


def check_export_matches_engine(run_dir: Path, tmp_path: Path) -> None:
    """The trainer's own export (gathered from the live engine) equals the export of the ZeRO checkpoint (read by
    our weights-only reader) and DeepSpeed's own consolidation of it, and the exported model reproduces the
    engine's log-likelihood on the probe batch."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    from tarflow_scale.artifacts.checkpoints import strip_wrapper_prefixes

    exported = export_checkpoint(latest_checkpoint(run_dir), tmp_path / "from_checkpoint.safetensors")
    live = load_file(run_dir / "model.safetensors")
    consolidated = load_file(exported)
    by_deepspeed = strip_wrapper_prefixes(get_fp32_state_dict_from_zero_checkpoint(str(latest_checkpoint(run_dir))))
    assert live.keys() == consolidated.keys() == by_deepspeed.keys()
    for key in live:
        assert torch.equal(live[key], consolidated[key]), key
        assert torch.equal(by_deepspeed[key], consolidated[key]), key

    model = load_model(exported)
    config = load_config(run_dir / "config.yaml")
    x, y = probe_batch(config)
    engine_log_prob = [r for r in read_metrics(run_dir) if "probe_log_prob" in r][-1]["probe_log_prob"]
    with torch.no_grad():
        torch.testing.assert_close(model.log_prob(x, y), torch.tensor(engine_log_prob), rtol=1e-5, atol=1e-4)
        samples = model.sample(4, y=torch.tensor([0, 1, 0, 1]))
    assert samples.shape == (4, 3, 8, 8) and torch.isfinite(samples).all()
    sidecar = json.loads(exported.with_suffix(".json").read_text())
    assert sidecar["num_classes"] == 2


def test_zero2_trains_checkpoints_and_exports(zero2_run, tmp_path):
    check_finished_run(zero2_run)
    check_export_matches_engine(zero2_run, tmp_path)
    # A run directory loads directly (its newest checkpoint, consolidated on the fly) into the same weights.
    from_run_dir = load_model(zero2_run).state_dict()
    exported = load_model(zero2_run / "model.safetensors").state_dict()
    assert all(torch.equal(from_run_dir[k], exported[k]) for k in exported)


def test_zero3_trains_checkpoints_and_exports(ray_cluster, dataset, tmp_path):
    from tarflow_scale.training.cluster import launch

    run_dir = tmp_path / "zero3"
    launch(run_config(dataset, run_dir, "deepspeed.zero_stage=3"))
    check_finished_run(run_dir)
    check_export_matches_engine(run_dir, tmp_path)


def test_killed_worker_restarts_from_checkpoint_and_matches_uninterrupted(zero2_run, dataset, tmp_path, monkeypatch):
    from tarflow_scale.training.cluster import launch

    run_dir = tmp_path / "killed"
    monkeypatch.setenv(FAULT_AT_STEP_ENV, "4")
    launch(run_config(dataset, run_dir, "cluster.max_failures=1"))
    assert (run_dir / ".fault_injected").is_file(), "the fault was never injected"
    steps = [r["step"] for r in read_metrics(run_dir)]
    assert steps.count(4) == 2, "step 4 must run twice: before the kill and after the restart from step 3"
    expected = step_losses(zero2_run)
    for step, loss in step_losses(run_dir).items():
        assert abs(loss - expected[step]) < 1e-6, (step, loss, expected[step])


def test_rerunning_a_failed_run_resumes_where_it_stopped(zero2_run, dataset, tmp_path, monkeypatch):
    from tarflow_scale.training.cluster import launch

    run_dir = tmp_path / "rerun"
    monkeypatch.setenv(FAULT_AT_STEP_ENV, "4")
    config = run_config(dataset, run_dir, "cluster.max_failures=0")
    with pytest.raises(Exception, match="(?i)fail|died|error"):
        launch(config)
    assert max(step_losses(run_dir)) == 4
    launch(run_config(dataset, run_dir, "cluster.max_failures=0"))
    expected = step_losses(zero2_run)
    losses = step_losses(run_dir)
    assert sorted(losses) == list(range(1, NUM_STEPS + 1))
    for step, loss in losses.items():
        assert abs(loss - expected[step]) < 1e-6, (step, loss, expected[step])


def test_nonfinite_losses_stop_the_run_with_a_clear_error(ray_cluster, dataset, tmp_path):
    from tarflow_scale.training.cluster import launch
    from tarflow_scale.training.trainer import NonFiniteLossError

    run_dir = tmp_path / "nan"
    config = run_config(
        dataset, run_dir, "data.noise_std=.inf", "train.max_nonfinite_in_a_row=2", "cluster.max_failures=2"
    )
    # The worker's own error, raised at once: a retry would diverge again (Ray's wrapper would be WorkerGroupError).
    with pytest.raises(NonFiniteLossError, match="non-finite losses in a row"):
        launch(config)
    assert not list(run_dir.glob("checkpoint_*")), "no checkpoint may be written from non-finite weights"


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere.safetensors")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        export_checkpoint(tmp_path, tmp_path / "out.safetensors")


def test_wrong_image_size_or_classes_is_named_before_any_worker_starts(dataset, tmp_path):
    from tarflow_scale.config import ConfigError
    from tarflow_scale.training.cluster import check_data_matches_model

    with pytest.raises(ConfigError, match=r"holds 3x8x8 images but the model expects 3x16x16"):
        check_data_matches_model(run_config(dataset, tmp_path, "model.image_size=16"))
    with pytest.raises(ConfigError, match=r"model.num_classes=5 but data.path=.* has 2 classes"):
        check_data_matches_model(run_config(dataset, tmp_path, "model.num_classes=5"))
    check_data_matches_model(run_config(dataset, tmp_path))  # the matching config passes


def test_activation_checkpointing_and_ema(ray_cluster, dataset, tmp_path):
    """Recomputed activations give the same losses; the EMA weights are checkpointed and export on request."""
    from safetensors.torch import load_file

    from tarflow_scale.training.cluster import launch

    run_dir = tmp_path / "ckpt_ema"
    launch(
        run_config(
            dataset, run_dir, "deepspeed.activation_checkpointing=true", "optim.ema_decay=0.5", "train.num_steps=3"
        )
    )
    plain = tmp_path / "plain"
    launch(run_config(dataset, plain, "train.num_steps=3"))
    for step, loss in step_losses(plain).items():
        assert abs(step_losses(run_dir)[step] - loss) < 1e-6, "activation checkpointing must not change the maths"
    ema = export_checkpoint(run_dir, tmp_path / "ema.safetensors", use_ema=True)
    raw = load_file(run_dir / "model.safetensors")
    averaged = load_file(ema)
    assert raw.keys() == averaged.keys(), "checkpoint-wrapper prefixes must not leak into exports"
    assert any(not torch.equal(raw[k], averaged[k]) for k in raw), "EMA weights should lag the raw weights"
    assert load_model(ema).config.num_classes == 2


def test_init_from_starts_from_those_weights_with_a_fresh_schedule(ray_cluster, dataset, tmp_path):
    """train.init_from: the run's first weights are the file's (non-zero heads, unlike a fresh init); step 1 on."""
    from tarflow_scale.artifacts import save_export
    from tarflow_scale.models.tarflow import TarFlow
    from tarflow_scale.training.cluster import launch

    steps = ["train.num_steps=2", "train.checkpoint_every=2", "optim.lr=1e-9", "optim.min_lr=1e-10"]
    config = run_config(dataset, tmp_path / "ft", *steps)
    torch.manual_seed(11)
    init = TarFlow(config.model)
    with torch.no_grad():
        for block in init.blocks:
            block.proj_out.weight.normal_(0, 0.05)
    path = save_export(init.state_dict(), config, tmp_path / "init.safetensors", source="t", tag="t", ema=False)
    launch(run_config(dataset, tmp_path / "ft", *steps, f"train.init_from={path}"))
    assert sorted(step_losses(tmp_path / "ft")) == [1, 2]  # a fresh schedule: steps count from 1
    final, start = load_model(tmp_path / "ft" / "model.safetensors").state_dict(), init.state_dict()
    for key in start:  # lr 1e-9: two steps leave the initial weights in place
        torch.testing.assert_close(final[key], start[key], atol=1e-6, rtol=0)
    # The run directory publishes as a model directory whose card names the data and the steps.
    import tarflow_scale.cli.export as export_cli

    assert export_cli.main([str(tmp_path / "ft"), str(tmp_path / "published"), "--format", "dir"]) == 0
    card = (tmp_path / "published" / "README.md").read_text()
    assert str(dataset) in card and "| steps | 2 " in card
    published = PretrainedTarFlow.from_pretrained(tmp_path / "published").state_dict()
    assert all(torch.equal(published[k], final[k]) for k in final)


def test_bf16_run_in_a_file_uri_run_dir_exports_the_fp32_master_weights(ray_cluster, dataset, tmp_path):
    """deepspeed.precision=bf16 (trunk autocast) trains on 2 gloo workers; run_dir given as a file:// URI goes
    through Ray Train's storage; the trainer's export equals DeepSpeed's fp32 consolidation of the optimizer's
    master weights, and reproduces the engine's bf16-policy log-likelihood on the probe batch."""
    from safetensors.torch import load_file

    from tarflow_scale.training.cluster import launch

    run_dir = tmp_path / "bf16"
    launch(run_config(dataset, run_dir, f"run_dir={run_dir.as_uri()}", "deepspeed.precision=bf16"))
    check_finished_run(run_dir)
    live = load_file(run_dir / "model.safetensors")
    consolidated = load_file(export_checkpoint(latest_checkpoint(run_dir), tmp_path / "master.safetensors"))
    assert live.keys() == consolidated.keys()
    assert all(live[k].dtype == torch.float32 and torch.equal(live[k], consolidated[k]) for k in live)
    # The weights are not bf16-rounded: most values carry more than bf16's 8 significant bits.
    weights = live["blocks.0.layers.0.mlp.0.weight"]
    assert not torch.equal(weights, weights.bfloat16().float())
    model = load_model(run_dir / "model.safetensors").set_trunk_dtype(torch.bfloat16)
    x, y = probe_batch(load_config(run_dir / "config.yaml"))
    engine_log_prob = [r for r in read_metrics(run_dir) if "probe_log_prob" in r][-1]["probe_log_prob"]
    with torch.no_grad():
        torch.testing.assert_close(model.log_prob(x, y), torch.tensor(engine_log_prob), rtol=1e-5, atol=1e-3)


# ----------------------------------------------------------------------------------------------------------
# Reliability (docs/reliability.md): stop on SIGINT, damaged Ray snapshot, partial checkpoints, config changes


def test_sigint_stops_at_a_step_boundary_with_a_final_checkpoint_and_resumes_exactly(zero2_run, dataset, tmp_path):
    """Ctrl-C on the driver: the workers agree on a step, write a complete checkpoint there and return; the next
    run and the export take that checkpoint, and the resumed losses equal the uninterrupted run's (the data
    stream is replayed from its boundary even when the stop falls between checkpoint_every steps)."""
    import os
    import signal
    import threading
    import time

    from tarflow_scale.training.cluster import launch
    from tarflow_scale.training.run_state import STOP_FILE, RunStopped

    run_dir = tmp_path / "sigint"

    def interrupt_once_the_handler_is_installed():
        # Ray's blocking wait runs Python signal handlers only every so often, so a Ctrl-C at step 1 of a run this
        # small could land after the last step: send it while the worker group is still starting instead.
        deadline = time.time() + 120
        while time.time() < deadline and "ReliableTorchTrainer" not in getattr(
            signal.getsignal(signal.SIGINT), "__qualname__", ""
        ):
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_once_the_handler_is_installed, daemon=True).start()
    with pytest.raises(RunStopped) as stopped:
        launch(run_config(dataset, run_dir))
    step = stopped.value.step
    assert 1 <= step < NUM_STEPS, f"stop must come at a step boundary before the end, got {step}"
    final = run_dir / f"checkpoint_{step:08d}"
    assert stopped.value.checkpoint == final and latest_checkpoint(run_dir) == final
    assert signal.getsignal(signal.SIGINT) is not None and not (run_dir / STOP_FILE).exists()
    assert max(step_losses(run_dir)) == step, "no step may run past the stop"

    launch(run_config(dataset, run_dir))  # the same command resumes from the stop checkpoint
    expected = step_losses(zero2_run)
    losses = step_losses(run_dir)
    assert sorted(losses) == list(range(1, NUM_STEPS + 1))
    for k, loss in losses.items():
        assert loss == expected[k], (k, loss, expected[k], f"stopped at {step}")


def test_damaged_snapshot_and_partial_checkpoint_resume_from_newest_complete(zero2_run, dataset, tmp_path):
    """The full-disk aftermath: Ray's snapshot at 0 bytes and a checkpoint folder with `latest` but no marker.
    The re-run warns, resumes from the newest complete checkpoint, and export agrees; extending num_steps is a
    safe change that is allowed and recorded, while changing optim.lr is refused before any worker starts."""
    import shutil

    from tarflow_scale.artifacts.checkpoints import IncompleteCheckpointWarning
    from tarflow_scale.config import ConfigError
    from tarflow_scale.training.cluster import launch
    from tarflow_scale.training.run_state import RAY_SNAPSHOT

    run_dir = tmp_path / "full_disk"
    shutil.copytree(zero2_run, run_dir)
    (run_dir / RAY_SNAPSHOT).write_text("")
    partial = run_dir / "checkpoint_00000009"
    shutil.copytree(run_dir / "checkpoint_00000006", partial)
    (partial / "complete.json").unlink()  # the save never finished
    with pytest.raises(ConfigError, match=r"optim.lr: 0.003 -> 0.001"):
        launch(run_config(dataset, run_dir, f"train.num_steps={NUM_STEPS + 1}", "optim.lr=1e-3"))
    assert load_config(run_dir / "config.yaml").train.num_steps == NUM_STEPS, "config.yaml must be untouched"

    with pytest.warns(IncompleteCheckpointWarning, match="checkpoint_00000009"):
        launch(run_config(dataset, run_dir, f"train.num_steps={NUM_STEPS + 1}"))
    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert steps.count(NUM_STEPS + 1) == 1 and steps.count(NUM_STEPS) == 1, "resumed from step 6, not from 0 or 9"
    with pytest.warns(IncompleteCheckpointWarning, match="checkpoint_00000009"):
        assert latest_checkpoint(run_dir).name == f"checkpoint_{NUM_STEPS + 1:08d}"
    assert list(run_dir.glob(f"{RAY_SNAPSHOT}.damaged-*")), "the damaged snapshot is kept aside for inspection"
    assert len(list((run_dir / "config_history").glob("*.yaml"))) == 2  # the original run and this resume
