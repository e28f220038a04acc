"""Sharded WebDataset data: converters, manifest, the bundled dataset, loaders and noise augmentation."""

from .bundled import build_bundled, bundled_dir, resolve_data_path
from .loader import DataStats, EvalLoader, TrainLoader, make_eval_loader, make_range_loader, make_train_loader
from .manifest import DataError, Manifest, check_shard_sizes, read_manifest, write_manifest
from .noise import BIN_WIDTH, augment
from .shards import write_split
from .sources import FolderSource, NpzSource
from .verify import check_first_sample, verify

__all__ = [
    "BIN_WIDTH",
    "DataError",
    "DataStats",
    "EvalLoader",
    "FolderSource",
    "Manifest",
    "NpzSource",
    "TrainLoader",
    "augment",
    "build_bundled",
    "check_first_sample",
    "check_shard_sizes",
    "bundled_dir",
    "make_eval_loader",
    "make_range_loader",
    "make_train_loader",
    "read_manifest",
    "resolve_data_path",
    "verify",
    "write_manifest",
    "write_split",
]
