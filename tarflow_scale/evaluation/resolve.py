"""The run config an evaluation runs with, assembled around what the checkpoint records (artifacts.provenance)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..artifacts.provenance import Provenance, model_config_differences
from ..config import ConfigError, RunConfig, TarFlowConfig, from_dict, parse_overrides, read_yaml_mapping, to_dict
from ..config.loading import merge_trees


def resolve_config(
    info: Provenance, config_path: str | Path | None = None, overrides: list[str] | None = None
) -> RunConfig:
    """Defaults -> the checkpoint's training run config -> the YAML file -> dotted overrides; validated.

    The model always comes from the checkpoint. A model section in the file or the overrides must describe the
    same model (defaults filled in), otherwise a ConfigError names every differing key. Only the parts an
    evaluation uses are validated (model, data, cluster, eval): the training batch arithmetic is irrelevant.
    """
    user: dict[str, Any] = read_yaml_mapping(config_path) if config_path is not None else {}
    user = merge_trees(user, parse_overrides(overrides or []))
    if "model" in user:
        if not isinstance(user["model"], dict):
            raise ConfigError("model: expected a mapping")
        diffs = model_config_differences(from_dict(TarFlowConfig, user["model"], prefix="model."), info.model_config)
        if diffs:
            raise ConfigError(
                f"the config's model section does not match the checkpoint {info.path}:\n  "
                + "\n  ".join(diffs)
                + "\nRemove the model section (and model.* overrides) to evaluate the checkpoint's own model, "
                "or fix these keys."
            )
    base = to_dict(info.run_config) if info.run_config is not None else {}
    tree = merge_trees(base, user)
    tree["model"] = to_dict(info.model_config)
    where = f"{config_path}: " if config_path is not None else ""
    try:
        config = from_dict(RunConfig, tree)
    except ConfigError as e:
        raise ConfigError(f"{where}{e}") from None
    for part in (config.model, config.data, config.cluster, config.eval):
        part.validate()
    return config


def default_out_dir(info: Provenance) -> Path:
    """`eval/` beside an export or a checkpoint folder; inside a run directory."""
    path = info.path.resolve()
    if path.is_file() or path.name.startswith("checkpoint_"):
        return path.parent / "eval"
    return path / "eval"
