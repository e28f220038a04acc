"""The bundled real dataset (crops of the photos inside scikit-image / scikit-learn) and data-path resolution."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import DataConfig
from .manifest import Manifest, is_url, manifest_name, read_manifest
from .shards import write_split
from .sources import ArraySource

BUNDLED_PATH = "bundled"  # the DataConfig.path value that selects this dataset
BUNDLED_VERSION = 1  # bump when the recipe changes: cached copies are then rebuilt
# Colour photographs that ship inside the wheels (no pooch download); each photo is one class.
PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "china",  # scikit-learn
    "flower",  # scikit-learn
)
IMAGE_SIZE = 64
CROP_SIDES = (64, 96, 128)  # crop side in source pixels ("a few scales"); every crop is resized to IMAGE_SIZE
# The right-hand strip of each photo is held out: at least this fraction of the width and at least one
# largest crop wide. Train crops lie left of it, val crops inside it, so no val crop overlaps a train crop.
VAL_FRACTION = 0.2
NUM_TRAIN_PER_PHOTO = 512
NUM_VAL_PER_PHOTO = 64
SAMPLES_PER_SHARD = 256
SEED = 0
SPLITS = ("train", "val")


def load_photo(name: str) -> np.ndarray:
    """(H, W, 3) uint8 photograph, read from the installed scikit-image / scikit-learn packages."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        photo = load_sample_image(f"{name}.jpg")
    else:
        import skimage.data

        photo = getattr(skimage.data, name)()
    photo = np.asarray(photo)
    if photo.ndim != 3 or photo.shape[2] < 3 or photo.dtype != np.uint8:
        raise ValueError(f"photo {name!r} is {photo.dtype} {photo.shape}, not an RGB uint8 image")
    return np.ascontiguousarray(photo[:, :, :3])


@dataclass(frozen=True)
class Crop:
    top: int
    left: int
    side: int  # source pixels
    flip: bool  # mirrored left-right


def val_boundary(width: int) -> int:
    """First column of the held-out strip: train crops use columns [0, b), val crops [b, width)."""
    strip = max(max(CROP_SIDES), round(VAL_FRACTION * width))
    if width - strip < max(CROP_SIDES):
        raise ValueError(f"a photo {width} pixels wide is too narrow to split into train and val regions")
    return width - strip


def plan_crops(
    height: int, width: int, num_train: int, num_val: int, rng: np.random.Generator
) -> dict[str, list[Crop]]:
    """Random crops of a (height, width) photo, at CROP_SIDES scales with random flips, per split."""
    boundary = val_boundary(width)
    regions = {"train": (0, boundary, num_train), "val": (boundary, width, num_val)}
    plans = {}
    for split, (x0, x1, count) in regions.items():
        crops = []
        for _ in range(count):
            side = int(rng.choice(CROP_SIDES))
            top = int(rng.integers(0, height - side + 1))
            left = int(rng.integers(x0, x1 - side + 1))
            crops.append(Crop(top, left, side, bool(rng.integers(0, 2))))
        plans[split] = crops
    return plans


def _cut(photo: np.ndarray, crop: Crop) -> np.ndarray:
    import torch
    import torchvision.transforms.v2.functional as TF

    patch = photo[crop.top : crop.top + crop.side, crop.left : crop.left + crop.side]
    x = torch.from_numpy(np.ascontiguousarray(patch)).permute(2, 0, 1)  # (3, side, side)
    if crop.side != IMAGE_SIZE:
        x = TF.resize(x, [IMAGE_SIZE, IMAGE_SIZE], antialias=True)
    if crop.flip:
        x = x.flip(-1)
    return x.permute(1, 2, 0).numpy()  # (64, 64, 3)


def recipe(num_train_per_photo: int, num_val_per_photo: int) -> dict[str, Any]:
    return {
        "kind": "bundled",
        "version": BUNDLED_VERSION,
        "photos": list(PHOTOS),
        "crop_sides": list(CROP_SIDES),
        "val_fraction": VAL_FRACTION,
        "num_train_per_photo": num_train_per_photo,
        "num_val_per_photo": num_val_per_photo,
        "seed": SEED,
    }


def bundled_sources(
    num_train_per_photo: int = NUM_TRAIN_PER_PHOTO, num_val_per_photo: int = NUM_VAL_PER_PHOTO
) -> dict[str, ArraySource]:
    """The crops of every photo, per split, in a fixed shuffled order (so each shard mixes all classes)."""
    images: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    labels: dict[str, list[int]] = {s: [] for s in SPLITS}
    keys: dict[str, list[str]] = {s: [] for s in SPLITS}
    for label, name in enumerate(PHOTOS):
        photo = load_photo(name)
        # One stream per photo: changing one photo's crops leaves the others' alone.
        rng = np.random.default_rng([SEED, label])
        plans = plan_crops(photo.shape[0], photo.shape[1], num_train_per_photo, num_val_per_photo, rng)
        for split, crops in plans.items():
            for j, crop in enumerate(crops):
                images[split].append(_cut(photo, crop))
                labels[split].append(label)
                keys[split].append(f"{name}-{j:05d}")
    sources = {}
    for k, split in enumerate(SPLITS):
        order = np.random.default_rng([SEED, len(PHOTOS), k]).permutation(len(keys[split]))
        sources[split] = ArraySource(
            images=np.stack(images[split])[order],
            labels=np.asarray(labels[split], dtype=np.int64)[order],
            keys=[keys[split][i] for i in order],
            num_classes=len(PHOTOS),
            class_names=list(PHOTOS),
            description=recipe(num_train_per_photo, num_val_per_photo),
        )
    return sources


def build_bundled(
    out_dir: str,
    *,
    num_train_per_photo: int = NUM_TRAIN_PER_PHOTO,
    num_val_per_photo: int = NUM_VAL_PER_PHOTO,
    samples_per_shard: int = SAMPLES_PER_SHARD,
    num_procs: int = 1,
    progress: bool = False,
) -> dict[str, Manifest]:
    """Write the bundled dataset (shards + manifests, ImageNet64's format) into `out_dir`; a finished copy is
    verified, a copy from an older recipe is rebuilt."""
    sources = bundled_sources(num_train_per_photo, num_val_per_photo)
    return {
        split: write_split(
            out_dir,
            source,
            name=BUNDLED_PATH,
            split=split,
            samples_per_shard=samples_per_shard,
            num_procs=num_procs,
            progress=progress,
            on_mismatch="rebuild",
        )
        for split, source in sources.items()
    }


def bundled_dir() -> str:
    """Where `resolve_data_path` keeps the bundled dataset: $TARFLOW_DATA_DIR, else the user cache."""
    return os.path.abspath(os.path.expanduser(os.environ.get("TARFLOW_DATA_DIR") or "~/.cache/tarflow_scale/bundled"))


def _is_built(root: str) -> bool:
    """Both manifests exist (written last, atomically), come from the current recipe and list existing shards."""
    wanted = recipe(NUM_TRAIN_PER_PHOTO, NUM_VAL_PER_PHOTO)
    for split in SPLITS:
        if not os.path.exists(os.path.join(root, manifest_name(split))):
            return False
        try:
            manifest = read_manifest(root, split)
        except Exception:
            return False
        if manifest.source.get("input") != wanted:
            return False
        if not all(os.path.exists(os.path.join(root, shard)) for shard in manifest.shards):
            return False
    return True


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the atomic renames alone keep concurrent builds safe
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def resolve_data_path(cfg: DataConfig, announce: Callable[[str], None] | None = None) -> str:
    """The dataset root (a folder or URL prefix) that `cfg.path` names; "bundled" builds the bundled dataset
    on first use. Concurrent callers (ranks, nodes) are safe: a file lock lets one build while the others
    wait, and where the lock does not reach (some network file systems) every file is written under a temp
    name and renamed, with byte-identical content whoever writes it. `announce(line)`, when given, hears when a
    build starts and ends (the first run waits for it)."""
    if cfg.path != BUNDLED_PATH:
        return cfg.path if is_url(cfg.path) else os.path.abspath(os.path.expanduser(cfg.path))
    root = bundled_dir()
    if _is_built(root):
        return root
    os.makedirs(os.path.dirname(root), exist_ok=True)
    with _file_lock(root + ".lock"):
        if not _is_built(root):
            started = time.time()
            total = len(PHOTOS) * (NUM_TRAIN_PER_PHOTO + NUM_VAL_PER_PHOTO)
            if announce is not None:
                announce(f"building the bundled dataset ({total} crops of {len(PHOTOS)} photos, first use): {root}")
            # Recipe sizes read now (not as bound defaults), so tests can shrink them. A shard bar on a terminal.
            build_bundled(
                root,
                num_train_per_photo=NUM_TRAIN_PER_PHOTO,
                num_val_per_photo=NUM_VAL_PER_PHOTO,
                progress=announce is not None and sys.stderr.isatty(),
            )
            if announce is not None:
                announce(f"bundled dataset ready in {time.time() - started:.0f}s")
    return root
