"""Interoperability: import checkpoints of other TarFlow implementations (the reference apple/ml-tarflow).

A layer above artifacts/: it uses models, config and artifacts, never training, evaluation, cli or ray.
"""

from .ml_tarflow import import_checkpoint as import_ml_tarflow
from .ml_tarflow import reference_log_det

__all__ = ["import_ml_tarflow", "reference_log_det"]
