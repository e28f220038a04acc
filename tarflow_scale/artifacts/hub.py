"""`PretrainedTarFlow`: a TarFlow with its provenance, saved and loaded as model directories and on the Hub.

huggingface_hub's PyTorchModelHubMixin gives `from_pretrained`, `save_pretrained` and `push_to_hub`; the hooks here
read and write our verified format. The architecture stays in models/tarflow.py; this module is its I/O.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from huggingface_hub import PyTorchModelHubMixin

from ..config import TarFlowConfig, to_dict
from ..models.tarflow import TarFlow
from . import model_card
from .model_dir import CONFIG_JSON, MODEL_CARD, WEIGHTS_FILE, is_model_dir
from .weights import EXPORT_FORMAT, FILE_KEYS, CheckpointError, write_weights

# What the mixin's from_pretrained passes on to the download (revision, cache, credentials).
_DOWNLOAD_ARGS = ("revision", "cache_dir", "force_download", "local_files_only", "token")


class PretrainedTarFlow(
    TarFlow,
    PyTorchModelHubMixin,
    library_name="tarflow_scale",
    paper_url=model_card.PAPER_URL,
    tags=["normalizing-flow", "tarflow", "image-generation"],
    model_card_template=model_card.MODEL_CARD_TEMPLATE,
):
    """A TarFlow with its provenance; what every loader (tarflow_scale.artifacts.load_model) returns.

    `save_pretrained(DIR)` / `from_pretrained(DIR | FILE.safetensors | "org/name")` / `push_to_hub("org/name")`:
    a model directory holds config.json, model.safetensors (weights checksum verified on load) and a README.md
    model card built from the provenance (training data, noise, steps, the full recipe) and optional metrics.
    """

    def __init__(self, config: TarFlowConfig, provenance: dict[str, str] | None = None):
        super().__init__(config)
        # Where the weights came from (export metadata strings: the training run config with its noise, source,
        # tag); set by the loaders, carried into save_pretrained so a saved model stays self-describing.
        self.provenance: dict[str, str] = {k: v for k, v in (provenance or {}).items() if k not in FILE_KEYS}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> PretrainedTarFlow:
        """A model directory, an export / imported `.safetensors` file, or a Hub id ("org/name", downloaded).

        Local paths never touch the network; a missing local-looking path is an error, not a Hub lookup. A training
        checkpoint or run directory loads with tarflow_scale.artifacts.load_model (it consolidates ZeRO shards).
        """
        from .load import is_local, load_model  # load.py builds PretrainedTarFlow: imported on use

        name = str(pretrained_model_name_or_path)
        path = Path(name).expanduser()
        if path.is_dir() and not is_model_dir(path):
            raise CheckpointError(
                f"{path} is not a model directory (needs {CONFIG_JSON} and {WEIGHTS_FILE}); a training run or "
                "checkpoint folder loads with tarflow_scale.artifacts.load_model"
            )
        if isinstance(pretrained_model_name_or_path, Path) or is_local(name):
            return load_model(path, kwargs.get("map_location", "cpu"))  # a Path: always local
        return super().from_pretrained(name, **kwargs)  # the mixin fetches config.json, then calls _from_pretrained

    @classmethod
    def _from_pretrained(cls, *, model_id: str, map_location: str = "cpu", **given: Any) -> PretrainedTarFlow:
        """The mixin's hook for a Hub id: download the model directory, then load it like a local one (verified).
        The mixin also passes config.json's content; the directory is re-read instead."""
        from huggingface_hub import snapshot_download

        from .load import load_model

        download = {k: given[k] for k in _DOWNLOAD_ARGS if k in given}
        folder = snapshot_download(repo_id=model_id, allow_patterns=[CONFIG_JSON, WEIGHTS_FILE, MODEL_CARD], **download)
        return load_model(folder, map_location)

    def _save_pretrained(self, save_directory: Path) -> None:
        """model.safetensors: fp32 weights, the model config and provenance in the metadata, and their checksum."""
        metadata = {"format": EXPORT_FORMAT, "model_config": json.dumps(to_dict(self.config)), **self.provenance}
        write_weights(Path(save_directory) / WEIGHTS_FILE, self.state_dict(), metadata)

    def save_pretrained(
        self, save_directory: str | Path, *, metrics: dict[str, Any] | None = None, **kwargs: Any
    ) -> str | None:
        """Write DIR/config.json, DIR/model.safetensors and DIR/README.md (kept if present, as on the Hub).

        `metrics`: an evaluation's metrics.json content, summarised in the model card. Other keyword arguments
        go to the mixin (`push_to_hub=True, repo_id=...`).
        """
        if kwargs.get("config") is None:  # push_to_hub passes config=None: still our config.json, not the dataclass
            kwargs["config"] = model_card.config_json(self.config, self.provenance)
        num_params = sum(p.numel() for p in self.parameters())
        card = model_card.card_fields(self.config, self.provenance, metrics, str(save_directory), num_params)
        kwargs["model_card_kwargs"] = {**card, **(kwargs.get("model_card_kwargs") or {})}
        return super().save_pretrained(save_directory, **kwargs)
