"""Checkpoint artifacts: consolidate a DeepSpeed ZeRO checkpoint, export it to one safetensors file, load it back.

Two kinds of artifact (as in EDM2): the training checkpoint (a folder Ray Train stores: DeepSpeed engine state
of every rank + `config.yaml`), for resuming; and the export (one `.safetensors` file whose metadata embeds the
model config), for sampling and evaluation without DeepSpeed or Ray.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import yaml

from .config import RunConfig, TarFlowConfig, from_dict, model_config_from_dict, to_dict
from .models.tarflow import TarFlow

CONFIG_FILE = "config.yaml"  # the resolved run config, written into every checkpoint folder
EXPORT_NAME = "model.safetensors"  # the slim export the trainer writes into run_dir at the end
EMA_FILE = "ema.safetensors"  # EMA weights (when optim.ema_decay > 0), beside the engine state
EXPORT_FORMAT = "tarflow_scale/1"
# Wrappers that prefix parameter names: activation checkpointing and torch.compile.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")
# Exports land on shared storage: owner read/write, everyone read (temp files from `tempfile` would be 0600).
SHARED_FILE_MODE = 0o644


class CheckpointError(RuntimeError):
    """A checkpoint or export is missing, incomplete, or does not match the model config."""


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
    if (path / CONFIG_FILE).is_file() and (path / "latest").is_file():
        return path
    candidates = sorted(p for p in path.glob("checkpoint_*") if (p / "latest").is_file())
    if not candidates:
        raise CheckpointError(f"{path} holds no complete checkpoint (no checkpoint_*/latest)")
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
    state: dict[str, torch.Tensor], run_config: RunConfig, out_path: str | Path, source: str, tag: str, ema: bool
) -> Path:
    """Write the export format: weights + model/run config in the safetensors metadata, and OUT.json beside."""
    from safetensors.torch import save_file

    metadata = {
        "format": EXPORT_FORMAT,
        "model_config": json.dumps(to_dict(run_config.model)),
        "run_config": json.dumps(to_dict(run_config)),
        "source": source,
        "tag": tag,
        "weights": "ema" if ema else "raw",
    }
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".partial")
    save_file({k: v.detach().float().contiguous().cpu() for k, v in state.items()}, str(tmp), metadata=metadata)
    os.chmod(tmp, SHARED_FILE_MODE)  # readable by colleagues on shared storage, whatever wrote the temp file
    tmp.replace(out_path)  # never leave a half-written export under the final name
    sidecar = out_path.with_suffix(".json")
    sidecar_tmp = sidecar.with_name(sidecar.name + ".partial")
    sidecar_tmp.write_text(json.dumps(to_dict(run_config.model), indent=2) + "\n")
    os.chmod(sidecar_tmp, SHARED_FILE_MODE)
    sidecar_tmp.replace(sidecar)
    return out_path


def load_model(path: str | Path, device: str | torch.device = "cpu") -> TarFlow:
    """A TarFlow from an exported `.safetensors` file, or from a training checkpoint / run directory."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        checkpoint_dir = latest_checkpoint(path)
        model = build_model(read_run_config(checkpoint_dir).model, consolidate(checkpoint_dir), str(checkpoint_dir))
        return model.to(device).eval()
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    if metadata.get("format") != EXPORT_FORMAT or "model_config" not in metadata:
        raise CheckpointError(f"{path} is not a tarflow_scale export (no {EXPORT_FORMAT} model_config metadata)")
    config = model_config_from_dict(json.loads(metadata["model_config"]))
    return build_model(config, load_file(str(path)), str(path)).to(device).eval()


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
