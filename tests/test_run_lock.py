"""One process per output folder (tarflow_scale/run_lock.py): a second training launch or evaluation into the same
folder is refused naming the first (host, pid, command), a lock left by a dead process on this host is taken over
with a warning (a crashed run resumes), another host's lock is refused with how to remove it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
from test_eval import CLASSES, dataset, export, random_model  # noqa: F401 - `dataset` is a fixture

import tarflow_scale.cli.eval as eval_cli
import tarflow_scale.training.cluster as cluster
from tarflow_scale.config import load_config
from tarflow_scale.data import write_split
from tarflow_scale.data.sources import ArraySource
from tarflow_scale.run_lock import LOCK_NAME, LockHolder, OutputDirError, lock_output_dir


def dead_pid() -> int:
    """A pid no process has now (searched downwards from the kernel's limit; nothing is spawned)."""
    limit = int(Path("/proc/sys/kernel/pid_max").read_text()) if Path("/proc/sys/kernel/pid_max").exists() else 99999
    for pid in range(limit - 1, 1, -1):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            continue
    raise AssertionError("no free pid")


def plant_lock(folder: Path, **fields) -> LockHolder:
    """A lock file as another process would have left it."""
    holder = LockHolder(
        host=socket.gethostname(), pid=os.getpid(), started="2026-01-01 00:00:00 UTC",
        command="tarflow-train run_dir=x", token="t" * 32,
    )  # fmt: skip
    holder = replace(holder, **fields)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps(asdict(holder)) + "\n")
    return holder


def test_a_held_folder_is_refused_naming_the_holder_and_released_on_exit(tmp_path):
    out = tmp_path / "out"
    with lock_output_dir(out, f"--out {out}", command="tarflow-eval m.safetensors") as lock:
        record = json.loads((out / LOCK_NAME).read_text())
        assert record["host"] == socket.gethostname() and record["pid"] == os.getpid()
        assert record["command"] == "tarflow-eval m.safetensors" and "UTC" in record["started"]
        assert lock.holder is not None and lock.holder.token == record["token"]
        with pytest.raises(OutputDirError) as e:
            lock_output_dir(out, f"--out {out}")
        assert f"--out {out} is in use by pid {os.getpid()} on host {socket.gethostname()}" in str(e.value)
        assert "tarflow-eval m.safetensors" in str(e.value)
    assert not (out / LOCK_NAME).exists()
    assert not [p for p in out.iterdir()]  # no temporary files left either
    lock_output_dir(out, "again").release()  # free once released


def test_a_stale_lock_on_this_host_is_taken_over_with_a_warning(tmp_path):
    out = tmp_path / "out"
    gone = plant_lock(out, pid=dead_pid())
    with pytest.warns(UserWarning, match=rf"taking over the lock of pid {gone.pid} on host .*which no longer runs"):
        lock = lock_output_dir(out, "run_dir=x")
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    # A reused pid: the number runs, but a process started at another time than the one recorded.
    plant_lock(out, pid=os.getpid(), pid_start=1)
    with pytest.warns(UserWarning, match="taking over"):
        lock_output_dir(out, "run_dir=x").release()


def test_a_lock_from_another_host_is_refused_with_how_to_remove_it(tmp_path):
    out = tmp_path / "out"
    plant_lock(out, host="node-7", pid=dead_pid())
    with pytest.raises(OutputDirError) as e:
        lock_output_dir(out, "run_dir=x")
    message = str(e.value)
    assert "run_dir=x is in use by pid" in message and "on host node-7" in message
    assert "cannot tell whether it still runs" in message and f"rm {out / LOCK_NAME}" in message
    assert (out / LOCK_NAME).exists()  # left alone


def test_release_leaves_a_lock_that_is_no_longer_ours(tmp_path):
    lock = lock_output_dir(tmp_path, "x")
    (tmp_path / LOCK_NAME).unlink()  # removed by hand, and taken by another process since
    other = plant_lock(tmp_path, token="o" * 32)
    lock.release()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == other.token


def test_unusable_output_folders_are_one_line_errors(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputDirError, match=r"run_dir=.*/file is a file, not a folder"):
        lock_output_dir(tmp_path / "file", f"run_dir={tmp_path / 'file'}")
    with pytest.raises(OutputDirError, match=r"--out .*/file/sub is not writable: Not a directory"):
        lock_output_dir(tmp_path / "file" / "sub", f"--out {tmp_path / 'file' / 'sub'}")
    if os.geteuid() != 0:  # root writes into read-only folders
        (tmp_path / "ro").mkdir(mode=0o555)
        with pytest.raises(OutputDirError, match="ro is not writable: Permission denied"):
            lock_output_dir(tmp_path / "ro", str(tmp_path / "ro"))


def test_a_failed_command_removes_the_empty_folder_it_created(tmp_path):
    out = tmp_path / "new"
    with pytest.raises(RuntimeError), lock_output_dir(out, "x"):
        raise RuntimeError("the config check failed")
    assert not out.exists()
    out.mkdir()
    with pytest.raises(RuntimeError), lock_output_dir(out, "x"):
        raise RuntimeError("it existed before")
    assert out.is_dir()


# ----------------------------------------------------------------------------------------------------------
# Training: launch() holds the lock on run_dir from before it reads the run's state until it returns


def tiny_run(tmp_path: Path, run_dir: Path):
    images = np.zeros((4, 8, 8, 3), np.uint8)
    source = ArraySource(images, np.zeros(4, int), list("abcd"), 0, [], {})
    write_split(str(tmp_path / "d"), source, name="t", split="train", progress=False)
    tiny = ["model.image_size=8", "model.patch_size=2", "model.channels=32", "model.head_dim=16"]
    return load_config(None, [f"data.path={tmp_path / 'd'}", f"run_dir={run_dir}", *tiny])


class RayWouldStart(Exception):
    pass


def test_a_second_launch_into_a_run_dir_is_refused_before_ray_starts(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    monkeypatch.setattr(cluster, "init_ray", lambda *a, **k: (_ for _ in ()).throw(RayWouldStart()))
    with lock_output_dir(run_dir, "first", command="tarflow-train run_dir=run (the first launch)"):
        with pytest.raises(OutputDirError) as e:
            cluster.launch(tiny_run(tmp_path, run_dir))
    assert f"run_dir={run_dir} is in use by pid {os.getpid()} on host {socket.gethostname()}" in str(e.value)
    assert "(the first launch)" in str(e.value) and not (run_dir / "config.yaml").exists()


def test_a_crashed_driver_s_lock_is_taken_over_and_the_run_resumes(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    gone = plant_lock(run_dir, pid=dead_pid())
    monkeypatch.setattr(cluster, "init_ray", lambda *a, **k: (_ for _ in ()).throw(RayWouldStart()))
    with pytest.warns(UserWarning, match=f"taking over the lock of pid {gone.pid}"), pytest.raises(RayWouldStart):
        cluster.launch(tiny_run(tmp_path, run_dir))
    assert (run_dir / "config.yaml").exists()  # it went on to record the run, up to starting Ray
    assert not (run_dir / LOCK_NAME).exists()  # and released the lock when launch() ended


@pytest.mark.slow
def test_a_lock_held_by_another_process_stops_tarflow_train_with_exit_2(tmp_path, capsys):
    from tarflow_scale.cli.train import main

    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from tarflow_scale.run_lock import lock_output_dir\n"
         f"lock = lock_output_dir({str(run_dir)!r}, 'x', command='tarflow-train (first)'); print('held', flush=True)\n"
         "time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        config = tiny_run(tmp_path, run_dir)
        args = [f"data.path={config.data.path}", f"run_dir={run_dir}", "model.image_size=8", "model.patch_size=2"]
        assert main([*args, "model.channels=32", "model.head_dim=16"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert (
            len(err) == 1 and f"is in use by pid {holder.pid} on host" in err[0] and "tarflow-train (first)" in err[0]
        )
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    with pytest.warns(UserWarning, match=f"taking over the lock of pid {holder.pid}"):
        lock_output_dir(run_dir, "x").release()  # the killed holder's lock is stale now


# ----------------------------------------------------------------------------------------------------------
# Evaluation: tarflow-eval locks its output folder


def test_tarflow_eval_refuses_an_output_folder_in_use_and_takes_over_a_stale_one(tmp_path, dataset, capsys):  # noqa: F811
    path = export(random_model(num_classes=CLASSES), tmp_path / "m.safetensors", data_path=dataset, noise="uniform")
    # eval.out_dir="" is documented as "the default folder beside the checkpoint", not a mistake (unlike run_dir=).
    from tarflow_scale.artifacts import read_provenance
    from tarflow_scale.evaluation.resolve import default_out_dir

    assert eval_cli.main([str(path), "--dry-run", "eval.out_dir="]) == 0
    assert f"output: {default_out_dir(read_provenance(str(path)))}" in capsys.readouterr().out
    out = tmp_path / "evals"
    with lock_output_dir(out, "x", command="tarflow-eval m.safetensors --out evals (the first)"):
        assert eval_cli.main([str(path), "--out", str(out), "eval.jobs=[bpd]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--out {out} is in use by pid {os.getpid()}" in err[0] and "(the first)" in err[0]

    gone = plant_lock(out, pid=dead_pid())
    # Denoising a model trained without Gaussian noise is refused inside the evaluation, after the lock is taken.
    with pytest.warns(UserWarning, match=f"--out {out}: taking over the lock of pid {gone.pid}"):
        assert eval_cli.main([str(path), "--out", str(out), "eval.jobs=[denoise]"]) == 2
    assert "eval.denoise_noise_std" in capsys.readouterr().err
    assert not (out / LOCK_NAME).exists()
