"""Existing images that `eval.fid_samples` scores instead of generating: a tarflow-data split (WebDataset shards and
their manifest, as `tarflow-sample --format shards` writes them) or a folder of PNG files. Found and checked on the
driver before any worker starts; read on the workers by index range, through the data loaders and their exact
decoder (`data.decode.SampleDecoder`), so an image is scored as the training shards' images are."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from ..config import ConfigError, DataConfig
from ..data import DataError, check_first_sample, check_shard_sizes, make_range_loader, read_manifest
from ..data.decode import SampleDecoder, inexact_reason, read_png_header
from ..data.manifest import is_url, manifest_name

KEY = "eval.fid_samples"
PNG_HEADER_BYTES = 26  # signature + IHDR's width, height, bit depth and colour type


@dataclass(frozen=True)
class SampleRange:
    """Images start .. stop - 1 of a sample set: what one worker reads (a PNG set carries only these files)."""

    kind: Literal["shards", "png"]
    path: str
    split: str  # shards: the manifest's split
    channels: int
    image_size: int
    start: int
    stop: int
    files: tuple[str, ...] = ()  # png: the range's file names, in order


@dataclass(frozen=True)
class SampleSet:
    """A set of existing images, in a fixed order: the split's sample order, or PNG file names sorted."""

    kind: Literal["shards", "png"]
    path: str
    split: str
    num_images: int
    channels: int
    image_size: int
    fingerprint: str  # the content: the shards' sha256, or the PNG files' names, sizes and modification times
    files: tuple[str, ...] = ()

    def range(self, start: int, stop: int) -> SampleRange:
        files = self.files[start:stop] if self.kind == "png" else ()
        return SampleRange(self.kind, self.path, self.split, self.channels, self.image_size, start, stop, files)

    def describe(self) -> dict[str, Any]:
        """What metrics.json records about the set."""
        out = {"path": self.path, "format": self.kind, "num_images": self.num_images, "fingerprint": self.fingerprint}
        if self.kind == "shards":
            out["split"] = self.split
        return out


def _manifest_splits(folder: Path) -> list[str]:
    """The splits whose manifest (`<split>.json`, a JSON object with shards) lies in `folder`."""
    splits = []
    for path in sorted(folder.glob("*.json")):
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # not a manifest: read_manifest reports a damaged one once its split is named
        if isinstance(raw, dict) and "shards" in raw and raw.get("split") == path.stem:
            splits.append(path.stem)
    return splits


def _check_shape(where: str, channels: int, size: int, want_channels: int, want_size: int) -> None:
    if (channels, size) != (want_channels, want_size):
        raise ConfigError(
            f"{where} holds {channels}x{size}x{size} images but the FID reference statistics are of "
            f"{want_channels}x{want_size}x{want_size} images (the model's data): score samples of this model's size"
        )


def _shard_set(root: str, split: str, channels: int, image_size: int) -> SampleSet:
    manifest = read_manifest(root, split)
    where = f"{KEY}={root} (split {split})"
    _check_shape(where, manifest.channels, manifest.image_size, channels, image_size)
    check_shard_sizes(root, manifest)
    check_first_sample(root, manifest)  # 16-bit or alpha PNGs fail here, naming shard and key
    digest = hashlib.sha256("\n".join(manifest.sha256).encode()).hexdigest()
    return SampleSet("shards", root, split, manifest.num_samples, channels, image_size, digest)


def _png_set(folder: Path, channels: int, image_size: int) -> SampleSet:
    files = sorted(p.name for p in folder.iterdir() if p.suffix.lower() == ".png" and p.is_file())
    if not files:
        raise ConfigError(
            f"{KEY}={folder} holds neither a tarflow-data manifest (<split>.json beside its shards) nor .png files"
        )
    digest = hashlib.sha256()
    for name in files:  # the header of every file: a wrong size or bit depth is refused before workers start
        path = folder / name
        with open(path, "rb") as f:
            head = f.read(PNG_HEADER_BYTES)
        try:
            header = read_png_header(head)
        except ValueError:
            raise DataError(f"{path}: not a PNG file (no PNG signature and header)") from None
        reason = inexact_reason(header, False, channels)
        if reason:
            raise DataError(f"{path} {reason}")
        if (header.width, header.height) != (image_size, image_size):
            raise ConfigError(
                f"{path} is {header.width}x{header.height} pixels but the FID reference statistics are of "
                f"{image_size}x{image_size} images (the model's data): score samples of this model's size"
            )
        stat = path.stat()
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    found = SampleSet("png", str(folder), "", len(files), channels, image_size, digest.hexdigest(), tuple(files))
    next(read_batches(found.range(0, 1), 1))  # the first image decoded in full (transparency shows only here)
    return found


def find_sample_set(path: str, split: str, channels: int, image_size: int) -> SampleSet:
    """The images at `path` (eval.fid_samples): a tarflow-data split (`split`, or the folder's only manifest) or a
    folder of PNGs, checked against the reference's channels and image size; errors name the key and the file."""
    if is_url(path):
        return _shard_set(path, split or "train", channels, image_size)
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise ConfigError(f"{KEY}={path} is not a folder (a tarflow-data split or a folder of PNG files)")
    splits = _manifest_splits(folder)
    if split:
        if split not in splits and not (folder / manifest_name(split)).is_file():
            raise ConfigError(
                f"eval.fid_samples_split={split}: {folder} has no {manifest_name(split)} "
                f"(its splits: {', '.join(splits) or 'none'})"
            )
        return _shard_set(str(folder), split, channels, image_size)
    if len(splits) > 1:
        raise ConfigError(
            f"{KEY}={path} holds the splits {', '.join(splits)}: choose one with eval.fid_samples_split=NAME"
        )
    if splits:
        return _shard_set(str(folder), splits[0], channels, image_size)
    return _png_set(folder, channels, image_size)


def _png_pixels(path: str, decoder: SampleDecoder) -> Tensor:
    """(C, H, W) uint8 of one PNG file, decoded exactly as a shard sample is; a DataError names the file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"{path} is unreadable ({type(e).__name__}: {e})") from None
    return decoder.image(data, path, "expected")


def read_batches(images: SampleRange, batch_size: int) -> Iterator[Tensor]:
    """The range's images as (B, C, H, W) uint8 batches of `batch_size` (the last may be shorter), in order."""
    if images.kind == "png":
        decoder = SampleDecoder(images.channels, images.image_size)
        for i in range(0, len(images.files), batch_size):
            names = images.files[i : i + batch_size]
            yield torch.stack([_png_pixels(os.path.join(images.path, name), decoder) for name in names])
        return
    # One stream, no loader processes: batches follow the split's order from `start` (the fid job's chunks).
    data = DataConfig(path=images.path, num_workers=0)
    loader = make_range_loader(data, batch_size, images.start, images.stop, split=images.split)
    for batch, _, _ in loader:
        yield batch
