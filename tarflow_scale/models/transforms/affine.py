"""Affine NVP token transform z = (x - b) exp(-a), its volume-preserving variant, and the shift-only step."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import TokenTransform, at_least_fp32


class AffineTransform(TokenTransform):
    """z_i = (x_i - b_i) * exp(-a_i) with params[..., 0] = a (log-scale), params[..., 1] = b (shift).

    log|dz/dx| = -a, elementwise. Guidance extrapolates both a and b (TarFlow Sec. 2.5).
    """

    num_params = 2

    def _scale_shift(self, params: Tensor) -> tuple[Tensor, Tensor]:
        params = at_least_fp32(params)
        return params[..., 0], params[..., 1]

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        a, b = self._scale_shift(params)
        z = (at_least_fp32(x) - b) * (-a).exp()
        return z.to(x.dtype), -a

    def inverse(self, z: Tensor, params: Tensor) -> Tensor:
        a, b = self._scale_shift(params)
        return (at_least_fp32(z) * a.exp() + b).to(z.dtype)


class VolumePreservingAffineTransform(AffineTransform):
    """Affine with the log-scales centred over each token's dimensions, so log|det| = 0 per token.

    The density then lives entirely in the prior, which must have a learned variance (model.prior=learned).
    """

    def _scale_shift(self, params: Tensor) -> tuple[Tensor, Tensor]:
        a, b = super()._scale_shift(params)
        return a - a.mean(dim=-1, keepdim=True), b


class ShiftTransform(TokenTransform):
    """z_i = x_i - b_i with params[..., 0] = b: the shift-only step of the reference's nvp=False models.

    log|dz/dx| = 0: a volume-preserving flow whose density lives in the prior (use model.prior=learned to train).
    """

    num_params = 1

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        b = at_least_fp32(params)[..., 0]
        return (at_least_fp32(x) - b).to(x.dtype), torch.zeros_like(b)

    def inverse(self, z: Tensor, params: Tensor) -> Tensor:
        return (at_least_fp32(z) + at_least_fp32(params)[..., 0]).to(z.dtype)
