"""Decoding one shard sample exactly: which PNGs have an exact 8-bit form, the checks against the manifest, and the
DataError naming shard and key. Training, evaluation and `tarflow-data verify --deep` all decode through here."""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .manifest import DataError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
COLOR_TYPES = {0: "grayscale", 2: "RGB", 3: "palette", 4: "grayscale+alpha", 6: "RGBA"}
SUPPORTED_CHANNELS = (1, 3)


class NoExactForm(ValueError):
    """A readable PNG without an exact uint8 form in the manifest's number of channels."""


@dataclass(frozen=True)
class PngHeader:
    """The IHDR fields that decide how a PNG decodes (PNG spec §11.2.2)."""

    width: int
    height: int
    bit_depth: int  # bits per sample (per palette index for color type 3)
    color_type: int

    @property
    def kind(self) -> str:
        """`an 8-bit RGB`, `a 16-bit grayscale`: the PNG's kind with its article."""
        article = "an" if self.bit_depth == 8 else "a"
        return f"{article} {self.bit_depth}-bit {COLOR_TYPES.get(self.color_type, f'color type {self.color_type}')}"


def read_png_header(data: bytes) -> PngHeader:
    """The IHDR of PNG bytes; ValueError when they do not start like a PNG (damaged, or another format)."""
    if len(data) < 26 or data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
        raise ValueError("no PNG signature and header")
    width, height, bit_depth, color_type = struct.unpack(">IIBB", data[16:26])
    return PngHeader(width, height, bit_depth, color_type)


def inexact_reason(header: PngHeader, transparent: bool, channels: int) -> str | None:
    """Why the PNG has no exact (H, W, channels) uint8 form, or None when it has one.

    Exact: 8-bit RGB; grayscale of 1-8 bits (the PNG spec scales k-bit levels by 255 / (2^k - 1), an integer, so
    no value is rounded) replicated to RGB; palette images (8-bit RGB entries). PIL reads a 16-bit RGB PNG as
    "RGB" by dropping the low byte and clips 16-bit grayscale at 255: both change values silently, so 16 bits
    are refused, as is alpha (dropping it changes what the image shows).
    """
    if header.bit_depth > 8:
        return (
            f"is {header.kind} PNG: the model reads 8-bit pixels and a 16-bit value has no exact 8-bit form "
            "(convert the source images with `tarflow-data convert-folder`, which rounds them to 8 bits)"
        )
    if header.color_type in (4, 6) or transparent:
        return f"is {header.kind} PNG with transparency: dropping the alpha channel would change the image"
    if channels == 3 and header.color_type in (0, 2, 3):
        return None
    if channels == 1 and header.color_type == 0:
        return None
    return f"is {header.kind} PNG, which has no exact {channels}-channel form"


class SampleDecoder:
    """A shard sample -> ((C, H, W) uint8 tensor, int label, key), exactly as stored; any problem (missing field,
    damaged or inexact PNG, wrong size, label out of range) is a DataError naming the shard and the key."""

    def __init__(self, channels: int, image_size: int, num_classes: int = 0):
        if channels not in SUPPORTED_CHANNELS:
            raise DataError(f"the manifest says {channels} channels; the loaders read {SUPPORTED_CHANNELS} channels")
        self.channels = channels
        self.shape = (image_size, image_size, channels)
        self.num_classes = num_classes  # 0: unconditional data, labels unchecked

    def image(self, data: bytes, where: str, shape_source: str = "the manifest says") -> Tensor:
        """PNG bytes -> (C, H, W) uint8, exactly as stored; a DataError starting with `where` (shard and key, or a
        file) when they are damaged, have no exact form or another size than `shape_source` gives."""
        try:
            array = self.pixels(data)
        except NoExactForm as e:
            raise DataError(f"{where} {e}") from None
        except Exception as e:  # PIL raises many types for damaged data
            raise DataError(f"{where} is corrupt ({type(e).__name__}: {e})") from None
        if array.shape != self.shape:
            raise DataError(f"{where} is {array.shape} (H, W, C), {shape_source} {self.shape}")
        return torch.from_numpy(array.copy()).permute(2, 0, 1)

    def pixels(self, data: bytes) -> np.ndarray:
        """PNG bytes -> (H, W, C) uint8; NoExactForm saying why they have no exact form, PIL's own errors (or a
        ValueError) for damaged data."""
        from PIL import Image

        header = read_png_header(data)
        with Image.open(io.BytesIO(data)) as im:
            reason = inexact_reason(header, "transparency" in im.info, self.channels)
            if reason:
                raise NoExactForm(reason)
            mode = "RGB" if self.channels == 3 else "L"
            array = np.asarray(im if im.mode == mode else im.convert(mode))
        return array if array.ndim == 3 else array[:, :, None]

    def __call__(self, sample: dict[str, Any]) -> tuple[Tensor, int, str]:
        key, url = sample.get("__key__"), sample.get("__url__")
        try:
            data = sample["png"]
            # Unlabelled data (num_classes 0, e.g. an unconditional model's samples) may leave out `cls`.
            label = int(sample["cls"]) if self.num_classes or "cls" in sample else 0
        except KeyError as e:
            raise DataError(f"{url}: sample {key!r} has no {e.args[0]!r} field") from None
        except ValueError:
            raise DataError(f"{url}: sample {key!r} has a label that is not an integer: {sample['cls']!r}") from None
        image = self.image(data, f"{url}: sample {key!r}")
        # Out of range, a label would train as the null label (-1) or index past the class embedding.
        if self.num_classes and not 0 <= label < self.num_classes:
            raise DataError(f"{url}: sample {key!r} has label {label}, outside [0, {self.num_classes})")
        return image, label, key
