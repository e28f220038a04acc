"""Priors on the latent z and the conversion of log-likelihoods (nats) to bits per dimension."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

LOG_2 = math.log(2.0)
LOG_2PI = math.log(2.0 * math.pi)
# 8-bit pixels mapped to [-1, 1] fall in bins of width 2/256: P(bin) = p(x) * (2/256)^D for dequantized x.
LOG_BIN_WIDTH_8BIT = math.log(2.0 / 256.0)


def bits_per_dim(log_prob: Tensor, num_dims: int, log_bin_width: float | None = None) -> Tensor:
    """-log p / (D ln 2) per sample.

    log_prob: (B,) continuous log-density in nats. With `log_bin_width` (e.g. LOG_BIN_WIDTH_8BIT) the density
    of dequantized data becomes the discrete probability of its bin: -log P = -log p - D log(bin width).
    """
    nll = -log_prob
    if log_bin_width is not None:
        nll = nll - num_dims * log_bin_width
    return nll / (num_dims * LOG_2)


class GaussianPrior(nn.Module):
    """Diagonal Gaussian N(0, diag(sigma^2)) over z of shape `shape`; sigma fixed to 1 or learned."""

    def __init__(self, shape: tuple[int, ...], learned: bool):
        super().__init__()
        self.learned = learned
        if learned:
            self.log_std = nn.Parameter(torch.zeros(shape))
        else:
            self.register_buffer("log_std", torch.zeros(shape), persistent=False)

    def forward(self, z: Tensor) -> Tensor:
        """z: (B, *shape) -> (B,) log-density in nats, computed in at least fp32.

        A module call (not a plain method) so ZeRO-3 gathers a learned log_std before use.
        """
        z = z if z.dtype == torch.float64 else z.float()
        log_std = self.log_std.to(z.dtype)
        elementwise = -0.5 * (z * (-log_std).exp()) ** 2 - log_std - 0.5 * LOG_2PI
        return elementwise.flatten(1).sum(1)

    def scale(self, eps: Tensor) -> Tensor:
        """Map standard-normal noise to a prior draw."""
        return eps * self.log_std.to(eps.dtype).exp()
