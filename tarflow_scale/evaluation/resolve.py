"""What an evaluation runs on: the checkpoint's embedded configs, and the run config assembled around them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checkpoint import CheckpointError, latest_checkpoint, read_run_config
from ..config import (
    ConfigError,
    RunConfig,
    TarFlowConfig,
    from_dict,
    parse_overrides,
    read_yaml_mapping,
    to_dict,
)
from ..config.loading import merge_trees
from ..weights import WEIGHTS_FILE, export_model_config, is_model_dir, read_metadata


@dataclass
class CheckpointInfo:
    """An export or training checkpoint, read without loading its weights."""

    path: Path  # as given: a .safetensors export, a model directory, a checkpoint folder or a run directory
    kind: str  # "export" | "model_dir" | "training_checkpoint"
    resolved: Path  # the file or the checkpoint folder actually read
    model_config: TarFlowConfig
    run_config: RunConfig | None  # the training run's resolved config, when the artifact embeds it
    metadata: dict[str, str]  # export metadata (source, tag, weights), or {"tag": ...} for a checkpoint folder


def inspect_checkpoint(path: str | Path) -> CheckpointInfo:
    """Read the model config and training run config embedded in `path` (CheckpointError if it has none)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist (pass an exported .safetensors or a run directory)")
    kind, weights_file = "export", path
    if is_model_dir(path):
        kind, weights_file = "model_dir", path / WEIGHTS_FILE
    elif path.is_dir():
        folder = latest_checkpoint(path)
        run_config = read_run_config(folder)
        tag_file = folder / "latest"
        meta = {"tag": tag_file.read_text().strip() if tag_file.is_file() else ""}
        return CheckpointInfo(path, "training_checkpoint", folder, run_config.model, run_config, meta)
    metadata = read_metadata(weights_file)
    model_config = export_model_config(weights_file, metadata)
    run_config = None
    if "run_config" in metadata:
        try:
            run_config = from_dict(RunConfig, json.loads(metadata["run_config"]))
        except (ConfigError, json.JSONDecodeError):
            run_config = None  # an export from an older config schema: its model config still loads
    extra = {k: v for k, v in metadata.items() if k not in ("model_config", "run_config")}
    return CheckpointInfo(path, kind, weights_file, model_config, run_config, extra)




def _differences(given: dict, actual: dict, prefix: str = "model.") -> list[str]:
    return [
        f"{prefix}{key}: config {given.get(key)!r}, checkpoint {actual.get(key)!r}"
        for key in sorted(set(given) | set(actual))
        if given.get(key) != actual.get(key)
    ]


def resolve_config(
    info: CheckpointInfo, config_path: str | Path | None = None, overrides: list[str] | None = None
) -> RunConfig:
    """Defaults -> the checkpoint's training run config -> the YAML file -> dotted overrides; validated.

    The model always comes from the checkpoint. A model section in the file or the overrides must describe the
    same model (defaults filled in), otherwise a ConfigError names every differing key. Only the parts an
    evaluation uses are validated (model, data, cluster, eval): the training batch arithmetic is irrelevant.
    """
    user: dict[str, Any] = read_yaml_mapping(config_path) if config_path is not None else {}
    user = merge_trees(user, parse_overrides(overrides or []))
    actual = to_dict(info.model_config)
    if "model" in user:
        if not isinstance(user["model"], dict):
            raise ConfigError("model: expected a mapping")
        given = to_dict(from_dict(TarFlowConfig, user["model"], prefix="model."))
        diffs = _differences(given, actual)
        if diffs:
            raise ConfigError(
                f"the config's model section does not match the checkpoint {info.path}:\n  "
                + "\n  ".join(diffs)
                + "\nRemove the model section (and model.* overrides) to evaluate the checkpoint's own model, "
                "or fix these keys."
            )
    base = to_dict(info.run_config) if info.run_config is not None else {}
    tree = merge_trees(base, user)
    tree["model"] = actual
    where = f"{config_path}: " if config_path is not None else ""
    try:
        config = from_dict(RunConfig, tree)
    except ConfigError as e:
        raise ConfigError(f"{where}{e}") from None
    for part in (config.model, config.data, config.cluster, config.eval):
        part.validate()
    return config


@dataclass(frozen=True)
class TrainingNoise:
    """The noise augmentation the checkpoint was trained with (from its embedded run config)."""

    noise: str  # "gaussian" | "uniform" | "none" | "unknown"
    noise_std: float
    source: str  # where this was read from


def training_noise(info: CheckpointInfo) -> TrainingNoise:
    if info.run_config is None:
        return TrainingNoise("unknown", 0.0, f"{info.path} embeds no run config")
    data = info.run_config.data
    return TrainingNoise(data.noise, data.noise_std if data.noise == "gaussian" else 0.0, f"{info.resolved} run config")


def default_out_dir(info: CheckpointInfo) -> Path:
    """`eval/` beside an export or a checkpoint folder; inside a run directory."""
    path = info.path.resolve()
    if path.is_file() or path.name.startswith("checkpoint_"):
        return path.parent / "eval"
    return path / "eval"
