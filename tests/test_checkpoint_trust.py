"""Nothing read from a checkpoint folder is trusted (docs/reliability.md): weights are read without unpickling (a
pickle planted in the engine state runs nothing in export, sample or eval, and the error names the file), every
file's sha256 is verified (a flipped byte is caught by resume, export and eval), a resume unpickles only the user's
own files, and non-finite weights or results are never published."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tarflow_scale.artifacts import CheckpointError, export_checkpoint, load_model, save_export
from tarflow_scale.artifacts.checkpoints import (
    COMPLETE_FILE,
    DamagedCheckpointWarning,
    latest_checkpoint,
    write_complete_marker,
)
from tarflow_scale.artifacts.zero_weights import read_zero_weights
from tarflow_scale.config import RunConfig, dump_config, load_config
from tarflow_scale.training.run_state import check_resume

# A model whose tensors have odd sizes (channels 15), so that ZeRO's padding of partitions and groups matters.
ODD_MODEL = ["model.image_size=8", "model.patch_size=2", "model.channels=15", "model.head_dim=5",
             "model.num_blocks=2", "model.layers_per_block=1"]  # fmt: skip


class Planted:
    """Pickles as a call to `open(marker, "w")`: unpickling it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path: Path, marker: Path) -> None:
    """Add a Planted object to a (trusted, our own) engine-state file, as an attacker with write access would."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    state["planted"] = Planted(marker)
    torch.save(state, path)


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def copy_run(run_dir: Path, to: Path) -> Path:
    """The checkpoints of a run directory, copied (owned by the current user)."""
    to.mkdir(parents=True)
    for folder in sorted(run_dir.glob("checkpoint_*")):
        shutil.copytree(folder, to / folder.name)
    return to


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


# ------------------------------------------------------------------------------------------------------------
# Real checkpoints from the trainer (one rank, in this process) and from two-rank DeepSpeed engines


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from tarflow_scale.data import write_split
    from tarflow_scale.data.sources import ArraySource

    root = tmp_path_factory.mktemp("shards")
    images = np.random.default_rng(0).integers(0, 256, size=(16, 8, 8, 3), dtype=np.uint8)
    source = ArraySource(images, np.zeros(16, int), [f"img{i:03d}" for i in range(16)], 0, [], {"kind": "test"})
    for split in ("train", "val"):
        write_split(str(root), source, name="t", split=split, samples_per_shard=16, progress=False)
    return root


def single_rank_config(shards: Path, run_dir: Path, num_steps: int) -> RunConfig:
    return load_config(None, [
        f"run_dir={run_dir}", f"data.path={shards}", "data.num_workers=0", "data.shuffle_buffer=8", *ODD_MODEL,
        "cluster.num_workers=1", "train.global_batch_size=2", "train.micro_batch_size=2",
        f"train.num_steps={num_steps}", "train.checkpoint_every=1", "train.log_every=1", "train.sample_every=0",
        "train.num_samples=1", "optim.warmup_steps=1",
    ])  # fmt: skip


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory) -> Path:
    """A run directory with two sealed ZeRO-2 checkpoints (steps 1 and 2), written by the trainer itself."""
    from tarflow_scale.training.single_rank import run_single_rank

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    run_single_rank(single_rank_config(shards, run_dir, 2))
    return run_dir


TWO_RANK_SCRIPT = """
import os, sys
folder, stage, rank, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                  DS_ACCELERATOR="cpu")
import torch, torch.distributed as dist
dist.init_process_group("gloo")
import deepspeed
from tarflow_scale.config import load_config
from tarflow_scale.models.tarflow import TarFlow
from tarflow_scale.training.deepspeed_config import build_deepspeed_config
from tarflow_scale.training.trainer import param_groups
config = load_config(None, sys.argv[5:] + ["cluster.num_workers=2", f"deepspeed.zero_stage={stage}",
                                           "train.global_batch_size=4", "train.micro_batch_size=2"])
torch.manual_seed(0)
model = TarFlow(config.model)
engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.01),
                                       config=build_deepspeed_config(config), dist_init_required=False)
torch.manual_seed(1 + rank)
for _ in range(2):
    z, log_det = engine(torch.rand(2, 3, 8, 8) * 2 - 1, None)
    engine.backward(-(engine.module.prior(z) + log_det).mean())
    engine.step()
engine.save_checkpoint(folder, tag="step_00000002")
# Leave together: a rank exiting while the other is still inside gloo aborts it (terminate without an exception).
dist.barrier()
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_rank_checkpoint(folder: Path, stage: int) -> Path:
    """A ZeRO-`stage` checkpoint written by two DeepSpeed engines (gloo, CPU), sealed as the trainer seals one."""
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", TWO_RANK_SCRIPT, str(folder), str(stage), str(rank), port, *ODD_MODEL],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        for rank in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0].decode(errors="replace") for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]
    dump_config(load_config(None, [*ODD_MODEL, "cluster.num_workers=2"]), folder / "config.yaml")
    write_complete_marker(folder, step=2, world_size=2)
    return folder


@pytest.mark.slow  # DeepSpeed engines in child processes
def test_the_weights_only_reader_gives_deepspeed_s_own_consolidation_at_zero_1_2_3(trained, tmp_path):
    """Our reader (torch's weights-only unpickler) and DeepSpeed's zero_to_fp32 (which unpickles) agree exactly on
    real checkpoints: two ranks at ZeRO 1, 2 and 3 with odd-sized tensors (padding), and the trainer's own."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    folders = [two_rank_checkpoint(tmp_path / f"zero{stage}", stage) for stage in (1, 2, 3)]
    folders.append(latest_checkpoint(trained))
    for folder in folders:
        expected = get_fp32_state_dict_from_zero_checkpoint(str(folder))
        ours = read_zero_weights(folder)
        assert ours.keys() == expected.keys(), folder
        for name, tensor in expected.items():
            assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), (folder, name)
        assert len(expected) > 30 and any(t.numel() % 2 for t in expected.values())  # odd sizes were exercised
    # Two ranks, different data: the ranks' partitions hold the same replicated weights after the all-reduce, so a
    # wrongly stitched ZeRO-3 tensor would still differ in layout from DeepSpeed's: checked above, key by key.
    assert json.loads((folders[2] / COMPLETE_FILE).read_text())["world_size"] == 2


# ------------------------------------------------------------------------------------------------------------
# A planted pickle runs nothing in export, sample and eval


@pytest.mark.slow  # the `trained` fixture runs a DeepSpeed engine
@pytest.mark.parametrize("target", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_a_planted_pickle_runs_nothing_in_export_sample_and_eval(trained, tmp_path, capsys, target):
    import tarflow_scale.cli.eval as eval_cli
    import tarflow_scale.cli.export as export_cli
    import tarflow_scale.cli.sample as sample_cli

    run_dir = copy_run(trained, tmp_path / "run")
    folder = run_dir / "checkpoint_00000002"
    file = folder / "step_00000002" / target
    marker = tmp_path / "code_ran"
    plant(file, marker)
    write_complete_marker(folder, step=2, world_size=1)  # resealed: the checksums cannot tell (the attacker's own)
    for given in (folder, run_dir):
        with pytest.raises(CheckpointError, match=rf"{file}.*refused unread"):
            load_model(given)
        assert export_cli.main([str(given), str(tmp_path / "out.safetensors")]) == 2
        assert str(file) in one_line(capsys.readouterr().err)
        assert sample_cli.main([str(given), "--num", "1", "--out", str(tmp_path / "s")]) == 2
        assert str(file) in one_line(capsys.readouterr().err)
        assert eval_cli.main([str(given), "--out", str(tmp_path / "e"), "eval.jobs=[sample]"]) == 2
        assert str(file) in one_line(capsys.readouterr().err)
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists() and not (tmp_path / "s").exists()
    torch.load(file, map_location="cpu", weights_only=False)  # the plant is live: unpickling runs it
    assert marker.exists()


# ------------------------------------------------------------------------------------------------------------
# A flipped byte in any file is caught by resume, export and eval


@pytest.mark.slow  # the `trained` fixture runs a DeepSpeed engine
def test_a_flipped_byte_in_any_checkpoint_file_is_caught_by_resume_export_and_eval(trained, tmp_path, capsys):
    import tarflow_scale.cli.eval as eval_cli

    names = sorted(json.loads((trained / "checkpoint_00000002" / COMPLETE_FILE).read_text())["sha256"])
    assert {"config.yaml", "latest", "step_00000002/mp_rank_00_model_states.pt"} <= set(names)
    for k, name in enumerate(names):
        run_dir = copy_run(trained, tmp_path / f"run{k}")
        damaged, intact = run_dir / "checkpoint_00000002", run_dir / "checkpoint_00000001"
        flip_byte(damaged / name)
        # Named explicitly: an error naming the file, in export, eval and resume (train.resume_from).
        with pytest.raises(CheckpointError, match=rf"{damaged / name} differs from the sha256"):
            export_checkpoint(damaged, tmp_path / "x.safetensors")
        assert eval_cli.main([str(damaged), "--out", str(tmp_path / "e"), "eval.jobs=[sample]"]) == 2
        assert f"{damaged / name} differs from the sha256" in one_line(capsys.readouterr().err)
        resume_from = load_config(None, [f"run_dir={tmp_path / 'new'}", "cluster.num_workers=1",
                                         f"train.resume_from={damaged}"])  # fmt: skip
        with pytest.raises(CheckpointError, match=rf"{damaged / name} differs"):
            check_resume(resume_from)
        # In a run directory: skipped with a warning naming the file; the previous checkpoint is taken.
        with pytest.warns(DamagedCheckpointWarning, match=rf"skipping damaged checkpoint {damaged}: {damaged / name}"):
            assert latest_checkpoint(run_dir) == intact
        config = load_config(str(intact / "config.yaml"), [f"run_dir={run_dir}"])  # the same run, re-launched
        with pytest.warns(DamagedCheckpointWarning):
            assert check_resume(config).checkpoint == intact
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.slow  # DeepSpeed engines in this process
def test_the_trainer_resumes_from_the_newest_intact_checkpoint_and_only_from_the_user_s_own(
    trained, shards, tmp_path, monkeypatch
):
    """The worker side of resume: a damaged newest checkpoint is skipped (rank 0 verifies, every rank takes its
    choice); a folder that is not the user's is refused before DeepSpeed unpickles it, unless trusted."""
    from tarflow_scale.training.metrics import read_metrics
    from tarflow_scale.training.single_rank import run_single_rank

    run_dir = copy_run(trained, tmp_path / "run")
    flip_byte(run_dir / "checkpoint_00000002" / "step_00000002" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.warns(DamagedCheckpointWarning, match="zero_pp_rank_0_mp_rank_00_optim_states.pt differs"):
        run_single_rank(single_rank_config(shards, run_dir, 3))
    resumed = [r["resumed_from"] for r in read_metrics(run_dir) if "resumed_from" in r]
    assert resumed == [str(run_dir / "checkpoint_00000001")]
    assert latest_checkpoint(run_dir).name == "checkpoint_00000003"

    # Someone else's checkpoint with a pickle planted in it: refused naming a file; nothing runs.
    foreign = copy_run(trained, tmp_path / "foreign")
    marker = tmp_path / "code_ran"
    plant(foreign / "checkpoint_00000002" / "step_00000002" / "mp_rank_00_model_states.pt", marker)
    write_complete_marker(foreign / "checkpoint_00000002", step=2, world_size=1)
    monkeypatch.setattr(os, "geteuid", lambda: os.getuid() + 1)  # the files now belong to another user
    with pytest.raises(CheckpointError, match=r"belongs to .*not to you.*--trust-checkpoint"):
        run_single_rank(single_rank_config(shards, foreign, 3))
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------------------
# Fast: the trust rule, sealing, the reader's refusals, non-finite weights and results


def fake_checkpoint(run_dir: Path, step: int = 10) -> Path:
    folder = run_dir / f"checkpoint_{step:08d}"
    (folder / f"step_{step:08d}").mkdir(parents=True)
    (folder / "latest").write_text(f"step_{step:08d}")
    engine_file = folder / f"step_{step:08d}" / "mp_rank_00_model_states.pt"
    engine_file.write_bytes(b"x" * 100)
    os.chmod(engine_file, 0o666)  # as a umask of 0 would leave it
    dump_config(load_config(None, [f"run_dir={run_dir}", "cluster.num_workers=1"]), folder / "config.yaml")
    write_complete_marker(folder, step, world_size=1)
    return folder


def test_resume_refuses_a_checkpoint_that_is_not_the_user_s_own_unless_trusted(tmp_path, monkeypatch):
    folder = fake_checkpoint(tmp_path / "run")
    engine_file = folder / "step_00000010" / "mp_rank_00_model_states.pt"
    assert all(not p.stat().st_mode & 0o022 for p in folder.rglob("*") if p.is_file())  # sealed read-only for others
    config = load_config(None, [f"run_dir={tmp_path / 'run'}", "cluster.num_workers=1"])
    assert check_resume(config).checkpoint == folder  # the user's own: resumed
    os.chmod(engine_file, 0o664)  # a colleague in the group could have rewritten it
    with pytest.raises(CheckpointError, match=rf"{engine_file} is writable by group .*--trust-checkpoint"):
        check_resume(config)
    assert check_resume(config, trust=True).checkpoint == folder
    os.chmod(engine_file, 0o644)
    monkeypatch.setattr(os, "geteuid", lambda: os.getuid() + 1)
    with pytest.raises(CheckpointError, match=r"unpickles its DeepSpeed engine state.*belongs to .*not to you"):
        check_resume(config)
    other = load_config(None, [f"run_dir={tmp_path / 'new'}", "cluster.num_workers=1", f"train.resume_from={folder}"])
    with pytest.raises(CheckpointError, match="not to you"):
        check_resume(other)
    assert check_resume(other, trust=True).checkpoint == folder


def test_the_seal_records_the_checksums_the_ranks_computed_before_upload(tmp_path):
    """A file damaged between a rank's write and storage (a bad upload) keeps the rank's checksum in complete.json,
    so the damage is caught on read; the ranks' digest files are merged and removed."""
    from tarflow_scale.artifacts.checkpoints import DIGESTS_PREFIX, write_rank_digests

    local, stored = tmp_path / "rank_tmp", tmp_path / "run" / "checkpoint_00000010"
    (local / "step_00000010").mkdir(parents=True)
    (local / "latest").write_text("step_00000010")
    (local / "step_00000010" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(bytes(range(256)) * 4)
    dump_config(load_config(None, [f"run_dir={tmp_path / 'run'}", "cluster.num_workers=2"]), local / "config.yaml")
    write_rank_digests(local, rank=1)
    shutil.copytree(local, stored)  # the upload
    flip_byte(stored / "step_00000010" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    write_complete_marker(stored, step=10, world_size=2)
    assert not list(stored.glob(f"{DIGESTS_PREFIX}*"))
    with pytest.raises(CheckpointError, match="zero_pp_rank_1_mp_rank_00_optim_states.pt differs from the sha256"):
        latest_checkpoint(stored)


def test_a_process_adopting_the_driver_s_verification_hashes_only_what_changed_since(tmp_path, monkeypatch):
    """The driver hashes the checkpoint a run resumes from; rank 0, handed that verification, does not hash the
    unchanged folder again, but does hash (and catches) one whose files changed after the driver looked."""
    from tarflow_scale.artifacts import checkpoints

    folder = fake_checkpoint(tmp_path)
    monkeypatch.setattr(checkpoints, "_VERIFIED", {})
    latest_checkpoint(folder)  # the driver: hashes every file
    handed = checkpoints.verified_signatures()
    assert str(folder.resolve()) in handed

    monkeypatch.setattr(checkpoints, "_VERIFIED", {})  # rank 0: another process
    hashed = []
    real = checkpoints._hash_files
    monkeypatch.setattr(checkpoints, "_hash_files", lambda paths: hashed.extend(paths) or real(paths))
    checkpoints.adopt_verified(handed)
    assert latest_checkpoint(folder) == folder and hashed == []
    damaged = folder / "step_00000010" / "mp_rank_00_model_states.pt"
    os.chmod(damaged, 0o644)
    flip_byte(damaged)
    os.utime(damaged, ns=(0, 1))  # changed after the driver's look, whatever the clock's resolution
    with pytest.raises(CheckpointError, match="differs from the sha256"):
        latest_checkpoint(folder)
    assert hashed, "a file that changed since the driver's verification is hashed again"


def test_a_checkpoint_without_checksums_or_with_an_added_file_is_damaged(tmp_path):
    folder = fake_checkpoint(tmp_path)
    marker = folder / COMPLETE_FILE
    (folder / "step_00000010" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"y")
    with pytest.raises(CheckpointError, match="zero_pp_rank_1_mp_rank_00_optim_states.pt is not listed"):
        latest_checkpoint(folder)
    (folder / "step_00000010" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    record = json.loads(marker.read_text())
    del record["sha256"]
    os.chmod(marker, 0o644)
    marker.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="records no sha256"):
        latest_checkpoint(folder)


def test_the_reader_refuses_a_tag_outside_the_checkpoint_and_files_it_cannot_read(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "latest").write_text("../../elsewhere")
    with pytest.raises(CheckpointError, match="not an engine-state folder inside"):
        read_zero_weights(folder)
    (folder / "latest").write_text("step_1")
    (folder / "step_1").mkdir()
    planted = {"buffer_names": [], "param_shapes": [], "module": {}, "shared_params": {}, "x": Planted(tmp_path / "m")}
    torch.save(planted, folder / "step_1" / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states.pt is not plain DeepSpeed engine state"):
        read_zero_weights(folder)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -2.8e36, 1.5e4])
def test_an_export_with_non_finite_or_huge_weights_is_refused_naming_the_tensor(tmp_path, value):
    from test_artifacts import random_model, training_run

    model = random_model()
    state = model.state_dict()
    state["blocks.1.layers.0.mlp.0.weight"][3, 2] = value
    with pytest.raises(CheckpointError, match=r"blocks\.1\.layers\.0\.mlp\.0\.weight holds .* at \[3, 2\]"):
        save_export(state, training_run(model), tmp_path / "m.safetensors", source="test", tag="t", ema=False)
    assert not (tmp_path / "m.safetensors").exists()
    state["blocks.1.layers.0.mlp.0.weight"][3, 2] = 9e3  # large, finite, within the bound: written
    save_export(state, training_run(model), tmp_path / "m.safetensors", source="test", tag="t", ema=False)


def test_a_non_finite_evaluation_result_is_one_line_and_publishes_nothing(tmp_path, monkeypatch, capsys):
    """The bits/dim of a model with a NaN weight: one line naming the result, no metrics.json (which would say
    `mean: null`) and no TensorBoard file (whose writer would crash on it); the evaluation's units are kept."""
    from test_eval import CLASSES, export, random_model

    import tarflow_scale.cli.eval as eval_cli
    import tarflow_scale.evaluation.orchestrate as orchestrate

    path = export(random_model(num_classes=CLASSES), tmp_path / "m.safetensors", noise="uniform")
    nan_bpd = {"dequantized": {"mean": float("nan"), "stderr": float("nan"), "num_images": 4}}
    # The pool and the jobs are stubbed (no Ray): the results reach the real report stage.
    monkeypatch.setattr(orchestrate, "init_ray", lambda *a, **k: False)
    monkeypatch.setattr(orchestrate, "WorkerPool", FakePool)
    monkeypatch.setattr(orchestrate, "run_sampling", lambda *a, **k: {"num_samples": 2, "denoise": {}, "files": {}})
    monkeypatch.setattr(orchestrate, "_check_data", lambda config, split: None)
    monkeypatch.setattr(orchestrate, "resolve_data_path", lambda data: data.path)
    monkeypatch.setattr(orchestrate, "run_bpd", lambda *a, **k: (nan_bpd, {}))
    monkeypatch.setattr(orchestrate, "write_per_image", lambda *a: None)
    monkeypatch.setattr(orchestrate.ray, "get_runtime_context", lambda: type("C", (), {"gcs_address": "x"})())
    monkeypatch.setattr(orchestrate.ray, "nodes", lambda: [])
    out = tmp_path / "e"
    assert eval_cli.main([str(path), "--out", str(out), "eval.jobs=[bpd]", "data.path=/d"]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("tarflow-eval: error: results.bpd.dequantized.mean = nan: ") and f"{out}/units" in line
    assert not (out / "metrics.json").exists() and not (out / "tensorboard").exists()


class FakePool:
    devices, startup_s, replaced = ["cpu"], 0.0, 0

    def __init__(self, *args, **kwargs):
        pass

    def close(self):
        pass


# ------------------------------------------------------------------------------------------------------------
# Sampling settings: the same rules from tarflow-sample's flags and eval.* keys (one validator)


@pytest.mark.parametrize(
    "flags, key, message",
    [
        (["--guidance", "nan"], "eval.guidance.weight=nan", "is not a finite number"),
        (["--guidance", "inf"], "eval.guidance.weight=inf", "is not a finite number"),
        (["--attn-temp", "0"], "eval.guidance.attn_temp=0", "must be a finite number > 0"),
        (["--attn-temp", "nan"], "eval.guidance.attn_temp=nan", "must be a finite number > 0"),
        (["--tol", "-1"], "eval.decoding.tol=-1", "must be a number >= 0"),
        (["--tol", "nan"], "eval.decoding.tol=nan", "must be a number >= 0"),
        (["--segment-size", "0"], "eval.decoding.segment_size=0", "must be >= 1"),
        (["--max-iters", "-1"], "eval.decoding.max_iters=-1", "must be >= 0"),
    ],
)
def test_sampling_flags_and_eval_keys_refuse_the_same_values_naming_them(tmp_path, capsys, flags, key, message):
    from tarflow_scale.cli.sample import main
    from tarflow_scale.config import ConfigError

    assert main([str(tmp_path / "missing.safetensors"), *flags]) == 2  # refused before the model is read
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"tarflow-sample: {flags[0]}=") and message in line
    with pytest.raises(ConfigError, match=re.escape(key.split("=")[0]) + "=.*" + re.escape(message)):
        load_config(None, [key])
