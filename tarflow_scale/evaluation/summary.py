"""The end-of-run check on the driver: held-out bits/dim from one exact pass, next to PNG's on the same images.

A quick, single-process version of the `bpd` job (same maths, `batch_bits_per_dim`): every held-out image is
scored exactly once (checked by key) with uniform dequantization, so the number is a bound on the discrete NLL,
directly comparable with a lossless codec's file size. PNG's figure is the mean of bytes * 8 / (C H W) over the
same images encoded by PIL with optimize=True.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig
from ..data import DataError, make_eval_loader, read_manifest
from ..models.tarflow import TarFlow
from .bpd import batch_bits_per_dim, summarize

# Above this many held-out images the driver skips the quick pass (ImageNet's 50k val: use tarflow-eval).
MAX_QUICK_EVAL_IMAGES = 4096
PNG_CACHE_VERSION = 1


@dataclass
class HeldOutScore:
    mean: float
    stderr: float
    num_images: int
    split: str


def heldout_bits_per_dim(model: TarFlow, data: DataConfig, batch_size: int = 64, seed: int = 0) -> HeldOutScore:
    """Uniform-dequantized bits/dim of every image of `data.eval_split`, each exactly once (one process).

    Raises DataError if an image is seen twice or the pass does not cover the manifest's count.
    """
    model.eval()
    loader = make_eval_loader(data, batch_size, rank=0, world_size=1)
    values, seen = [], set()
    device = next(model.parameters()).device
    for images, labels, keys in loader:
        duplicate = seen.intersection(keys)
        if duplicate:
            raise DataError(f"held-out image {sorted(duplicate)[0]} was read twice")
        seen.update(keys)
        y = labels.to(device) if model.config.num_classes else None
        values.append(batch_bits_per_dim(model, images.to(device), y, list(keys), kind="uniform", seed=seed).cpu())
    expected = loader.manifest.num_samples
    if len(seen) != expected:
        raise DataError(f"the held-out pass saw {len(seen)} images, the {data.eval_split} manifest lists {expected}")
    stats = summarize(torch.cat(values).numpy())
    return HeldOutScore(stats["mean"], stats["stderr"], stats["num_images"], data.eval_split)


def png_bits(image_hwc: np.ndarray) -> float:
    """Bits per dimension of one uint8 (H, W, C) image as an optimized PNG file."""
    from PIL import Image

    buffer = io.BytesIO()
    image = Image.fromarray(image_hwc.squeeze(-1) if image_hwc.shape[-1] == 1 else image_hwc)
    image.save(buffer, format="PNG", optimize=True)  # in memory: only the byte count matters
    return len(buffer.getvalue()) * 8 / image_hwc.size


def png_bits_per_dim(data: DataConfig, root: str) -> float:
    """Mean PNG bits/dim of the held-out split, cached beside a local dataset (keyed by the shards' checksums)."""
    manifest = read_manifest(root, data.eval_split)
    key = hashlib.sha256(json.dumps([PNG_CACHE_VERSION, manifest.sha256, data.image_size]).encode()).hexdigest()
    cache = Path(root) / f"png_bpd-{data.eval_split}.json" if os.path.isdir(root) else None
    if cache is not None and cache.is_file():
        try:
            stored = json.loads(cache.read_text())
            if stored.get("key") == key:
                return float(stored["png_bits_per_dim"])
        except (json.JSONDecodeError, KeyError, ValueError):
            pass
    bits = [
        png_bits(image.permute(1, 2, 0).numpy())
        for images, _, _ in make_eval_loader(data, 256, rank=0, world_size=1)
        for image in images
    ]
    value = float(np.mean(bits))
    if cache is not None:
        try:
            tmp = cache.with_name(cache.name + f".{os.getpid()}.partial")
            tmp.write_text(json.dumps({"key": key, "png_bits_per_dim": value, "num_images": len(bits)}) + "\n")
            tmp.replace(cache)
        except OSError:  # a read-only dataset folder: just recompute next time
            pass
    return value


def comparison_line(model_bpd: float, png_bpd: float) -> str:
    """'beats PNG by X bits/dim' or an honest 'does not beat PNG (X bits/dim worse)'."""
    gap = png_bpd - model_bpd
    if gap > 0:
        return f"beats PNG by {gap:.2f} bits/dim ({gap / png_bpd:.1%} smaller than PNG)"
    return f"does not beat PNG yet: {-gap:.2f} bits/dim worse (train longer: raise train.num_steps)"
