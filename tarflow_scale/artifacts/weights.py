"""The weight-file format: safetensors with the model config and a checksum of the weights in the metadata.

One format serves the export (`tarflow-export`, `tarflow-import`), the `model.safetensors` of a model directory and
the trainer's final export. The checksum (`weights_sha256`) is a SHA-256 over every tensor's name, dtype, shape and
bytes in name order, so it identifies the weights whatever the file's byte layout; flipped bytes in the data region
(which safetensors itself never notices) make `read_weights` raise an error naming the file, and so does a file
that records no checksum.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from .. import atomic
from ..config import TarFlowConfig, model_config_from_dict

EXPORT_FORMAT = "tarflow_scale/1"
SHARED_FILE_MODE = 0o644  # owner read/write, everyone read
CHECKSUM_KEY = "weights_sha256"
# Metadata keys that describe the file itself, not where the weights came from.
FILE_KEYS = ("format", "model_config", CHECKSUM_KEY, "integrity")
# The largest |weight| a weight file may hold. AdamW moves a weight by at most about lr (1 - b1) / sqrt(1 - b2) per
# step (2.2e-3 at lr 1e-3 with the default betas), so 1e4 would take millions of steps all pushing one weight the
# same way at the top learning rate; trained TarFlows hold weights of a few units (initialisation: <= 1). Beyond it
# the weights are damaged or diverged: a flipped exponent bit turns 0.05 into 1.7e37.
MAX_ABS_WEIGHT = 1e4


class CheckpointError(RuntimeError):
    """A checkpoint or export is missing, incomplete, corrupt, or does not match the model config."""


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of every tensor, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """Checksum of a file, or of every file of a folder in name order (what an evaluation records it ran on)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        with file.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def check_weight_values(state: dict[str, torch.Tensor], source: str) -> None:
    """CheckpointError naming the first tensor (in name order) holding a NaN, an infinity or |w| > MAX_ABS_WEIGHT."""
    for name in sorted(state):
        tensor = state[name].detach()
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            index = tuple(int(i) for i in (~finite).nonzero()[0])
            raise CheckpointError(
                f"{source}: {name} holds {float(tensor[index])} at {list(index)} "
                f"({int((~finite).sum())} non-finite values): damaged or diverged weights are not written"
            )
        largest = tensor.abs().max()
        if float(largest) > MAX_ABS_WEIGHT:
            index = tuple(int(i) for i in (tensor.abs() == largest).nonzero()[0])
            raise CheckpointError(
                f"{source}: {name} holds {float(tensor[index]):.4g} at {list(index)}, beyond the |w| <= "
                f"{MAX_ABS_WEIGHT:g} a trained TarFlow stays within: damaged or diverged weights are not written"
            )


def write_weights(path: str | Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write fp32 weights + metadata (with their checksum) atomically: a temp file renamed over `path`. Weights that
    are not finite or beyond MAX_ABS_WEIGHT are refused (CheckpointError naming the tensor)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().float().contiguous().cpu() for k, v in state.items()}
    check_weight_values(tensors, metadata.get("source") or str(path))
    metadata = {**metadata, CHECKSUM_KEY: weights_sha256(tensors)}
    path = Path(path)
    with atomic.atomic_path(path) as tmp:  # never a half-written file under the final name
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, SHARED_FILE_MODE)  # exports live on shared storage: readable by colleagues
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors header metadata, without reading the weights."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Weights and metadata of a weight file, its checksum verified (`metadata["integrity"] == "verified"`)."""
    from safetensors.torch import load_file

    metadata = read_metadata(path)
    expected = metadata.get(CHECKSUM_KEY)
    if expected is None:
        raise CheckpointError(
            f"{path} records no weights checksum ({CHECKSUM_KEY}), so its weights cannot be verified: not a "
            "tarflow_scale weight file (export it again with tarflow-export or tarflow-import)"
        )
    try:
        state = load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    if weights_sha256(state) != expected:
        raise CheckpointError(
            f"{path} is corrupt: its weights do not match the checksum recorded when it was written "
            f"({CHECKSUM_KEY}={expected[:16]}...); copy it again from the source"
        )
    metadata["integrity"] = "verified"
    return state, metadata


def export_model_config(path: str | Path, metadata: dict[str, str]) -> TarFlowConfig:
    """The model config embedded in a weight file's metadata (CheckpointError when it is not an export)."""
    if metadata.get("format") != EXPORT_FORMAT or "model_config" not in metadata:
        raise CheckpointError(f"{path} is not a tarflow_scale export (no {EXPORT_FORMAT} model_config metadata)")
    return model_config_from_dict(json.loads(metadata["model_config"]))
