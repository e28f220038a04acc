"""Readers of raw inputs (ImageNet64 .npz batches, image-folder trees, in-memory arrays) into shard samples."""

from __future__ import annotations

import hashlib
import io
import os
import re
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .manifest import DataError

IMAGENET_NUM_CLASSES = 1000
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def safe_key(text: str) -> str:
    """A webdataset key from arbitrary text: a dot would split the key from its field names, so only
    [A-Za-z0-9_-] survive."""
    return _KEY_UNSAFE.sub("_", text).strip("_") or "_"


def encode_png(image: np.ndarray) -> bytes:
    """(H, W, 3) or (H, W, 1) uint8 -> PNG bytes, RGB or grayscale (lossless: decoding returns the array exactly)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image[:, :, 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue()


def shard_sample(key: str, image: np.ndarray, label: int) -> dict[str, Any]:
    """The on-disk sample: `<key>.png` (RGB) and `<key>.cls` (the 0-based class index as ASCII digits)."""
    return {"__key__": key, "png": encode_png(image), "cls": str(int(label)).encode("ascii")}


class Chunk(Protocol):
    """The samples of one shard, picklable so a worker process can encode them."""

    def samples(self) -> Iterator[dict[str, Any]]: ...


class Source(Protocol):
    """An input to convert: a fixed, ordered sequence of labelled images."""

    num_samples: int
    image_size: int
    channels: int
    num_classes: int
    class_names: list[str]

    def describe(self) -> dict[str, Any]:
        """JSON-able identity of the input; a resumed or re-run conversion must describe the same input."""
        ...

    def read(self, start: int, stop: int) -> Chunk:
        """Samples [start, stop) of the sequence."""
        ...


# ----------------------------------------------------------------------------------------------------------
# In-memory arrays (ImageNet64 batches once loaded, the bundled crops)


@dataclass
class ArrayChunk:
    keys: list[str]
    labels: np.ndarray  # (n,) int, 0-based
    images: np.ndarray  # (n, H, W, C) uint8

    def samples(self) -> Iterator[dict[str, Any]]:
        for key, label, image in zip(self.keys, self.labels, self.images):
            yield shard_sample(key, image, int(label))


@dataclass
class ArraySource:
    """Images already decoded in memory, e.g. the bundled crops."""

    images: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray  # (N,) 0-based
    keys: list[str]
    num_classes: int
    class_names: list[str]
    description: dict[str, Any]

    def __post_init__(self) -> None:
        n, h, w, c = self.images.shape
        if h != w or self.images.dtype != np.uint8 or len(self.labels) != n or len(self.keys) != n:
            raise ValueError("ArraySource needs (N, S, S, C) uint8 images with N labels and N keys")
        _check_unique(self.keys, "ArraySource")
        self.num_samples, self.image_size, self.channels = n, h, c

    def describe(self) -> dict[str, Any]:
        return self.description

    def read(self, start: int, stop: int) -> ArrayChunk:
        return ArrayChunk(self.keys[start:stop], self.labels[start:stop], self.images[start:stop])


def _check_unique(keys: Sequence[str], where: str) -> None:
    seen: dict[str, int] = {}
    for i, key in enumerate(keys):
        if key in seen:
            raise DataError(f"{where}: samples {seen[key]} and {i} get the same key {key!r}")
        seen[key] = i


# ----------------------------------------------------------------------------------------------------------
# Official downsampled-ImageNet .npz batches (train_data_batch_1..10, val_data)


def _npy_header(zf: zipfile.ZipFile, member: str) -> tuple[tuple[int, ...], np.dtype]:
    with zf.open(member) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    return shape, dtype


class NpzSource:
    """Batches in the official layout: `data` (N, C*S*S) uint8 in planar order (all R, then G, then B, each
    row-major) and `labels` numbered 1..num_classes. Headers and labels are checked up front, so a bad file
    fails before anything is written; the image arrays are loaded one file at a time."""

    def __init__(
        self,
        paths: Sequence[str],
        image_size: int = 64,
        channels: int = 3,
        num_classes: int = IMAGENET_NUM_CLASSES,
    ):
        if not paths:
            raise DataError("no .npz files given")
        self.paths = [os.path.abspath(p) for p in paths]
        self.image_size, self.channels, self.num_classes = image_size, channels, num_classes
        self.class_names: list[str] = []
        stems = [safe_key(os.path.basename(p).removesuffix(".npz")) for p in self.paths]
        if len(set(stems)) != len(stems):
            raise DataError(f"two .npz files have the same name, so their sample keys would clash: {paths}")
        self._stems = stems
        self._labels: list[np.ndarray] = []  # per file, 0-based
        self._sizes: list[int] = []
        self._counts: list[int] = []
        for path in self.paths:
            labels = self._check_file(path)
            self._labels.append(labels)
            self._counts.append(len(labels))
            self._sizes.append(os.path.getsize(path))
        self._offsets = np.cumsum([0] + self._counts)
        self.num_samples = int(self._offsets[-1])
        self._loaded: tuple[int, np.ndarray] | None = None  # (file index, data) of the file last read

    def _check_file(self, path: str) -> np.ndarray:
        if not os.path.isfile(path):
            raise DataError(f"{path}: no such file")
        dims = self.channels * self.image_size**2
        try:
            with zipfile.ZipFile(path) as zf:
                members = set(zf.namelist())
                for name in ("data.npy", "labels.npy"):
                    if name not in members:
                        raise DataError(f"{path}: no {name[:-4]!r} array (found {sorted(members)})")
                shape, dtype = _npy_header(zf, "data.npy")
            labels = np.load(path)["labels"]
        except DataError:
            raise
        except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
            raise DataError(f"{path}: not a readable .npz (truncated or corrupt?): {e}") from None
        if len(shape) != 2 or shape[1] != dims or dtype != np.uint8:
            hint = ""
            if len(shape) == 2 and shape[1] % self.channels == 0:
                side = round((shape[1] // self.channels) ** 0.5)
                if self.channels * side * side == shape[1]:
                    hint = f" (this looks like {side}x{side} images: pass --size {side})"
            raise DataError(
                f"{path}: 'data' is {dtype} with shape {shape}, expected uint8 (N, {dims}) = "
                f"{self.channels} planar channels of {self.image_size}x{self.image_size}{hint}"
            )
        labels = np.asarray(labels)
        if labels.shape != (shape[0],) or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(
                f"{path}: 'labels' is {labels.dtype} with shape {labels.shape}, expected {shape[0]} integers"
            )
        bad = np.flatnonzero((labels < 1) | (labels > self.num_classes))
        if bad.size:
            i = int(bad[0])
            raise DataError(
                f"{path}: labels[{i}] = {int(labels[i])} is outside 1..{self.num_classes} "
                f"({bad.size} bad label(s) in all)"
            )
        return (labels - 1).astype(np.int64)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "npz",
            "files": [os.path.basename(p) for p in self.paths],
            "bytes": self._sizes,
            "image_size": self.image_size,
            "num_classes": self.num_classes,
        }

    def _data(self, index: int) -> np.ndarray:
        # One file's images stay loaded: shards are read in order, so each file is loaded once.
        if self._loaded is None or self._loaded[0] != index:
            self._loaded = None
            path = self.paths[index]
            try:
                data = np.load(path)["data"]
            except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
                raise DataError(f"{path}: cannot read 'data' (truncated or corrupt?): {e}") from None
            self._loaded = (index, data)
        return self._loaded[1]

    def read(self, start: int, stop: int) -> ArrayChunk:
        s, c = self.image_size, self.channels
        keys, labels, images = [], [], []
        first = int(np.searchsorted(self._offsets, start, side="right")) - 1
        for index in range(first, len(self.paths)):
            if self._offsets[index] >= stop:
                break
            lo, hi = max(start, self._offsets[index]), min(stop, self._offsets[index + 1])
            if lo >= hi:  # a file holding no images
                continue
            a, b = int(lo - self._offsets[index]), int(hi - self._offsets[index])
            planar = self._data(index)[a:b].reshape(b - a, c, s, s)  # (n, C, H, W): planar, row-major
            images.append(np.ascontiguousarray(planar.transpose(0, 2, 3, 1)))  # (n, H, W, C)
            labels.append(self._labels[index][a:b])
            keys.extend(f"{self._stems[index]}-{i:07d}" for i in range(a, b))
        return ArrayChunk(keys, np.concatenate(labels), np.concatenate(images))


# ----------------------------------------------------------------------------------------------------------
# Image-folder trees: one subfolder per class, any size or format PIL reads


def _image_extensions() -> set[str]:
    from PIL import Image

    return {ext.lower() for ext in Image.registered_extensions()}


def _to_rgb8(im) -> np.ndarray:
    """A PIL image of any mode -> (H, W, 3) uint8, a writable copy (as torch.from_numpy wants).

    16-bit grayscale PNGs open as mode I;16 (or I): PIL's convert("RGB") clips them at 255 (all white), so they
    are rescaled here, 65535 -> 255 (divide by 257, rounded). Float images have no agreed range: refused.
    """
    if im.mode.startswith("I;16") or im.mode == "I":
        values = np.asarray(im, dtype=np.float64)
        if values.min() < 0 or values.max() > 65535:
            raise DataError(f"{getattr(im, 'filename', '?')}: integer pixels outside the 16-bit range")
        gray = np.round(values / 257.0).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if im.mode == "F":
        raise DataError(f"{getattr(im, 'filename', '?')}: floating-point image (mode F) has no pixel range to map")
    return np.array(im.convert("RGB"))


def load_resized(path: str, size: int) -> np.ndarray:
    """Any image PIL reads -> (size, size, 3) uint8: shorter side resized to `size` (antialiased), then
    centre-cropped, with torchvision."""
    import torch
    import torchvision.transforms.v2.functional as TF
    from PIL import Image

    try:
        with Image.open(path) as im:
            rgb = _to_rgb8(im)
    except DataError:
        raise
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise DataError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None
    x = torch.from_numpy(rgb).permute(2, 0, 1)  # (3, H, W)
    x = TF.center_crop(TF.resize(x, [size], antialias=True), [size, size])
    return np.ascontiguousarray(x.permute(1, 2, 0).numpy())


@dataclass
class FileChunk:
    keys: list[str]
    labels: list[int]
    paths: list[str]
    size: int
    skip_bad: bool = False  # leave unreadable images out (the converter records them) instead of failing

    def samples(self) -> Iterator[dict[str, Any]]:
        for key, label, path in zip(self.keys, self.labels, self.paths):
            try:
                image = load_resized(path, self.size)
            except DataError:
                if self.skip_bad:
                    continue
                raise
            yield shard_sample(key, image, label)


class FolderSource:
    """`root/<class>/**/<image>`: classes are the sorted subfolder names, images sorted by relative path;
    files whose extension PIL does not know are ignored. Keys derive from the relative path, so they stay
    stable when other files are added."""

    def __init__(self, root: str, image_size: int = 64, skip_bad: bool = False):
        self.root = os.path.abspath(root)
        self.skip_bad = skip_bad  # not part of describe(): it changes no image that is converted
        if not os.path.isdir(self.root):
            raise DataError(f"{self.root}: no such folder")
        self.image_size, self.channels = image_size, 3
        self.class_names = sorted(
            d for d in os.listdir(self.root) if not d.startswith(".") and os.path.isdir(os.path.join(self.root, d))
        )
        if not self.class_names:
            raise DataError(f"{self.root}: no class subfolders")
        self.num_classes = len(self.class_names)
        extensions = _image_extensions()
        self.files: list[str] = []  # relative paths
        self.labels: list[int] = []
        for label, name in enumerate(self.class_names):
            found = []
            for dirpath, dirnames, filenames in os.walk(os.path.join(self.root, name)):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                for f in filenames:
                    if not f.startswith(".") and os.path.splitext(f)[1].lower() in extensions:
                        found.append(os.path.relpath(os.path.join(dirpath, f), self.root))
            if not found:
                raise DataError(f"{os.path.join(self.root, name)}: class folder holds no images")
            self.files.extend(sorted(found))
            self.labels.extend([label] * len(found))
        self.keys = [safe_key(f.replace(os.sep, "-")) for f in self.files]
        _check_unique(self.keys, self.root)
        self.num_samples = len(self.files)

    def describe(self) -> dict[str, Any]:
        # A digest of the listing rather than the listing itself: ImageNet has 1.28M files.
        listing = hashlib.sha256("\n".join(self.files).encode()).hexdigest()
        return {
            "kind": "folder",
            "root": self.root,
            "num_files": self.num_samples,
            "listing_sha256": listing,
            "image_size": self.image_size,
        }

    def read(self, start: int, stop: int) -> FileChunk:
        paths = [os.path.join(self.root, f) for f in self.files[start:stop]]
        return FileChunk(self.keys[start:stop], self.labels[start:stop], paths, self.image_size, self.skip_bad)

    def skipped_reason(self, key: str) -> str:
        """`path: why` for a key the converter left out (the image is read again to say why)."""
        path = os.path.join(self.root, self.files[self.keys.index(key)])
        try:
            load_resized(path, self.image_size)
        except DataError as e:
            return str(e)
        return f"{path}: unreadable at conversion time"
