"""tarflow_scale: distributed TarFlow training, evaluation and export."""

from .artifacts import PretrainedTarFlow, load_model, read_provenance
from .config import Decoding, Guidance, RunConfig, TarFlowConfig, load_config
from .models.likelihood import LOG_BIN_WIDTH_8BIT, bits_per_dim
from .models.tarflow import NULL_LABEL, FlowBlock, TarFlow, patchify, unpatchify

__all__ = [
    "LOG_BIN_WIDTH_8BIT",
    "NULL_LABEL",
    "Decoding",
    "FlowBlock",
    "Guidance",
    "PretrainedTarFlow",
    "RunConfig",
    "TarFlow",
    "TarFlowConfig",
    "bits_per_dim",
    "load_config",
    "load_model",
    "patchify",
    "read_provenance",
    "unpatchify",
]
