"""Sampling precision (config.Decoding.precision): the Transformer's matmuls and the KV cache's dtype."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..precision import tf32_matmuls


def cache_dtype(precision: str, state_dtype: torch.dtype) -> torch.dtype:
    """The KV cache holds bf16 under bf16 sampling (half the memory of fp32), else the flow state's dtype."""
    return torch.bfloat16 if precision == "bf16" else state_dtype


@contextlib.contextmanager
def matmul_precision(precision: str, device_type: str) -> Iterator[None]:
    """The Transformer's matmuls at `precision`: bf16 autocast, TF32 matmuls (CUDA only), or plain fp32.

    Only the network runs inside: the flow state, the token transforms and their inverses stay fp32 (or fp64),
    and head outputs are cast back to the state's dtype before guidance combines them.
    """
    if precision == "bf16":
        with torch.autocast(device_type, dtype=torch.bfloat16):
            yield
    elif precision == "tf32":
        with tf32_matmuls(True):
            yield
    else:
        yield
