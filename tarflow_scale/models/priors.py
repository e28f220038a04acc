"""Priors on the latent z: a diagonal Gaussian, fixed or learned."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

LOG_2PI = math.log(2.0 * math.pi)


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
