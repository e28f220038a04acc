"""The model directory layout (the Hugging Face Hub's: config.json, model.safetensors, README.md) and its reading."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import TarFlowConfig, model_config_from_dict
from .weights import CheckpointError, export_model_config, read_weights

CONFIG_JSON = "config.json"
WEIGHTS_FILE = "model.safetensors"
MODEL_CARD = "README.md"


def is_model_dir(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / CONFIG_JSON).is_file() and (path / WEIGHTS_FILE).is_file()


def read_model_dir(path: str | Path) -> tuple[TarFlowConfig, dict[str, torch.Tensor], dict[str, str]]:
    """A model directory's config, verified weights and weight-file metadata; config.json and the weights' own
    embedded config must agree (a directory assembled from two models is an error naming both files)."""
    path = Path(path)
    config_path, weights_path = path / CONFIG_JSON, path / WEIGHTS_FILE
    try:
        described = json.loads(config_path.read_text())
        config = model_config_from_dict(described["model"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{config_path} is not a tarflow_scale model config ({type(e).__name__}: {e})") from e
    state, metadata = read_weights(weights_path)
    if export_model_config(weights_path, metadata) != config:
        raise CheckpointError(f"{config_path} and {weights_path} describe different models")
    return config, state, metadata
