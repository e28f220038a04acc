"""Training checkpoint folders: completeness, the newest complete one, their run config, ZeRO consolidation.

A training checkpoint is a folder Ray Train stores: the DeepSpeed engine state of every rank, `latest` (the
engine's tag), `config.yaml` (the resolved run config), the EMA weights when enabled, and `complete.json`, written
last. It is for resuming; exports (artifacts/exports.py) are for everything else.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch
import yaml

from .. import atomic
from ..config import RunConfig, from_dict
from .weights import CheckpointError

CONFIG_FILE = "config.yaml"  # the resolved run config, written into every checkpoint folder
TAG_FILE = "latest"  # DeepSpeed's name of the engine state it saved (e.g. step_00000200)
EMA_FILE = "ema.safetensors"  # EMA weights (when optim.ema_decay > 0), beside the engine state
# Written last into a checkpoint folder, once every rank's files are stored: the list of files with their sizes.
# A folder without it (or whose files do not match it) is incomplete: a crash, a full disk or a kill mid-save.
COMPLETE_FILE = "complete.json"
_CHECKPOINT_NAME = re.compile(r"checkpoint_(\d+)$")
# Wrappers that prefix parameter names: activation checkpointing and torch.compile.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


class IncompleteCheckpointWarning(UserWarning):
    """A `checkpoint_*` folder was skipped because it is incomplete."""


def write_complete_marker(checkpoint_dir: str | Path, step: int, world_size: int) -> Path:
    """Seal a checkpoint folder: list every file with its size in COMPLETE_FILE (written last, atomically)."""
    checkpoint_dir = Path(checkpoint_dir)
    files = {
        p.relative_to(checkpoint_dir).as_posix(): p.stat().st_size
        for p in sorted(checkpoint_dir.rglob("*"))
        if p.is_file() and p.name != COMPLETE_FILE and not p.name.startswith(".")
    }
    record = {"step": step, "world_size": world_size, "files": files}
    return atomic.write_text(checkpoint_dir / COMPLETE_FILE, json.dumps(record, indent=1) + "\n")


def incomplete_reason(checkpoint_dir: str | Path) -> str | None:
    """None when `checkpoint_dir` is a complete checkpoint; else why not, in a few words."""
    checkpoint_dir = Path(checkpoint_dir)
    marker = checkpoint_dir / COMPLETE_FILE
    if not marker.is_file():
        return f"no {COMPLETE_FILE} (the save never finished)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        return f"unreadable {COMPLETE_FILE}: {e}"
    for name in (CONFIG_FILE, TAG_FILE):
        if name not in files:
            return f"{name} missing"
    for name, size in files.items():
        path = checkpoint_dir / name
        if not path.is_file():
            return f"{name} missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} expected"
    return None


def checkpoint_step(checkpoint_dir: str | Path) -> int:
    match = _CHECKPOINT_NAME.search(Path(checkpoint_dir).name)
    return int(match.group(1)) if match else -1


def complete_checkpoints(run_dir: str | Path, warn: bool = True) -> list[Path]:
    """The complete `checkpoint_*` folders of a run directory, oldest first; each incomplete one is skipped with
    an IncompleteCheckpointWarning naming it. Resume, export and evaluation all choose from this list."""
    found = []
    for path in sorted(Path(run_dir).glob("checkpoint_*"), key=checkpoint_step):
        if not path.is_dir() or checkpoint_step(path) < 0:
            continue
        reason = incomplete_reason(path)
        if reason is None:
            found.append(path)
        elif warn:
            warnings.warn(f"skipping incomplete checkpoint {path}: {reason}", IncompleteCheckpointWarning, 2)
    return found


def latest_checkpoint(run_or_checkpoint_dir: str | Path) -> Path:
    """A checkpoint folder itself, or the newest `checkpoint_*` folder of a run directory."""
    path = Path(run_or_checkpoint_dir)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if (path / TAG_FILE).is_file() or (path / COMPLETE_FILE).is_file():  # a checkpoint folder itself
        reason = incomplete_reason(path)
        if reason is not None:
            raise CheckpointError(f"checkpoint {path} is incomplete: {reason}")
        return path
    candidates = complete_checkpoints(path)
    if not candidates:
        raise CheckpointError(f"{path} holds no complete checkpoint (no checkpoint_* folder with {COMPLETE_FILE})")
    return candidates[-1]


def read_run_config(checkpoint_dir: str | Path) -> RunConfig:
    """The resolved run config a checkpoint folder was written with (its config.yaml)."""
    path = Path(checkpoint_dir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{checkpoint_dir} has no {CONFIG_FILE}: not a tarflow_scale training checkpoint")
    return from_dict(RunConfig, yaml.safe_load(path.read_text()))


def checkpoint_tag(checkpoint_dir: str | Path) -> str:
    """The engine-state tag of a checkpoint folder ("" when it has none)."""
    path = Path(checkpoint_dir) / TAG_FILE
    return path.read_text().strip() if path.is_file() else ""


def strip_wrapper_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Parameter names as a plain TarFlow has them (without activation-checkpointing / torch.compile prefixes)."""
    out = {}
    for key, value in state.items():
        for prefix in _WRAPPER_PREFIXES:
            key = key.replace(prefix, "")
        out[key] = value
    return out


def consolidate(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """Full fp32 state dict from a checkpoint of any ZeRO stage (DeepSpeed's own consolidation)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint_dir = latest_checkpoint(checkpoint_dir)
    try:
        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir))
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(f"cannot consolidate {checkpoint_dir}: {e}") from e
    return {k: v.contiguous() for k, v in strip_wrapper_prefixes(state).items()}


def read_ema_weights(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """The EMA weights saved beside a checkpoint's engine state (CheckpointError naming the folder if absent)."""
    from safetensors.torch import load_file

    path = Path(checkpoint_dir) / EMA_FILE
    if not path.is_file():
        raise CheckpointError(f"{checkpoint_dir} has no EMA weights ({EMA_FILE}); train with optim.ema_decay>0")
    return load_file(path)
