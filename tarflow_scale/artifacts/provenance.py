"""What an artifact says about itself, read without its weights: `read_provenance` for any export or checkpoint.

Its kind, model config, training run config, training noise and source; one reader for exports, model directories,
checkpoint folders and run directories, used by evaluation, sampling, fine-tuning and the model card.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..config import RunConfig, TarFlowConfig, from_dict, to_dict
from .checkpoints import checkpoint_tag, latest_checkpoint, read_run_config
from .model_dir import WEIGHTS_FILE, is_model_dir
from .weights import CheckpointError, export_model_config, read_metadata


@dataclass(frozen=True)
class TrainingNoise:
    """The noise augmentation the weights were trained with (from the embedded run config)."""

    noise: str  # "gaussian" | "uniform" | "none" | "unknown" (the artifact embeds no run config)
    noise_std: float  # sigma on [-1, 1]; 0 unless gaussian
    source: str  # where this was read from


@dataclass
class Provenance:
    """An export, model directory or training checkpoint, described without loading its weights."""

    path: Path  # as given: a .safetensors export, a model directory, a checkpoint folder or a run directory
    kind: str  # "export" | "model_dir" | "training_checkpoint"
    resolved: Path  # the file or the checkpoint folder actually read
    model_config: TarFlowConfig
    run_config: RunConfig | None  # the training run's resolved config; None when the artifact embeds none
    noise: TrainingNoise
    # Export metadata (source, tag, weights, checksum, ...) without the configs; {"tag": ...} for a checkpoint.
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def source(self) -> str:
        """Where the weights came from: the training checkpoint, "live engine", or an imported file."""
        return self.metadata.get("source", str(self.resolved.resolve()))

    @property
    def tag(self) -> str:
        return self.metadata.get("tag", "")

    @property
    def weights(self) -> str:
        """Which weights: "raw" or "ema" (the exponential moving average)."""
        return self.metadata.get("weights", "raw")


def embedded_run_config(metadata: dict[str, str], where: str | Path) -> RunConfig | None:
    """The training run config in a weight file's metadata (None when it has none); one that does not load with
    this version's schema is a CheckpointError naming `where`."""
    if "run_config" not in metadata:
        return None
    try:
        return from_dict(RunConfig, json.loads(metadata["run_config"]))
    except (ValueError, TypeError) as e:  # ConfigError names the key; JSONDecodeError the position
        raise CheckpointError(f"{where}: its embedded training run config is not valid: {e}") from e


def training_noise(run_config: RunConfig | None, where: str | Path) -> TrainingNoise:
    """The noise augmentation `run_config` trained with; "unknown" (sigma 0) without a run config."""
    if run_config is None:
        return TrainingNoise("unknown", 0.0, f"{where} embeds no run config")
    data = run_config.data
    return TrainingNoise(data.noise, data.noise_std if data.noise == "gaussian" else 0.0, f"{where} run config")


def read_provenance(path: str | Path) -> Provenance:
    """Describe `path` (an export, a model directory, a checkpoint folder or a run directory's newest complete
    checkpoint) from its embedded configs; reads no weights. CheckpointError when it is none of these."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist (pass an exported .safetensors or a run directory)")
    if is_model_dir(path):
        kind, weights_file = "model_dir", path / WEIGHTS_FILE
    elif path.is_dir():
        folder = latest_checkpoint(path)
        run_config = read_run_config(folder)
        noise = training_noise(run_config, folder)
        return Provenance(path, "training_checkpoint", folder, run_config.model, run_config, noise,
                          {"tag": checkpoint_tag(folder)})  # fmt: skip
    else:
        kind, weights_file = "export", path
    metadata = read_metadata(weights_file)
    model_config = export_model_config(weights_file, metadata)
    run_config = embedded_run_config(metadata, weights_file)
    described = {k: v for k, v in metadata.items() if k not in ("model_config", "run_config")}
    return Provenance(path, kind, weights_file, model_config, run_config, training_noise(run_config, weights_file),
                      described)  # fmt: skip


def model_config_differences(given: TarFlowConfig, actual: TarFlowConfig) -> list[str]:
    """`model.KEY: config A, checkpoint B` for every model setting that differs."""
    a, b = to_dict(given), to_dict(actual)
    return [
        f"model.{k}: config {a.get(k)!r}, checkpoint {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]
