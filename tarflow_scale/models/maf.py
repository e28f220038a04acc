"""Masked autoregressive flow (MAF, Papamakarios et al. 2017): stacked MADE-affine layers, the MLP baseline."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import MAFConfig
from .priors import GaussianPrior
from .vector_flow import VectorFlowStack


class MaskedLinear(nn.Linear):
    """nn.Linear whose weight is multiplied by a fixed 0/1 mask (out_features, in_features)."""

    def __init__(self, in_features: int, out_features: int, mask: Tensor):
        super().__init__(in_features, out_features)
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    """MADE (Germain et al. 2015): an MLP whose output i depends on inputs < i only, via masks on degrees.

    Inputs and outputs carry degrees 1..D; hidden unit k carries m_k = 1 + (k mod (D - 1)) in 1..D-1. A weight
    into a hidden unit is kept where m_k >= d_in, a weight into an output of degree d where d > m_k. Returns
    (B, D, 2): per dimension the log-scale alpha and shift mu of the affine; output 0 depends on biases only.
    """

    def __init__(self, num_dims: int, hidden_width: int, num_hidden_layers: int):
        super().__init__()
        D = num_dims
        degrees_in = torch.arange(1, D + 1)
        degrees_hidden = 1 + torch.arange(hidden_width) % (D - 1)
        layers = []
        previous = degrees_in
        for _ in range(num_hidden_layers):
            mask = degrees_hidden[:, None] >= previous[None, :]
            layers.append(MaskedLinear(len(previous), hidden_width, mask))
            previous = degrees_hidden
        self.hidden = nn.ModuleList(layers)
        out_mask = (degrees_in[:, None] > previous[None, :]).repeat(2, 1)  # rows: alpha_0..D-1, mu_0..D-1
        self.out = MaskedLinear(len(previous), 2 * D, out_mask)
        # Zero output layer: every MAF layer starts as the identity.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for layer in self.hidden:
            h = F.relu(layer(h))
        return self.out(h).unflatten(-1, (2, -1)).transpose(1, 2)  # (B, D, 2)


class MAFLayer(nn.Module):
    """z_i = (x_i - mu_i(x_<i)) exp(-alpha_i(x_<i)) in this layer's order; log|det| = -sum_i alpha_i."""

    def __init__(self, config: MAFConfig, reverse_order: bool):
        super().__init__()
        self.reverse_order = reverse_order
        self.made = MADE(config.num_dims, config.hidden_width, config.num_hidden_layers)

    def permute(self, x: Tensor) -> Tensor:
        return x.flip(1) if self.reverse_order else x

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B, D) -> z (B, D), log|det dz/dx| (B,) in nats."""
        x = self.permute(x)
        alpha, mu = self.made(x).unbind(-1)
        return self.permute((x - mu) * torch.exp(-alpha)), -alpha.sum(1)

    def inverse(self, z: Tensor) -> Tensor:
        """D MADE passes: pass i reads the already-recovered x_<i and fixes x_i."""
        z = self.permute(z)
        x = torch.zeros_like(z)
        for i in range(z.shape[1]):
            alpha, mu = self.made(x)[:, i].unbind(-1)
            x[:, i] = z[:, i] * torch.exp(alpha) + mu
        return self.permute(x)


class MAF(VectorFlowStack):
    """A stack of MADE-affine layers with order reversal and a standard-normal prior.

    >>> model = MAF(MAFConfig(num_dims=5, hidden_width=8, num_flow_layers=2))
    >>> z, log_det = model(torch.randn(3, 5))  # z (3, 5), log_det (3,) in nats
    """

    def __init__(self, config: MAFConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.flows = nn.ModuleList(MAFLayer(config, reverse_order=bool(k % 2)) for k in range(config.num_flow_layers))
        self.prior = GaussianPrior((config.num_dims,), learned=False)
