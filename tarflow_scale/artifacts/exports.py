"""Exports: a checkpoint as one self-describing weight file, or as a model directory with a model card.

The export file holds the weights with the model and run config in its metadata (OUT.json beside); a model directory
(config.json, model.safetensors, README.md) is what `PretrainedTarFlow.from_pretrained` and the Hub read.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .. import atomic
from ..config import RunConfig, to_dict
from .checkpoints import checkpoint_tag, consolidate, latest_checkpoint, read_ema_weights, read_run_config
from .load import build_model, load_model
from .model_dir import is_model_dir
from .weights import EXPORT_FORMAT, SHARED_FILE_MODE, CheckpointError, write_weights

EXPORT_NAME = "model.safetensors"  # the slim export the trainer writes into run_dir at the end


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


def export_checkpoint(checkpoint_dir: str | Path, out_path: str | Path, use_ema: bool = False) -> Path:
    """Consolidate `checkpoint_dir` (or a run directory's newest checkpoint) into one safetensors file."""
    checkpoint_dir = latest_checkpoint(checkpoint_dir)
    run_config = read_run_config(checkpoint_dir)
    state = read_ema_weights(checkpoint_dir) if use_ema else consolidate(checkpoint_dir)
    build_model(run_config.model, state, str(checkpoint_dir))  # validates names and shapes, strict
    tag = checkpoint_tag(checkpoint_dir)
    return save_export(state, run_config, out_path, source=str(checkpoint_dir.resolve()), tag=tag, ema=use_ema)


def find_metrics(source: Path) -> Path | None:
    """An evaluation's metrics.json beside the source: its `eval/` folder (tarflow-eval's default output)."""
    base = source if source.is_dir() else source.parent
    for candidate in (base / "eval" / "metrics.json", base / "metrics.json", base.parent / "eval" / "metrics.json"):
        if candidate.is_file():
            return candidate
    return None


def export_model_dir(
    checkpoint: str | Path, out_dir: str | Path, use_ema: bool = False, metrics_path: str | Path | None = None
) -> Path:
    """`tarflow-export --format dir`: a model directory (config.json, model.safetensors, README.md model card) from
    a training checkpoint / run directory, an export file or another model directory; written under a temp name
    and renamed. The card summarises `metrics_path`, else an evaluation's metrics.json found beside the source."""
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
