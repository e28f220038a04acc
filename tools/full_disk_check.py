"""Manual check of docs/reliability.md: a checkpoint written onto a full disk, then the re-run after space is freed.

Needs a small dedicated file system (as root: `mount -t tmpfs -o size=5m tmpfs DIR`). Steps, each printed:
  1. train 3 steps into DIR/run (one complete checkpoint) and measure its size;
  2. fill DIR until less than half a checkpoint is free, extend to 6 steps: the save of step 6 fails;
  3. list what the failure left (incomplete folders, Ray's snapshot), and what `tarflow-export` would take;
  4. free the space and re-run the same command: it must resume from step 3 and finish, export agreeing.
Usage: python tools/full_disk_check.py DIR   (DIR: the mount point of that small file system; it is filled)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

from tarflow_scale.artifacts.checkpoints import COMPLETE_FILE, latest_checkpoint
from tarflow_scale.config import load_config
from tarflow_scale.data import write_split
from tarflow_scale.data.sources import ArraySource
from tarflow_scale.training.cluster import init_ray, launch
from tarflow_scale.training.metrics import read_metrics


def tiny_dataset(root: Path) -> Path:
    rng = np.random.default_rng(0)
    images = np.kron(rng.integers(0, 256, size=(64, 2, 2, 3)), np.ones((1, 4, 4, 1))).astype(np.uint8)
    source = ArraySource(images, np.arange(64) % 2, [f"i{i:03d}" for i in range(64)], 2, ["a", "b"], {"k": "t"})
    write_split(str(root), source, name="tiny", split="train", samples_per_shard=16, progress=False)
    return root


def config(data: Path, run_dir: Path, steps: int, max_failures: int):
    return load_config(
        None,
        [
            f"run_dir={run_dir}", f"data.path={data}", "data.num_workers=0", "data.shuffle_buffer=16",
            "model.image_size=8", "model.patch_size=2", "model.channels=32", "model.head_dim=16", "model.num_blocks=2",
            "model.layers_per_block=1", "model.num_classes=2", f"train.num_steps={steps}", "train.checkpoint_every=3",
            "train.global_batch_size=16", "train.micro_batch_size=4", "train.log_every=1", "train.sample_every=0",
            "train.num_samples=4", f"cluster.max_failures={max_failures}",
        ],
    )  # fmt: skip


def main(mount: str) -> int:
    disk = Path(mount)
    run_dir = disk / "run"
    data = tiny_dataset(Path(tempfile.mkdtemp(prefix="full_disk_data_")))
    init_ray("local")
    launch(config(data, run_dir, 3, 0))
    size = sum(p.stat().st_size for p in (run_dir / "checkpoint_00000003").rglob("*") if p.is_file())
    sealed = (run_dir / "checkpoint_00000003" / COMPLETE_FILE).is_file()
    print(f"1. checkpoint_00000003: {size} bytes, complete: {sealed}")

    free = shutil.disk_usage(disk).free
    filler = disk / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - size // 2))
    print(f"2. filled {disk}: {shutil.disk_usage(disk).free} bytes free; extending to 6 steps")
    try:
        launch(config(data, run_dir, 6, 0))
        print("   the run did not fail (the disk was not full enough)")
    except Exception as e:  # noqa: BLE001 - we report whatever the full disk caused
        print(f"   failed as expected: {type(e).__name__}: {str(e).splitlines()[0][:200]}")

    print("3. left behind:")
    for p in sorted(run_dir.iterdir()):
        extra = ""
        if p.name.startswith("checkpoint_") and p.is_dir():
            extra = "complete" if (p / COMPLETE_FILE).is_file() else "INCOMPLETE"
        elif p.is_file():
            extra = f"{p.stat().st_size} bytes"
        print(f"   {p.name} {extra}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        print(f"   tarflow-export would take: {latest_checkpoint(run_dir).name}")
    for w in caught:
        print(f"   warning: {w.message}")

    filler.unlink()
    print("4. space freed; re-running the same command")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        launch(config(data, run_dir, 6, 0))
    for w in caught:
        print(f"   warning: {str(w.message)[:200]}")
    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    print(f"   steps logged (in order): {steps}")
    print(f"   newest complete checkpoint: {latest_checkpoint(run_dir).name}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", help="mount point of a small dedicated file system (filled, then freed)")
    sys.exit(main(parser.parse_args().dir))
