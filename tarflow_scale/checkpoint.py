"""Checkpoint artifacts: consolidate a DeepSpeed ZeRO checkpoint, export it to one safetensors file, load it back.

Two kinds of artifact (as in EDM2): the training checkpoint (a folder Ray Train stores: DeepSpeed engine state
of every rank + `config.yaml`), for resuming; and the export (one `.safetensors` file whose metadata embeds the
model config and a checksum of the weights, tarflow_scale/weights.py), for sampling and evaluation without
DeepSpeed or Ray, alone or inside a model directory (config.json + model.safetensors + README.md model card).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path

import torch
import yaml

from . import atomic
from .config import RunConfig, TarFlowConfig, from_dict, to_dict
from .models.tarflow import TarFlow
from .weights import (
    EXPORT_FORMAT,
    SHARED_FILE_MODE,
    WEIGHTS_FILE,
    CheckpointError,
    export_model_config,
    is_model_dir,
    read_metadata,
    write_weights,
)

__all__ = ["EXPORT_FORMAT", "CheckpointError"]  # re-exported: defined beside the weight files

CONFIG_FILE = "config.yaml"  # the resolved run config, written into every checkpoint folder
EXPORT_NAME = "model.safetensors"  # the slim export the trainer writes into run_dir at the end
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
    for name in (CONFIG_FILE, "latest"):
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


def strip_wrapper_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in _WRAPPER_PREFIXES:
            key = key.replace(prefix, "")
        out[key] = value
    return out


def read_run_config(checkpoint_dir: str | Path) -> RunConfig:
    path = Path(checkpoint_dir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{checkpoint_dir} has no {CONFIG_FILE}: not a tarflow_scale training checkpoint")
    return from_dict(RunConfig, yaml.safe_load(path.read_text()))


def latest_checkpoint(run_or_checkpoint_dir: str | Path) -> Path:
    """A checkpoint folder itself, or the newest `checkpoint_*` folder of a run directory."""
    path = Path(run_or_checkpoint_dir)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if (path / "latest").is_file() or (path / COMPLETE_FILE).is_file():  # a checkpoint folder itself
        reason = incomplete_reason(path)
        if reason is not None:
            raise CheckpointError(f"checkpoint {path} is incomplete: {reason}")
        return path
    candidates = complete_checkpoints(path)
    if not candidates:
        raise CheckpointError(f"{path} holds no complete checkpoint (no checkpoint_* folder with {COMPLETE_FILE})")
    return candidates[-1]


def consolidate(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """Full fp32 state dict from a checkpoint of any ZeRO stage (DeepSpeed's own consolidation)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint_dir = latest_checkpoint(checkpoint_dir)
    try:
        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir))
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(f"cannot consolidate {checkpoint_dir}: {e}") from e
    return {k: v.contiguous() for k, v in strip_wrapper_prefixes(state).items()}


def build_model(config: TarFlowConfig, state: dict[str, torch.Tensor], source: str) -> TarFlow:
    model = TarFlow(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{source} does not match its model config: {e}") from e
    return model


def export_checkpoint(checkpoint_dir: str | Path, out_path: str | Path, use_ema: bool = False) -> Path:
    """Consolidate `checkpoint_dir` (or a run directory's newest checkpoint) into one safetensors file."""
    from safetensors.torch import load_file

    checkpoint_dir = latest_checkpoint(checkpoint_dir)
    run_config = read_run_config(checkpoint_dir)
    if use_ema:
        ema_path = checkpoint_dir / EMA_FILE
        if not ema_path.is_file():
            raise CheckpointError(f"{checkpoint_dir} has no EMA weights ({EMA_FILE}); train with optim.ema_decay>0")
        state = load_file(ema_path)
    else:
        state = consolidate(checkpoint_dir)
    build_model(run_config.model, state, str(checkpoint_dir))  # validates names and shapes, strict
    tag = (checkpoint_dir / "latest").read_text().strip()
    return save_export(state, run_config, out_path, source=str(checkpoint_dir.resolve()), tag=tag, ema=use_ema)


def save_export(
    state: dict[str, torch.Tensor],
    run_config: RunConfig,
    out_path: str | Path,
    source: str,
    tag: str,
    ema: bool,
    extra: dict[str, str] | None = None,
) -> Path:
    """Write the export format: weights + model/run config + weights checksum in the safetensors metadata, and
    OUT.json (the model config) beside."""
    metadata = {
        "format": EXPORT_FORMAT,
        "model_config": json.dumps(to_dict(run_config.model)),
        "run_config": json.dumps(to_dict(run_config)),
        "source": source,
        "tag": tag,
        "weights": "ema" if ema else "raw",
        **(extra or {}),
    }
    out_path = write_weights(out_path, state, metadata)  # readable by others: mode SHARED_FILE_MODE
    atomic.write_text(out_path.with_suffix(".json"), json.dumps(to_dict(run_config.model), indent=2) + "\n")
    os.chmod(out_path.with_suffix(".json"), SHARED_FILE_MODE)
    return out_path


def load_model(path: str | Path, device: str | torch.device = "cpu") -> TarFlow:
    """A TarFlow from an export / imported `.safetensors` file (checksum verified), a model directory, or a
    training checkpoint / run directory (consolidated)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if is_model_dir(path):
        return TarFlow.from_model_dir(path, device)
    if path.is_dir():
        checkpoint_dir = latest_checkpoint(path)
        run_config = read_run_config(checkpoint_dir)
        model = build_model(run_config.model, consolidate(checkpoint_dir), str(checkpoint_dir))
        model.provenance = {"run_config": json.dumps(to_dict(run_config)), "source": str(checkpoint_dir.resolve())}
        return model.to(device).eval()
    return TarFlow.from_weights_file(path, device)


def model_config_differences(given: TarFlowConfig, actual: TarFlowConfig) -> list[str]:
    """`model.KEY: config A, checkpoint B` for every model setting that differs."""
    a, b = to_dict(given), to_dict(actual)
    return [
        f"model.{k}: config {a.get(k)!r}, checkpoint {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]


def stored_model_config(path: str | Path) -> TarFlowConfig:
    """The model config an export, model directory or training checkpoint / run directory holds (no weights read)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if is_model_dir(path):
        path = path / WEIGHTS_FILE
    elif path.is_dir():
        return read_run_config(latest_checkpoint(path)).model
    return export_model_config(path, read_metadata(path))


def check_initial_weights(path: str | Path, config: TarFlowConfig) -> None:
    """`train.init_from`: the file's model must equal the run's model section; the error lists every difference."""
    diffs = model_config_differences(config, stored_model_config(path))
    if diffs:
        raise CheckpointError(
            f"train.init_from={path}: the run's model section does not match the checkpoint's model (set these in "
            "the run config):\n  " + "\n  ".join(diffs)
        )


def load_initial_weights(path: str | Path, config: TarFlowConfig) -> dict[str, torch.Tensor]:
    """`train.init_from`: the (checked) weights to start fine-tuning from."""
    check_initial_weights(path, config)
    return load_model(path).state_dict()


def export_model_dir(
    checkpoint: str | Path, out_dir: str | Path, use_ema: bool = False, metrics_path: str | Path | None = None
) -> Path:
    """`tarflow-export --format dir`: a model directory (config.json, model.safetensors, README.md model card) from
    a training checkpoint / run directory, an export file or another model directory; written under a temp name
    and renamed. The card summarises `metrics_path`, else an evaluation's metrics.json found beside the source."""
    import shutil
    import tempfile

    source = Path(checkpoint)
    if source.is_dir() and not is_model_dir(source):
        tmp_export = Path(tempfile.mkdtemp()) / "model.safetensors"
        try:
            model = load_model(export_checkpoint(source, tmp_export, use_ema=use_ema))
        finally:
            shutil.rmtree(tmp_export.parent, ignore_errors=True)
    else:
        if use_ema:
            raise CheckpointError(f"--ema needs a training checkpoint; {source} holds one set of weights")
        model = load_model(source)
    metrics = None
    found = Path(metrics_path) if metrics_path else find_metrics(source)
    if found is not None:
        try:
            metrics = json.loads(found.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"evaluation results {found} are not readable JSON: {e}") from e
    out_dir = Path(out_dir)
    partial = out_dir.with_name(f"{out_dir.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, metrics=metrics)
    if out_dir.exists():
        old = out_dir.with_name(f"{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
        partial.rename(out_dir)
        shutil.rmtree(old)
    else:
        partial.rename(out_dir)
    return out_dir


def find_metrics(source: Path) -> Path | None:
    """An evaluation's metrics.json beside the source: its `eval/` folder (tarflow-eval's default output)."""
    base = source if source.is_dir() else source.parent
    for candidate in (base / "eval" / "metrics.json", base / "metrics.json", base.parent / "eval" / "metrics.json"):
        if candidate.is_file():
            return candidate
    return None


def read_training_config(path: str | Path) -> RunConfig | None:
    """The training run config embedded in an export, a checkpoint folder or a run directory (None when an
    older export carries none). Reads no weights."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        return read_run_config(latest_checkpoint(path))
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    if "run_config" not in metadata:
        return None
    try:
        return from_dict(RunConfig, json.loads(metadata["run_config"]))
    except (ValueError, TypeError):  # an export from an older config schema
        return None


def file_sha256(path: str | Path) -> str:
    """Checksum of a file, or of every file of a folder in name order."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        with file.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
