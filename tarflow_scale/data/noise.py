"""Training-time noise augmentation: uint8 pixels -> float32 in [-1, 1] plus Gaussian or dequantization noise."""

from __future__ import annotations

import torch
from torch import Tensor

NUM_LEVELS = 256  # 8-bit pixels
BIN_WIDTH = 2 / NUM_LEVELS  # one 8-bit level in the [-1, 1] scale; uniform dequantization spans one bin
NOISE_KINDS = ("none", "gaussian", "uniform")


def augment(
    images_uint8: Tensor,
    noise: str,
    noise_std: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """(B, C, H, W) uint8 -> float32 on the same device, in the [-1, 1] pixel scale.

    "none":     x = u / 127.5 - 1
    "gaussian": x = u / 127.5 - 1 + noise_std * N(0, 1)   (TarFlow, arXiv 2412.06329: the model learns the
                density of slightly noisy images; score-based denoising removes the noise after sampling)
    "uniform":  x = (u + U[0, 1)) / 256 * 2 - 1           (dequantization: x covers u's bin of width 2/256,
                so a continuous density on x bounds the discrete likelihood of u)
    The noise is drawn on `generator`'s device (default: the images'), so a CPU generator gives the same
    numbers whatever device the images are on.
    """
    if images_uint8.dtype != torch.uint8:
        raise TypeError(f"augment expects uint8 images, got {images_uint8.dtype}")
    if noise not in NOISE_KINDS:
        raise ValueError(f"unknown noise {noise!r}; expected one of {NOISE_KINDS}")
    u = images_uint8.float()
    if noise == "uniform":
        return (u + _draw(torch.rand, u, generator)) * BIN_WIDTH - 1
    x = u / 127.5 - 1
    if noise == "gaussian":
        if noise_std <= 0:
            raise ValueError(f"gaussian noise needs noise_std > 0, got {noise_std}")
        x = x + noise_std * _draw(torch.randn, u, generator)
    return x


def _draw(sampler, like: Tensor, generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else like.device
    return sampler(like.shape, generator=generator, device=device, dtype=torch.float32).to(like.device)
