"""Seeded sampling (the same image for the same index whatever the batch or worker count) and sample grids."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .models.decoding import Decoding
from .models.tarflow import TarFlow

# Large odd multiplier so (seed, index) pairs map to well-separated generator seeds.
_SEED_STRIDE = 1_000_003


def per_sample_noise(indices: list[int] | Tensor, shape: tuple[int, ...], seed: int, device=None, dtype=None) -> Tensor:
    """Standard-normal noise (N, *shape): row k depends only on (seed, indices[k])."""
    rows = []
    for index in torch.as_tensor(indices).tolist():
        generator = torch.Generator().manual_seed(seed * _SEED_STRIDE + int(index))
        rows.append(torch.randn(shape, generator=generator))
    return torch.stack(rows).to(device=device, dtype=dtype)


def sample_indices(
    model: TarFlow,
    indices: list[int] | Tensor,
    seed: int,
    labels: Tensor | None = None,
    guidance: float = 0.0,
    guidance_annealed: bool = False,
    attn_temp: float = 1.0,
    decoding: str | Decoding | None = None,
    precision: str = "fp32",
) -> Tensor:
    """Images in [-1, 1]-ish model space for the given sample indices (B, C, H, W); see TarFlow.inverse for
    `decoding` and `precision`."""
    c = model.config
    param = next(model.parameters())
    eps = per_sample_noise(indices, (c.in_channels, c.image_size, c.image_size), seed, param.device, param.dtype)
    return model.sample(
        eps,
        y=labels,
        guidance=guidance,
        guidance_annealed=guidance_annealed,
        attn_temp=attn_temp,
        decoding=decoding,
        precision=precision,
    )


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] floats -> uint8 pixels (values outside are clipped)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_grid(images: Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Write a PNG grid of images in [-1, 1] (B, C, H, W)."""
    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nrow = nrow or max(1, int(len(images) ** 0.5))
    save_image(images.float().clamp(-1, 1), path, nrow=nrow, normalize=True, value_range=(-1, 1))
    return path
