"""Checking local shards against their manifest: checksums and sizes, every sample decoded (`deep`), and the cheap
first-sample check a run makes before its workers start."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, BinaryIO

import webdataset as wds

from .decode import SampleDecoder
from .manifest import DataError, Manifest, file_sha256, is_url, join

MAX_PROBLEMS_PER_SHARD = 10  # beyond this a shard's remaining problems are only counted


def verify(root: str, manifest: Manifest, deep: bool = False) -> list[str]:
    """Problems with the local shards of `manifest`, one line each naming the shard (and the key); [] if none.

    Always: every shard exists with the recorded sha256 and size. `deep`: every sample is also decoded by the
    loaders' own decoder (an exact 8-bit PNG of the manifest's size and channels, a label in [0, num_classes))
    and each shard's sample count is compared with the manifest's.
    """
    problems = []
    decoder = SampleDecoder(manifest.channels, manifest.image_size, manifest.num_classes) if deep else None
    for index, (name, count, digest) in enumerate(zip(manifest.shards, manifest.samples_per_shard, manifest.sha256)):
        path = os.path.join(root, name)
        if not os.path.isfile(path):
            problems.append(f"{path}: missing")
            continue
        if manifest.shard_bytes and os.path.getsize(path) != manifest.shard_bytes[index]:  # no read needed
            problems.append(f"{path}: size differs from the manifest's shard_bytes")
            continue
        actual = file_sha256(path)
        if actual != digest:
            problems.append(f"{path}: sha256 {actual[:12]}... does not match the manifest's {digest[:12]}...")
            continue
        if decoder is not None:
            problems += _sample_problems(path, count, decoder)
    return problems


def _samples(stream: BinaryIO, path: str) -> Iterator[dict[str, Any]]:
    """The samples of an open shard, as the loaders group them (`__key__`, `__url__`, one entry per field)."""
    return wds.tariterators.group_by_keys(wds.tariterators.tar_file_expander([{"url": path, "stream": stream}]))


def _sample_problems(path: str, expected: int, decoder: SampleDecoder) -> list[str]:
    problems, found, key = [], 0, None
    try:
        with open(path, "rb") as stream:
            for sample in _samples(stream, path):
                key = sample["__key__"]
                found += 1
                try:
                    decoder(sample)
                except DataError as e:
                    problems.append(str(e))
    except Exception as e:  # the tar reader's own errors: the rest of the shard is unreadable
        where = f"after sample {key!r}" if key is not None else "before its first sample"
        problems.append(f"{path}: unreadable tar {where} ({type(e).__name__}: {e})")
    if found != expected:  # garbage inside a tar ends Python's reader silently: the count shows it
        problems.append(f"{path}: {found} samples, the manifest says {expected}")
    if len(problems) > MAX_PROBLEMS_PER_SHARD:
        extra = len(problems) - MAX_PROBLEMS_PER_SHARD
        problems = problems[:MAX_PROBLEMS_PER_SHARD] + [f"{path}: ... and {extra} more problems"]
    return problems


def check_first_sample(root: str, manifest: Manifest) -> None:
    """Decode the first sample of the split (DataError naming shard and key otherwise): a split written in a form
    the loaders refuse (16-bit, alpha, another size) fails here, before any worker starts. Training skips and
    counts a bad sample met later; `tarflow-data verify --deep` checks every one. Remote roots are left to the
    loaders."""
    if is_url(root):
        return
    path = join(root, manifest.shards[0])
    decoder = SampleDecoder(manifest.channels, manifest.image_size, manifest.num_classes)
    try:
        with open(path, "rb") as stream:
            sample = next(_samples(stream, path), None)
    except Exception as e:
        raise DataError(f"{path}: unreadable shard ({type(e).__name__}: {e})") from None
    if sample is None:
        raise DataError(f"{path}: holds no samples, the manifest says {manifest.samples_per_shard[0]}")
    decoder(sample)
