"""Models from artifacts: the one strict builder (`build_model`) and the one loader of any artifact (`load_model`).

Every path from weights to a model goes through `build_model`: the loaders here, the export check, the evaluation
workers, the trainer's rank-0 copy and the reference-checkpoint import. `load_model` reads an export, a model
directory, a training checkpoint or run directory, or a Hub id.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..config import TarFlowConfig, to_dict
from .checkpoints import consolidate
from .hub import PretrainedTarFlow
from .model_dir import WEIGHTS_FILE, is_model_dir, read_model_dir
from .provenance import embedded_run_config, model_config_differences, read_provenance
from .weights import CheckpointError, export_model_config, read_weights


def build_model(
    config: TarFlowConfig,
    state: dict[str, torch.Tensor],
    source: str,
    provenance: dict[str, str] | None = None,
) -> PretrainedTarFlow:
    """A PretrainedTarFlow(config) holding exactly `state`: every key and shape must match (strict), otherwise a
    CheckpointError names `source`. `provenance`: the metadata strings the weights came with."""
    model = PretrainedTarFlow(config, provenance)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{source} does not match its model config: {e}") from e
    return model


def is_local(name: str) -> bool:
    """Whether `name` means a local path (it exists, or looks like one): those never become a Hub lookup."""
    path = Path(name).expanduser()
    if path.exists() or os.path.isabs(name) or name.startswith((".", "~")):
        return True
    return name.count("/") > 1 or bool(path.suffix)  # a Hub id is "org/name"


def _load_weight_file(path: Path) -> PretrainedTarFlow:
    if path.suffix in (".pth", ".pt"):
        raise CheckpointError(
            f"{path} is a PyTorch pickle, not a tarflow_scale export: convert a reference ml-tarflow "
            f"checkpoint with `tarflow-import ml-tarflow {path} OUT.safetensors`, then load OUT.safetensors"
        )
    state, metadata = read_weights(path)
    config = export_model_config(path, metadata)
    embedded_run_config(metadata, path)  # a stale or damaged run config is refused here, naming the file
    return build_model(config, state, str(path), metadata)


def _load_model_dir(path: Path) -> PretrainedTarFlow:
    config, state, metadata = read_model_dir(path)
    embedded_run_config(metadata, path / WEIGHTS_FILE)
    return build_model(config, state, str(path), metadata)


def _load_checkpoint(path: Path) -> PretrainedTarFlow:
    described = read_provenance(path)  # the newest complete checkpoint of a run directory, and its run config
    folder = described.resolved
    provenance = {"run_config": json.dumps(to_dict(described.run_config)), "source": str(folder.resolve())}
    return build_model(described.model_config, consolidate(folder), str(folder), provenance)


def load_model(path_or_hub_id: str | Path, device: str | torch.device = "cpu") -> PretrainedTarFlow:
    """A model in eval mode on `device` from an export / imported `.safetensors` file (checksum verified), a model
    directory, a training checkpoint or run directory (ZeRO shards consolidated), or a Hub id ("org/name").

    >>> model = load_model("runs/tiny/model.safetensors")   # doctest: +SKIP
    """
    name = str(path_or_hub_id)
    if not isinstance(path_or_hub_id, Path) and not is_local(name):
        return PretrainedTarFlow.from_pretrained(name, map_location=device)  # the mixin downloads the directory
    path = Path(name).expanduser()
    if not path.exists():
        raise CheckpointError(f"model {name} does not exist (not a file, a model directory or a Hub id)")
    if is_model_dir(path):
        model = _load_model_dir(path)
    elif path.is_dir():
        model = _load_checkpoint(path)
    else:
        model = _load_weight_file(path)
    return model.to(device).eval()


def check_initial_weights(path: str | Path, config: TarFlowConfig) -> None:
    """`train.init_from`: the file's model must equal the run's model section; the error lists every difference."""
    diffs = model_config_differences(config, read_provenance(path).model_config)
    if diffs:
        raise CheckpointError(
            f"train.init_from={path}: the run's model section does not match the checkpoint's model (set these in "
            "the run config):\n  " + "\n  ".join(diffs)
        )


def load_initial_weights(path: str | Path, config: TarFlowConfig) -> dict[str, torch.Tensor]:
    """`train.init_from`: the (checked) weights to start fine-tuning from."""
    check_initial_weights(path, config)
    return load_model(path).state_dict()
