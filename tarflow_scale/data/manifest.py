"""The per-split JSON manifest of a sharded dataset: its fields, reading, atomic writing and verification."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import socket
import tarfile
from dataclasses import dataclass, field
from typing import Any

import webdataset as wds

MANIFEST_VERSION = 1
# A URL template names where each file lives through this placeholder, e.g.
# "pipe:aws s3 cp s3://bucket/imagenet64/{file} -"; a plain prefix ("https://host/dir") gets "/<file>" appended.
FILE_PLACEHOLDER = "{file}"


class DataError(RuntimeError):
    """Bad input or output data; the message names the file (and the sample key or index) at fault."""


@dataclass
class Manifest:
    """What `<root>/<split>.json` records about one converted split."""

    name: str  # dataset name, the prefix of every shard file name
    split: str
    shards: list[str]  # file names relative to the dataset root, in sample order
    samples_per_shard: list[int]  # one count per shard; only the last may be smaller (any, with --skip-bad)
    num_samples: int
    image_size: int  # H = W, pixels
    channels: int
    num_classes: int
    sha256: list[str]  # hex digest of each shard file
    class_names: list[str] = field(default_factory=list)  # index -> name, when known
    pattern: str = ""  # brace-expandable form of `shards`, e.g. "imagenet64-train-{000000..000127}.tar"
    source: dict[str, Any] = field(default_factory=dict)  # what was converted and how; compared on re-runs
    shard_bytes: list[int] = field(default_factory=list)  # file size of each shard: a cheap check at every start
    # Input files the converter skipped as unreadable (`--skip-bad`): "path: reason", one each.
    skipped_inputs: list[str] = field(default_factory=list)
    version: int = MANIFEST_VERSION

    @property
    def shard_offsets(self) -> list[int]:
        """Global index of the first sample of each shard (samples are numbered in shard order)."""
        offsets, total = [], 0
        for count in self.samples_per_shard:
            offsets.append(total)
            total += count
        return offsets

    def check(self, where: str) -> None:
        """Internal consistency; raises DataError naming `where` (the manifest's file or URL)."""
        n = len(self.shards)
        if not (len(self.samples_per_shard) == len(self.sha256) == n):
            raise DataError(
                f"{where}: shards ({n}), samples_per_shard ({len(self.samples_per_shard)}) and "
                f"sha256 ({len(self.sha256)}) must have the same length"
            )
        if sum(self.samples_per_shard) != self.num_samples:
            raise DataError(
                f"{where}: samples_per_shard sums to {sum(self.samples_per_shard)}, "
                f"but num_samples is {self.num_samples}"
            )
        if n == 0 or self.num_samples <= 0:
            raise DataError(f"{where}: the split holds no samples")
        if min(self.image_size, self.channels) < 1 or self.num_classes < 0:
            raise DataError(f"{where}: image_size, channels must be >= 1 and num_classes >= 0")
        if self.shard_bytes and len(self.shard_bytes) != n:
            raise DataError(f"{where}: shard_bytes ({len(self.shard_bytes)}) must have one size per shard ({n})")
        if len(set(self.shards)) != n:
            raise DataError(f"{where}: a shard is listed twice")


def manifest_name(split: str) -> str:
    return f"{split}.json"


def is_url(root: str) -> bool:
    """True for anything webdataset opens through a scheme (pipe:, http(s)://, gs://, ...), not a local path."""
    return root.startswith("pipe:") or "://" in root


def join(root: str, file: str) -> str:
    """Location of `file` (a shard or a manifest) inside the dataset at `root`: a local path or a URL."""
    if FILE_PLACEHOLDER in root:
        return root.replace(FILE_PLACEHOLDER, file)
    if root.startswith("pipe:"):
        raise DataError(f"a pipe: data path must contain {FILE_PLACEHOLDER} where the file name goes: {root!r}")
    if is_url(root):
        return root.rstrip("/") + "/" + file
    return os.path.join(root, file)


def _read_text(location: str) -> str:
    if is_url(location):
        # gopen runs the pipe/curl command; its close() raises when the command failed.
        with wds.gopen(location, "rb") as stream:
            return stream.read().decode("utf-8")
    with open(location, encoding="utf-8") as f:
        return f.read()


def read_manifest(root: str, split: str) -> Manifest:
    """Load and check `<root>/<split>.json`; every problem is a DataError naming the file."""
    location = join(root, manifest_name(split))
    try:
        text = _read_text(location)
    except FileNotFoundError:
        raise DataError(
            f"{location}: no manifest for split {split!r} (convert the data with `tarflow-data`, "
            "or check data.path / the split name)"
        ) from None
    except Exception as e:  # a failed pipe or HTTP fetch
        raise DataError(f"{location}: cannot read the manifest: {e}") from e
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{location}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{location}: the manifest must be a JSON object")
    names = {f.name for f in dataclasses.fields(Manifest)}
    required = {
        f.name
        for f in dataclasses.fields(Manifest)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    missing = sorted(required - set(raw))
    if missing:
        raise DataError(f"{location}: missing field(s) {', '.join(missing)}")
    unknown = sorted(set(raw) - names)
    if unknown:
        raise DataError(f"{location}: unknown field(s) {', '.join(unknown)}")
    if raw.get("version", MANIFEST_VERSION) != MANIFEST_VERSION:
        raise DataError(f"{location}: manifest version {raw['version']} is not {MANIFEST_VERSION}")
    try:
        manifest = Manifest(**raw)
        manifest.check(location)
    except (TypeError, ValueError) as e:
        raise DataError(f"{location}: malformed manifest ({e})") from None
    return manifest


def write_manifest(root: str, manifest: Manifest) -> str:
    """Write `<root>/<split>.json` atomically (a temp name, then rename), so it exists only when complete."""
    manifest.check(manifest_name(manifest.split))
    path = os.path.join(root, manifest_name(manifest.split))
    write_json_atomic(path, dataclasses.asdict(manifest))
    return path


def write_json_atomic(path: str, data: Any) -> None:
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{socket.gethostname()}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tar_keys(path: str, data: bytes | None = None) -> set[str]:
    """The distinct sample keys in a shard (members are `<key>.<field>`), read from `data` (its bytes) when given."""
    keys = set()
    with tarfile.open(fileobj=io.BytesIO(data)) if data is not None else tarfile.open(path, "r") as tar:
        for member in tar:
            if member.isreg():
                keys.add(member.name.split(".", 1)[0])
    return keys


def count_tar_samples(path: str) -> int:
    """Number of distinct sample keys in a shard."""
    return len(tar_keys(path))


def check_shard_sizes(root: str, manifest: Manifest) -> None:
    """The cheap start-of-run check (no reading): every local shard exists and has the size the manifest records.

    A truncated copy or a half-synced folder fails here, naming the shard; `tarflow-data verify` is the full check
    (checksums, and with --deep every sample decoded). Remote data roots are left to the loaders' own checks.
    """
    if is_url(root):
        return
    sizes = manifest.shard_bytes or [None] * len(manifest.shards)
    for name, size in zip(manifest.shards, sizes):
        path = os.path.join(root, name)
        if not os.path.isfile(path):
            raise DataError(f"{path}: shard listed in {manifest_name(manifest.split)} is missing")
        actual = os.path.getsize(path)
        if size is not None and actual != size:
            raise DataError(
                f"{path}: {actual} bytes, the manifest says {size} (truncated or replaced; run "
                f"`tarflow-data verify {root}` for the full check)"
            )
