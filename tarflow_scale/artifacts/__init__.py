"""Artifacts: everything written to disk that holds weights, and the one way back to a model.

`weights`: the checksummed safetensors format; `checkpoints`: training checkpoint folders (completeness and
checksums, whether a resume may unpickle them, ZeRO consolidation, the embedded run config); `zero_weights`: a ZeRO
checkpoint's fp32 weights read without unpickling; `exports`: export files and model directories; `model_dir`: the
model directory layout; `model_card`: its config.json and README.md; `hub`: `PretrainedTarFlow` (the Hugging Face
Hub mixin); `provenance`: `read_provenance`, what any artifact says about itself; `load`: `build_model` (the one
strict builder) and `load_model` (any artifact -> model).
"""

from .exports import EXPORT_NAME, export_checkpoint, export_model_dir, save_export
from .hub import PretrainedTarFlow
from .load import build_model, load_model
from .provenance import Provenance, TrainingNoise, read_provenance
from .weights import CheckpointError

__all__ = [
    "EXPORT_NAME",
    "CheckpointError",
    "PretrainedTarFlow",
    "Provenance",
    "TrainingNoise",
    "build_model",
    "export_checkpoint",
    "export_model_dir",
    "load_model",
    "read_provenance",
    "save_export",
]
