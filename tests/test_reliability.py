"""Reliability without Ray: config validation before any worker starts, override errors named, atomic writes,
complete-checkpoint markers, resume/config-change rules, Ray snapshot repair (docs/reliability.md)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from tarflow_scale import atomic
from tarflow_scale.artifacts import CheckpointError
from tarflow_scale.artifacts.checkpoints import (
    COMPLETE_FILE,
    IncompleteCheckpointWarning,
    complete_checkpoints,
    latest_checkpoint,
    write_complete_marker,
)
from tarflow_scale.config import ConfigError, RunConfig, dump_config, load_config
from tarflow_scale.training.run_state import RAY_SNAPSHOT, check_resume, record_config, repair_ray_snapshot


# -- item 9: every bad value is a ConfigError naming its key, raised by validate() (before Ray starts)
@pytest.mark.parametrize(
    "override, key",
    [
        ("train.global_batch_size=0", "train.global_batch_size"),  # micro_batch_size=0 now means derived
        ("model.patch_size=0", "model.patch_size"),  # was ZeroDivisionError
        ("train.global_batch_size=-32", "train.global_batch_size"),
        ("train.micro_batch_size=-16", "train.micro_batch_size"),
        ("train.checkpoint_every=0", "train.checkpoint_every"),
        ("train.log_every=0", "train.log_every"),
        ("optim.lr=.nan", "optim.lr"),
        ("optim.lr=.inf", "optim.lr"),
        ("optim.warmup_steps=-1", "optim.warmup_steps"),
        ("optim.betas=[0.9,1.5]", "optim.betas"),
        ("data.noise_std=.nan", "data.noise_std"),
        ("train.keep_checkpoints=0", "train.keep_checkpoints"),
        ("cluster.cpus_per_worker=0", "cluster.cpus_per_worker"),
    ],
)
def test_bad_values_are_config_errors_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_missing_resume_from_is_named_on_the_driver(tmp_path):
    config = load_config(None, [f"run_dir={tmp_path / 'run'}", f"train.resume_from={tmp_path / 'nowhere'}"])
    with pytest.raises(ConfigError, match="train.resume_from=.*nowhere does not exist"):
        check_resume(config)


# -- item 11: a typo on the command line is reported as an override, not as coming from the YAML file
def test_override_typo_is_named_as_an_override(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  num_steps: 5\n")
    with pytest.raises(ConfigError) as info:
        load_config(recipe, ["train.num_stepz=3"])
    message = str(info.value)
    assert message.startswith("command-line override: unknown config key train.num_stepz"), message
    assert str(recipe) not in message
    recipe.write_text("train:\n  num_stepz: 5\n")  # the same typo in the file names the file
    with pytest.raises(ConfigError, match=f"^{recipe}: unknown config key train.num_stepz"):
        load_config(recipe, [])


# -- item 12: atomic writes leave the old file intact when the writer fails (e.g. ENOSPC)
def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    atomic.write_text(path, "old\n")

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError, match="No space left"):
        dump_config(RunConfig(), path)
    monkeypatch.undo()
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"], "the temporary file must be removed"


def test_project_writers_go_through_atomic_paths():
    """No module writes a final file in place: every write_text/savez/save_image/save_file goes to a temp path."""
    package = Path(__file__).resolve().parents[1] / "tarflow_scale"
    offenders = []
    for path in package.rglob("*.py"):
        if "benchmarks" in path.parts or path.name == "atomic.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if any(w in code for w in (".write_text(", "np.savez(", "save_image(", "save_file(", ".save(")):
                if not any(ok in code for ok in ("tmp", "marker", "atomic.", "buffer", "store.")):  # buffer: memory
                    offenders.append(f"{path.relative_to(package)}:{number}: {line.strip()}")
    assert not offenders, offenders


# -- item 1: a checkpoint counts only once sealed; partial folders are skipped with a warning naming them
def fake_checkpoint(run_dir: Path, step: int, num_workers: int = 2, seal: bool = True, **overrides) -> Path:
    folder = run_dir / f"checkpoint_{step:08d}"
    folder.mkdir(parents=True)
    (folder / "latest").write_text(f"step_{step:08d}")
    (folder / f"step_{step:08d}").mkdir()
    (folder / f"step_{step:08d}" / "mp_rank_00_model_states.pt").write_bytes(b"x" * 100)
    config = load_config(None, [f"run_dir={run_dir}", f"cluster.num_workers={num_workers}"])
    for key, value in overrides.items():
        section, name = key.split("__")
        setattr(getattr(config, section), name, value)
    dump_config(config, folder / "config.yaml")
    if seal:
        write_complete_marker(folder, step, num_workers)
    return folder


def test_partial_checkpoints_are_skipped_with_a_warning(tmp_path):
    good = fake_checkpoint(tmp_path, 10)
    partial = fake_checkpoint(tmp_path, 20, seal=False)  # the full-disk case: `latest` but no marker
    truncated = fake_checkpoint(tmp_path, 30)
    (truncated / "step_00000030" / "mp_rank_00_model_states.pt").write_bytes(b"x" * 10)
    with pytest.warns(IncompleteCheckpointWarning) as caught:
        assert latest_checkpoint(tmp_path) == good
    messages = " ".join(str(w.message) for w in caught)
    assert "checkpoint_00000020" in messages and f"no {COMPLETE_FILE}" in messages
    assert "checkpoint_00000030" in messages and "10 bytes, 100 expected" in messages
    with pytest.raises(CheckpointError, match="incomplete"):
        latest_checkpoint(partial)  # named explicitly: refused, never used
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert complete_checkpoints(tmp_path) == [good]


# -- items 3 and 4: resume refuses a changed config (listing each key) and a changed world size, on the driver
def test_resume_refuses_config_changes_and_names_each_key(tmp_path):
    fake_checkpoint(tmp_path, 10)
    base = [f"run_dir={tmp_path}", "cluster.num_workers=2"]
    with pytest.raises(ConfigError) as info:
        check_resume(load_config(None, [*base, "optim.lr=1e-4", "model.channels=64"]))
    message = str(info.value)
    default = load_config(None, base)  # the checkpoint was written with the defaults
    assert f"optim.lr: {default.optim.lr!r} -> 0.0001" in message
    assert f"model.channels: {default.model.channels} -> 64" in message
    assert "--allow-config-change model.channels optim.lr" in message
    # Safe keys pass and are reported; a deliberate override passes too.
    plan = check_resume(load_config(None, [*base, "train.num_steps=400", "train.log_every=5"]))
    assert plan.allowed_changes == {
        "train.log_every": (default.train.log_every, 5),
        "train.num_steps": (default.train.num_steps, 400),
    }
    assert plan.checkpoint.name == "checkpoint_00000010"
    plan = check_resume(load_config(None, [*base, "optim.lr=1e-4"]), allow_changes=("optim.lr",))
    assert plan.allowed_changes == {"optim.lr": (default.optim.lr, 1e-4)}
    shorter = default.train.num_steps // 2
    with pytest.raises(ConfigError, match=f"train.num_steps: {default.train.num_steps} -> {shorter}"):  # not safe
        check_resume(load_config(None, [*base, f"train.num_steps={shorter}"]))
    with pytest.raises(ConfigError, match="no such config key"):
        check_resume(load_config(None, base), allow_changes=("optim.lrr",))


def test_world_size_change_is_refused_before_config_yaml_is_written(tmp_path):
    fake_checkpoint(tmp_path, 10, num_workers=2)
    config = load_config(None, [f"run_dir={tmp_path}", "cluster.num_workers=4", "train.global_batch_size=64"])
    with pytest.raises(ConfigError, match="written by 2 ranks but cluster.num_workers=4"):
        check_resume(config)
    assert not (tmp_path / "config.yaml").exists()


def test_each_resume_segment_keeps_its_config(tmp_path):
    fake_checkpoint(tmp_path, 10)
    config = load_config(None, [f"run_dir={tmp_path}", "train.log_every=5"])
    copy = record_config(config, check_resume(config))
    assert copy.parent.name == "config_history" and copy.name.endswith("_from_step_00000010.yaml")
    assert load_config(copy).train.log_every == 5
    assert load_config(tmp_path / "config.yaml").train.log_every == 5


# -- item 1: Ray's damaged snapshot is moved aside with a warning instead of failing with a bare JSON error
@pytest.mark.parametrize("content", ["", "{not json", json.dumps({"latest": {"checkpoint_dir_name": "gone"}})])
def test_damaged_ray_snapshot_is_moved_aside(tmp_path, content):
    (tmp_path / RAY_SNAPSHOT).write_text(content)
    with pytest.warns(UserWarning, match="unusable"):
        assert repair_ray_snapshot(tmp_path) is not None
    assert not (tmp_path / RAY_SNAPSHOT).exists()
    assert list(tmp_path.glob(f"{RAY_SNAPSHOT}.damaged-*"))


def test_good_ray_snapshot_is_kept(tmp_path):
    fake_checkpoint(tmp_path, 10)
    (tmp_path / RAY_SNAPSHOT).write_text(json.dumps({"latest": {"checkpoint_dir_name": "checkpoint_00000010"}}))
    assert repair_ray_snapshot(tmp_path) is None
    assert (tmp_path / RAY_SNAPSHOT).exists()


# -- item 10: errors that will repeat are raised at once; only process and node deaths are retried
def test_repeatable_errors_are_raised_without_retry():
    from ray.exceptions import ActorDiedError
    from ray.train import FailureConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.execution.failure_handling.failure_policy import FailureDecision
    from ray.train.v2.api.exceptions import WorkerGroupError

    from tarflow_scale.data import DataError
    from tarflow_scale.training.failures import RepeatableErrorPolicy
    from tarflow_scale.training.trainer import NonFiniteLossError

    # The private hooks ReliableTorchTrainer overrides (Ray 2.60 has no public one): fail loudly if they move.
    assert callable(TorchTrainer._initialize_and_run_controller) and callable(TorchTrainer._register_sigint_handler)
    policy = RepeatableErrorPolicy(FailureConfig(max_failures=5))
    for error in (ConfigError("k"), DataError("shard"), CheckpointError("c"), NonFiniteLossError("nan")):
        decision = policy.make_decision(WorkerGroupError("x", {1: error, 0: RuntimeError("collateral")}))
        assert decision == FailureDecision.RAISE, type(error)
    assert policy.make_decision(WorkerGroupError("x", {0: ActorDiedError()})) == FailureDecision.RETRY
    assert policy.make_decision(WorkerGroupError("x", {0: RuntimeError("gloo")})) == FailureDecision.RETRY


def test_gpu_out_of_memory_is_not_retried_and_names_the_estimate_and_the_keys():
    """The same step at the same micro-batch would run out of memory again: raised at once, with the memory
    estimate it ran at and the keys that change it."""
    from ray.train import FailureConfig
    from ray.train.v2._internal.execution.failure_handling.failure_policy import FailureDecision
    from ray.train.v2.api.exceptions import WorkerGroupError

    from tarflow_scale.config.memory import GIB
    from tarflow_scale.training.failures import RepeatableErrorPolicy, out_of_memory_error, repeatable_failure

    policy = RepeatableErrorPolicy(FailureConfig(max_failures=5))
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.19 GiB total)")
    lost_type = RuntimeError("worker raised: CUDA out of memory. Tried to allocate 2.00 MiB")
    for error in (oom, lost_type):
        group = WorkerGroupError("x", {0: RuntimeError("collateral"), 3: error})
        assert policy.make_decision(group) == FailureDecision.RAISE
        assert repeatable_failure(group) is error
    config = load_config("imagenet64_density", ["cluster.num_workers=8"])
    message = str(out_of_memory_error(config, oom))
    assert f"{config.memory_estimate.peak / GIB:.1f} GiB" in message and "micro-batch 16" in message
    for key in ("cluster.gpu_memory_gib=80", "train.micro_batch_size", "train.grad_accum_steps",
                "deepspeed.activation_checkpointing", "deepspeed.zero_stage", "cluster.num_workers"):  # fmt: skip
        assert key in message, key
    assert "not retried" in message and "Tried to allocate 20.00 GiB" in message


# -- item 10: driver-side errors are one line naming the path, exit code 2, before Ray starts
def test_cli_errors_are_one_line_with_exit_2(tmp_path, capsys):
    import numpy as np

    from tarflow_scale.cli.train import main
    from tarflow_scale.data import write_split
    from tarflow_scale.data.sources import ArraySource

    tiny = ["model.image_size=8", "model.patch_size=2", "model.channels=32", "model.head_dim=16"]
    assert main([f"data.path={tmp_path / 'nowhere'}", f"run_dir={tmp_path / 'run'}", *tiny]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nowhere/train.json: no manifest" in err

    images = np.zeros((4, 8, 8, 3), np.uint8)
    write_split(str(tmp_path / "d"), ArraySource(images, np.zeros(4, int), list("abcd"), 0, [], {}), name="t",
                split="train", progress=False)  # fmt: skip
    (tmp_path / "file").write_text("")
    assert main([f"data.path={tmp_path / 'd'}", f"run_dir={tmp_path / 'file' / 'run'}", *tiny]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "file/run is not writable" in err
    assert main([f"data.path={tmp_path / 'd'}", "train.log_every=0", *tiny]) == 2
    assert "train.log_every=0 must be >= 1" in capsys.readouterr().err


def test_a_torn_metrics_line_is_skipped(tmp_path):
    """metrics.jsonl is the one append-only file: a kill or full disk mid-line must not break resume or reading."""
    from tarflow_scale.training.metrics import read_metrics

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n\n{"step": 2, "lo')
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}]


# -- issue 22 item 6: an empty run_dir (an unset shell variable) would train into the current folder
@pytest.mark.parametrize("value", ["", " "])
def test_an_empty_run_dir_is_refused(value, capsys):
    from tarflow_scale.cli.train import main

    with pytest.raises(ConfigError, match=r"run_dir='\s*' is empty"):
        load_config(None, [f"run_dir={value}"])
    assert main([f"run_dir={value}", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run_dir=" in err[0] and "is empty" in err[0]


# -- issue 22 item 8: a file or read-only output path, a full disk, a double Ctrl-C, impossible numbers: one line
def _tiny_data(tmp_path: Path) -> list[str]:
    import numpy as np

    from tarflow_scale.data import write_split
    from tarflow_scale.data.sources import ArraySource

    images = np.zeros((4, 8, 8, 3), np.uint8)
    write_split(str(tmp_path / "d"), ArraySource(images, np.zeros(4, int), list("abcd"), 0, [], {}), name="t",
                split="train", progress=False)  # fmt: skip
    return [f"data.path={tmp_path / 'd'}", "model.image_size=8", "model.patch_size=2", "model.channels=32",
            "model.head_dim=16"]  # fmt: skip


def test_a_run_dir_that_is_a_file_is_one_line_with_exit_2(tmp_path, capsys):
    from tarflow_scale.cli.train import main

    (tmp_path / "run").write_text("")
    assert main([*_tiny_data(tmp_path), f"run_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"tarflow-train: run_dir={tmp_path / 'run'} is a file, not a folder"]


def test_a_full_disk_is_one_line_naming_the_path(tmp_path, monkeypatch, capsys):
    import errno

    from ray.train.v2.api.exceptions import WorkerGroupError

    import tarflow_scale.training.cluster as cluster
    from tarflow_scale.cli.train import main
    from tarflow_scale.training.failures import storage_failure

    # On the driver (config.yaml, the lock, Ray's snapshot): the OS's reason and the path.
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / ".config.yaml.7.tmp"))
    monkeypatch.setattr(cluster, "launch", lambda *a, **k: (_ for _ in ()).throw(full))
    assert main([*_tiny_data(tmp_path), f"run_dir={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"tarflow-train: No space left on device: {tmp_path / 'run' / '.config.yaml.7.tmp'}"
    ]
    # In a worker: Ray wraps the OSError (its errno then lives on the wrapped cause) inside a WorkerGroupError.
    import ray

    wrapped = ray.exceptions.RayTaskError("save", "traceback", OSError(errno.ENOSPC, "No space left on device", "/r/c"))
    group = WorkerGroupError("x", {0: wrapped.as_instanceof_cause(), 1: RuntimeError("collateral")})
    assert storage_failure(group) == "[Errno 28] No space left on device: '/r/c'"
    assert storage_failure(WorkerGroupError("x", {0: RuntimeError("gloo")})) is None


def test_a_second_signal_aborts_through_ray_and_ends_in_one_line(tmp_path, monkeypatch, capsys):
    import signal

    import tarflow_scale.training.cluster as cluster
    import tarflow_scale.training.failures as failures
    from tarflow_scale.cli.train import main
    from tarflow_scale.training.failures import ReliableTorchTrainer
    from tarflow_scale.training.run_state import STOP_FILE, RunAborted

    trainer = ReliableTorchTrainer.__new__(ReliableTorchTrainer)  # only the signal handling, no Ray run
    trainer._stop_dir, trainer.stop_signal, trainer.aborted_by = tmp_path, None, None
    aborted, exits = [], []
    monkeypatch.setattr(trainer, "_abort", aborted.append)
    monkeypatch.setattr(failures.os, "_exit", exits.append)
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        trainer._register_sigint_handler("controller")
        handler = signal.getsignal(signal.SIGINT)
        handler(signal.SIGINT, None)  # first: a stop at the next step boundary, with a final checkpoint
        assert (tmp_path / STOP_FILE).exists() and aborted == [] and trainer.aborted_by is None
        handler(signal.SIGINT, None)  # second: Ray's controller tears the worker group down; launch() reports it
        assert aborted == ["controller"] and trainer.aborted_by == "SIGINT"
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)  # a third: out at once
        assert aborted == ["controller"] and exits == [130]
    finally:
        for signum, h in saved.items():
            signal.signal(signum, h)
    assert "second SIGINT: aborting without a final checkpoint" in capsys.readouterr().err

    last = tmp_path / "run" / "checkpoint_00000010"
    monkeypatch.setattr(cluster, "launch", lambda *a, **k: (_ for _ in ()).throw(RunAborted("SIGINT", last)))
    assert main([*_tiny_data(tmp_path), f"run_dir={tmp_path / 'run'}"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"the newest complete checkpoint is {last}. Re-run the same command" in err[0]


def test_impossible_numbers_on_the_command_line_are_usage_errors(tmp_path, capsys):
    import tarflow_scale.cli.data as data_cli
    import tarflow_scale.cli.sample as sample_cli

    for main, args, flag in [
        (sample_cli.main, ["m.safetensors", "--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
        (data_cli.main, ["convert-npz", "x.npz", "--out", "o", "--split", "s", "--samples-per-shard", "0"],
         "--samples-per-shard: must be >= 1, got 0"),
        (data_cli.main, ["convert-folder", "src", "--out", "o", "--split", "s", "--size", "-3"],
         "--size: must be >= 1"),
        (data_cli.main, ["bundled", "--out", "o", "--procs", "two"], "--procs: 'two' is not an integer"),
    ]:  # fmt: skip
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 2
        assert f"error: argument {flag}" in capsys.readouterr().err


def test_unwritable_outputs_of_sample_export_and_eval_are_one_line(tmp_path, monkeypatch, capsys):
    import errno

    from test_eval import CLASSES, export, random_model

    import tarflow_scale.cli.eval as eval_cli
    import tarflow_scale.cli.export as export_cli
    import tarflow_scale.cli.sample as sample_cli
    import tarflow_scale.evaluation.orchestrate as orchestrate

    path = export(random_model(num_classes=CLASSES), tmp_path / "m.safetensors", noise="uniform")
    (tmp_path / "file").write_text("")
    blocked = tmp_path / "file" / "out"
    assert sample_cli.main([str(path), "--num", "2", "--class", "0", "--out", str(blocked)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"tarflow-sample: --out {blocked} is not writable: Not a directory"
    ]
    assert eval_cli.main([str(path), "--out", str(blocked)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"tarflow-eval: error: --out {blocked} is not writable: Not a directory"
    ]
    readonly = OSError(errno.EROFS, "Read-only file system", str(tmp_path / "ro" / ".m.safetensors.9.tmp"))
    monkeypatch.setattr(export_cli, "export_checkpoint", lambda *a, **k: (_ for _ in ()).throw(readonly))
    assert export_cli.main([str(tmp_path), str(tmp_path / "ro" / "m.safetensors")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"tarflow-export: Read-only file system: {tmp_path / 'ro' / '.m.safetensors.9.tmp'}"
    ]
    # Ctrl-C during an evaluation: one line saying what is kept; the output folder's lock is released.
    monkeypatch.setattr(orchestrate, "evaluate", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert eval_cli.main([str(path), "--out", str(tmp_path / "ev")]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"tarflow-eval: interrupted; the finished units are kept in {tmp_path / 'ev'}/units: re-run the "
                   "same command to continue"]  # fmt: skip
    assert not (tmp_path / "ev" / ".tarflow.lock").exists()
