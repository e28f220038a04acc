"""Exact bits/dim of held-out 8-bit images: per-image dequantization noise, the discretisation term, mean and
standard error."""

from __future__ import annotations

import hashlib
import math
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ..data import augment
from ..models.likelihood import LOG_BIN_WIDTH_8BIT, bits_per_dim
from ..models.precision import precision_scope
from ..models.tarflow import TarFlow

NoiseKind = Literal["uniform", "gaussian"]


def sample_seed(seed: int, key: str, draw: int, stream: str) -> int:
    """A 63-bit generator seed that depends only on (seed, sample key, draw, stream name).

    Noise tied to the sample's key (not its batch position) makes the result independent of the worker count,
    the batch size and the order in which shards arrive.
    """
    digest = hashlib.sha256(f"{stream}\0{seed}\0{draw}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def perturb(images_uint8: Tensor, keys: list[str], kind: NoiseKind, noise_std: float, seed: int, draw: int) -> Tensor:
    """(B, C, H, W) uint8 -> float32 in the [-1, 1] scale, with per-image noise from `sample_seed`.

    kind="uniform":  x = (u + U[0, 1)) / 128 - 1, the dequantization of `tarflow_scale.data.augment`;
    kind="gaussian": x = u / 127.5 - 1 + noise_std * N(0, 1), the training augmentation of a Gaussian-noise run.
    """
    if len(keys) != len(images_uint8):
        raise ValueError(f"{len(keys)} keys for {len(images_uint8)} images")
    cpu = images_uint8.cpu()
    rows = [
        augment(cpu[i : i + 1], kind, noise_std, torch.Generator().manual_seed(sample_seed(seed, key, draw, kind)))
        for i, key in enumerate(keys)
    ]
    return torch.cat(rows).to(images_uint8.device)


@torch.no_grad()
def batch_bits_per_dim(
    model: TarFlow,
    images_uint8: Tensor,
    labels: Tensor | None,
    keys: list[str],
    *,
    kind: NoiseKind = "uniform",
    noise_std: float = 0.0,
    num_draws: int = 1,
    seed: int = 0,
    precision: str | None = None,
) -> Tensor:
    """Per-image bits/dim (B,) float64, averaged over `num_draws` noise draws.

    Both kinds add the 8-bit discretisation term: bpd = (-log p(x) - D log(2/256)) / (D ln 2), with
    D = C H W and log p in nats. For kind="uniform" this is the standard dequantization bound on the discrete
    NLL of the 8-bit image (Theis et al. 2016): E_v[-log p((u + v)/128 - 1)] - D log(2/256) >= -log P(u).
    For kind="gaussian" it is the NLL of the Gaussian-noised image, a continuous density measured in 8-bit
    pixel units: *not* a bound on the discrete NLL (see `tarflow_scale.evaluation.jobs` BPD_DESCRIPTIONS for its label).
    `labels` (B,) condition a class-conditional model; None for an unconditional one. `precision` (eval.bpd_precision:
    fp32, tf32, bf16; models/precision.py `precision_scope`) for the call; None: as set. Anything but fp32 gives
    an approximation of the fp32 likelihood (docs/gpu.md), not the bound described above.
    """
    device = next(model.parameters()).device
    total = torch.zeros(len(keys), dtype=torch.float64, device=device)
    y = None if labels is None else labels.to(device)
    with precision_scope(model, precision, device):
        for draw in range(num_draws):
            x = perturb(images_uint8, keys, kind, noise_std, seed, draw).to(device)
            log_prob = model.log_prob(x, y).double()  # (B,) nats
            total += bits_per_dim(log_prob, model.num_dims, LOG_BIN_WIDTH_8BIT)
    return total / num_draws


def summarize(values: np.ndarray) -> dict[str, float | int]:
    """Mean and standard error (std with ddof=1 over sqrt(n)) of per-image values."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n == 0:
        raise ValueError("no values to summarize")
    std = float(values.std(ddof=1)) if n > 1 else float("nan")
    return {"mean": float(values.mean()), "stderr": std / math.sqrt(n), "std": std, "num_images": n}
