"""What the vector flows (T-NAF and the MAF baseline) share: a stack of invertible layers over (B, D) vectors with a
standard-normal prior, its exact log-likelihood and its sampler."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class VectorFlowStack(nn.Module):
    """Subclasses set `config` (with `num_dims`), `flows` (layers with forward(x) -> (z, log_det) and inverse(z)) and
    `prior` (a standard-normal GaussianPrior over num_dims)."""

    config: object
    flows: nn.ModuleList
    prior: nn.Module

    @property
    def num_dims(self) -> int:
        return self.config.num_dims

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.num_dims:
            raise ValueError(f"expected vectors of shape (B, {self.num_dims}), got {tuple(x.shape)}")

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B, D) -> z (B, D), log|det dz/dx| (B,) in nats (at least fp32), summed over the flow layers."""
        self._check_input(x)
        log_det = torch.zeros(x.shape[0], device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
        for flow in self.flows:
            x, flow_log_det = flow(x)
            log_det = log_det + flow_log_det
        return x, log_det

    def log_prob(self, x: Tensor) -> Tensor:
        """log p(x) in nats per sample (B,): log N(z; 0, I) + log|det dz/dx| (change of variables)."""
        z, log_det = self(x)
        return self.prior(z) + log_det

    @torch.no_grad()
    def inverse(self, z: Tensor) -> Tensor:
        """Exact inverse of `forward` (to the bisection tolerance of an iterative transform): z (B, D) -> x (B, D)."""
        self._check_input(z)
        for flow in reversed(self.flows):
            z = flow.inverse(z)
        return z

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n draws x ~ p: z ~ N(0, I) (from `generator` if given), then the inverse. (n, D)."""
        param = next(self.parameters())
        eps = torch.randn(n, self.num_dims, generator=generator, device=param.device, dtype=param.dtype)
        return self.inverse(eps)
