"""Evaluation samples by index: class-balanced labels, guided and decoded as configured, counted redraws of
non-finite samples."""

from __future__ import annotations

import hashlib
from typing import Literal

import torch
from torch import Tensor

from ..config import Decoding, Guidance
from ..models.decoding import DecodingStats
from ..models.tarflow import TarFlow
from ..sampling import sample_indices


class NonFiniteSamplesError(RuntimeError):
    """Samples stayed non-finite after every allowed redraw: the model (or the guidance setting) is broken."""


def balanced_labels(indices: list[int], num_classes: int) -> Tensor | None:
    """Class of sample k is k mod num_classes: any index range of length n*num_classes is exactly balanced.
    None for an unconditional model."""
    if not num_classes:
        return None
    return torch.as_tensor(indices, dtype=torch.int64) % num_classes


def redraw_seed(seed: int, attempt: int) -> int:
    """Seed of the attempt-th redraw (attempt >= 1) of a non-finite sample; attempt 0 is `seed` itself.

    Derived by hashing into [2^31, 2^32), so a redraw never reuses the noise of an ordinary small seed, and
    small enough that `per_sample_noise`'s seed * stride + index stays far below 2^63.
    """
    if attempt == 0:
        return seed
    digest = hashlib.sha256(f"redraw\0{seed}\0{attempt}".encode()).digest()
    return (1 << 31) + (int.from_bytes(digest[:4], "little") >> 1)


def _finite_rows(images: Tensor) -> Tensor:
    return torch.isfinite(images).flatten(1).all(1)


@torch.no_grad()
def generate(
    model: TarFlow,
    indices: list[int],
    guidance: Guidance | None = None,
    decoding: Decoding | None = None,
    *,
    seed: int = 0,
    max_redraws: int = 10,
    stats: DecodingStats | None = None,
    labels: Tensor | Literal["balanced"] | None = "balanced",
) -> tuple[Tensor, Tensor | None, int]:
    """Samples (B, C, H, W) in model space (~[-1, 1]), their labels (B,) or None, and the number of redraws.
    `stats` receives the model passes of every sampling call, redraws included.

    Sample k depends only on (seed, k, guidance, decoding): its noise comes from `per_sample_noise(seed, k)` and
    its label is k mod num_classes, so the images do not depend on the batch size or the number of workers. A
    sample with a NaN/inf value is redrawn from `redraw_seed(seed, attempt)` (again a function of k alone) and
    counted; after `max_redraws` attempts NonFiniteSamplesError names the indices. `labels`: "balanced" (the
    evaluation's k mod num_classes), the labels (B,) of these indices, or None (no class: the null label).
    """
    guidance = guidance or Guidance()
    indices = [int(i) for i in indices]
    if isinstance(labels, str):
        labels = balanced_labels(indices, model.config.num_classes)
    device = next(model.parameters()).device
    labels = None if labels is None else labels.to(device)
    images = sample_indices(model, indices, seed, labels, guidance, decoding, stats)
    bad = (~_finite_rows(images)).nonzero().flatten().tolist()
    redrawn, attempt = 0, 0
    while bad:
        attempt += 1
        if attempt > max_redraws:
            shown = [indices[i] for i in bad[:10]]
            raise NonFiniteSamplesError(
                f"{len(bad)} sample(s) (indices {shown}{'...' if len(bad) > 10 else ''}) are still non-finite after "
                f"{max_redraws} redraws (eval.max_redraws); check the checkpoint and the guidance settings "
                f"(guidance={guidance.weight}, attn_temp={guidance.attn_temp})"
            )
        redrawn += len(bad)
        rows = torch.as_tensor(bad, device=device)
        new = sample_indices(
            model,
            [indices[i] for i in bad],
            redraw_seed(seed, attempt),
            None if labels is None else labels[rows],
            guidance,
            decoding,
            stats,
        )
        images[rows] = new
        bad = [i for i, ok in zip(bad, _finite_rows(new).tolist()) if not ok]
    return images, labels, redrawn
