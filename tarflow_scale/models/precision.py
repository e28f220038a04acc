"""The precision policy (docs/gpu.md) in one place: a precision name -> the Transformer trunk's autocast dtype
(TarFlow.set_trunk_dtype) and the process's TF32 matmul flags. Training applies it for a whole run
(training/trainer.py); evaluation jobs and the Tweedie step apply it for one call and restore what was there
(`precision_scope`). Sampling's own precision is models/decoding/precision.py (Decoding.precision)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from ..config.sampling import PRECISIONS

if TYPE_CHECKING:
    from .tarflow import TarFlow


def _set_tf32(matmul: bool, cudnn: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = matmul
    torch.backends.cudnn.allow_tf32 = cudnn


@contextlib.contextmanager
def tf32_matmuls(allow: bool) -> Iterator[None]:
    """CUDA matmuls and convolutions in TF32 (`allow`) or strict fp32 for the duration; the flags are restored
    after. Process-wide; no effect on CPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    _set_tf32(allow, allow)
    try:
        yield
    finally:
        _set_tf32(*saved)


def apply_precision(model: TarFlow, precision: str, device: torch.device, tf32: bool = True) -> None:
    """bf16: the Transformer trunks autocast to bf16 (TF32 off); fp32: fp32 trunks, TF32 matmuls on a GPU when
    `tf32`; tf32: fp32 trunks with TF32 matmuls on a GPU. The flags are process-wide; the flow state, transforms,
    log-determinants and prior keep the input's dtype under every policy."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    model.set_trunk_dtype(torch.bfloat16 if precision == "bf16" else None)
    if device.type == "cuda":
        allow = precision == "tf32" or (precision == "fp32" and tf32)
        _set_tf32(allow, allow)


@contextlib.contextmanager
def precision_scope(model: TarFlow, precision: str | None, device: torch.device) -> Iterator[None]:
    """`model` runs at `precision` for the duration (fp32: strict fp32; tf32; bf16: apply_precision); the model's
    trunk dtype and the process's TF32 flags are restored after. None changes nothing (the caller's setting)."""
    if precision is None:
        yield
        return
    trunks = [block.trunk_dtype for block in model.blocks]
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        apply_precision(model, precision, device, tf32=False)
        yield
    finally:
        for block, dtype in zip(model.blocks, trunks):
            block.trunk_dtype = dtype
        _set_tf32(*saved)
