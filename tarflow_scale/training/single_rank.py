"""The per-worker training function run in this process as a one-rank world, without Ray: the GPU proof
(tools/gpu_proof.sh) measures the real trainer on a machine that has no Ray, and tests run it on the CPU.

`train_worker` reaches Ray Train through four names of `ray.train` (get_context, get_checkpoint, report,
Checkpoint). For the duration of the call they are this module's one-rank stand-ins: `report` stores the
checkpoint folder under run_dir, where Ray's storage would put it (no pruning to `keep_checkpoints`), and nothing
else of Ray is emulated. The process group Ray would initialise is created here (NCCL on a GPU, gloo on the CPU).
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..config import RunConfig, to_dict
from .console import ConsoleOptions


class _Context:
    def get_world_rank(self) -> int:
        return 0

    def get_world_size(self) -> int:
        return 1

    def get_local_rank(self) -> int:
        return 0


class _Checkpoint:
    """A checkpoint folder, as ray.train.Checkpoint presents one to the trainer."""

    def __init__(self, path: str):
        self.path = str(path)

    @classmethod
    def from_directory(cls, path: str) -> _Checkpoint:
        return cls(path)

    @contextmanager
    def as_directory(self):
        yield self.path


class _OneRankTrain(types.ModuleType):
    """The stand-in `ray.train` module for one rank whose storage is `run_dir`."""

    def __init__(self, run_dir: Path):
        super().__init__("ray.train")
        self.run_dir = run_dir
        self.Checkpoint = _Checkpoint
        self.reports: list[dict[str, Any]] = []

    def get_context(self) -> _Context:
        return _Context()

    def get_checkpoint(self) -> None:
        return None  # the trainer resumes from run_dir's complete checkpoints itself

    def report(self, metrics: dict, checkpoint: _Checkpoint | None = None, checkpoint_dir_name: str = "") -> None:
        self.reports.append(dict(metrics))
        if checkpoint is not None:
            # Merged into the folder, files overwritten, as Ray's upload does (a step redone after a resume saves
            # into the folder it left); the trainer's temp folder goes next.
            shutil.copytree(checkpoint.path, self.run_dir / checkpoint_dir_name, dirs_exist_ok=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def one_rank_world(config: RunConfig):
    """A one-rank process group (made once per process: DeepSpeed holds on to the groups it saw), the variables Ray
    sets for a worker (restored on exit, so later processes do not inherit the port) and the `ray.train` stand-in
    (undone on exit); yields the stand-in."""
    import torch.distributed as dist

    rank_env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    rank_env["MASTER_PORT"] = os.environ.get("MASTER_PORT") or str(_free_port())
    saved_env = {key: os.environ.get(key) for key in rank_env}
    os.environ.update(rank_env)
    stand_in = _OneRankTrain(Path(config.run_dir))
    parent = types.ModuleType("ray")
    parent.train = stand_in
    saved_modules = {name: sys.modules.get(name) for name in ("ray", "ray.train")}
    sys.modules.update({"ray": parent, "ray.train": stand_in})
    try:
        if not dist.is_initialized():
            if config.cluster.use_gpu:
                torch.cuda.set_device(0)
            dist.init_process_group("nccl" if config.cluster.use_gpu else "gloo")
        yield stand_in
    finally:
        for saved, where in ((saved_modules, sys.modules), (saved_env, os.environ)):
            for key, value in saved.items():
                if value is None:
                    where.pop(key, None)
                else:
                    where[key] = value


def run_single_rank(config: RunConfig, console: ConsoleOptions | None = None) -> list[dict[str, Any]]:
    """Train `config` with `train_worker` in this process (cluster.num_workers must be 1); returns the metrics
    reported with each checkpoint."""
    from .cluster import CONSOLE_KEY
    from .trainer import train_worker

    if config.cluster.num_workers != 1:
        raise ValueError(f"a single-rank run needs cluster.num_workers=1, not {config.cluster.num_workers}")
    Path(config.run_dir).mkdir(parents=True, exist_ok=True)
    with one_rank_world(config) as stand_in:
        train_worker({**to_dict(config), CONSOLE_KEY: (console or ConsoleOptions()).to_dict()})
    return stand_in.reports
