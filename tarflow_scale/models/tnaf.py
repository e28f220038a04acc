"""T-NAF: a Transformer neural autoregressive flow with one token per dimension (arXiv 2401.01855)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import TNAFConfig
from .priors import GaussianPrior
from .transformer import KVCache, LayerNorm32, TransformerLayer
from .transforms import TokenTransform, build_transform
from .vector_flow import VectorFlowStack


class TNAFLayer(nn.Module):
    """One T-NAF layer: z_i = f(x_i; theta_i(x_<i)) for the D dimensions, in this layer's order.

    Token i of the causal Transformer reads the value of dimension i - 1 (a linear embedding of the scalar)
    plus a learned embedding of position i; token 0 reads a learned start vector instead. Its output is the
    parameters of dimension i's monotonic transform, so theta_i depends on x_<i only (the shift by one keeps
    the Jacobian lower triangular) and dimension 0 gets a learned, unconditional transform: one
    layer models the full joint. log|det| is the plain sum of the elementwise log-derivatives.
    """

    def __init__(self, config: TNAFConfig, transform: TokenTransform, reverse_order: bool):
        super().__init__()
        C, D = config.channels, config.num_dims
        self.config = config
        self.transform = transform
        self.reverse_order = reverse_order
        self.value_embed = nn.Linear(1, C)
        self.start = nn.Parameter(torch.randn(C) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(D, C) * 0.02)
        self.layers = nn.ModuleList(
            TransformerLayer(C, config.head_dim, config.mlp_ratio) for _ in range(config.layers_per_flow)
        )
        self.norm_out = LayerNorm32(C)
        self.proj_out = nn.Linear(C, transform.num_params)
        # Zero weight (the transform's own init): every dimension starts with the same x-independent map, the
        # identity, or near it where the transform must break a tie between its units (DSF, mixture).
        transform.init_head(self.proj_out)

    @property
    def num_heads(self) -> int:
        return self.config.channels // self.config.head_dim

    def permute(self, x: Tensor) -> Tensor:
        """Into (and, being an involution, back out of) this layer's dimension order. x: (B, D)."""
        return x.flip(1) if self.reverse_order else x

    def _head(self, h: Tensor) -> Tensor:
        """Transformer output (B, T', C) -> transform parameters (B, T', P)."""
        return self.proj_out(self.norm_out(h))

    def transform_params(self, x: Tensor) -> Tensor:
        """Parameters of every dimension from one full causal pass. x: (B, D) in layer order -> (B, D, P).

        Row i depends only on x[:, :i]; row 0 on nothing but the weights.
        """
        B = x.shape[0]
        start = self.start.to(x.dtype).expand(B, 1, -1)  # (B, 1, C)
        values = self.value_embed(x[:, :-1, None])  # (B, D - 1, C): dimension i - 1 feeds token i
        h = torch.cat([start, values], dim=1) + self.pos_embed.to(x.dtype)  # (B, D, C)
        for layer in self.layers:
            h = layer(h)
        return self._head(h)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B, D) -> z (B, D), log|det dz/dx| (B,) in nats."""
        x = self.permute(x)
        z, log_deriv = self.transform.forward(x, self.transform_params(x))
        return self.permute(z), log_deriv.sum(1)

    def inverse(self, z: Tensor) -> Tensor:
        """Exact inverse, dimension by dimension with a preallocated KV cache: z (B, D) -> x (B, D).

        Step i runs token i (start vector, or the just-recovered x_{i-1}) through the Transformer, attending to
        the cached tokens < i, and inverts dimension i's transform (bisection for DSF and mixture): D steps
        of one token each instead of D full passes.
        """
        z = self.permute(z)
        B, D = z.shape
        cache = KVCache.allocate(len(self.layers), B, self.num_heads, D, self.config.head_dim, z)
        x = torch.empty_like(z)
        start = self.start.to(z.dtype).expand(B, 1, -1)
        for i in range(D):
            token = start if i == 0 else self.value_embed(x[:, i - 1 : i, None])  # (B, 1, C)
            h = token + self.pos_embed[i].to(z.dtype)
            for index, layer in enumerate(self.layers):
                h = layer.cached(h, i, cache, index)  # one token: a pass of length 1
            params = self._head(h)[:, 0]  # (B, P): parameters of dimension i
            x[:, i] = self.transform.inverse(z[:, i], params)
        return self.permute(x)


class TNAF(VectorFlowStack):
    """Transformer neural autoregressive flow over vectors, exact log-likelihood and exact sampling.

    >>> model = TNAF(TNAFConfig(num_dims=6, channels=16, head_dim=8, dsf_hidden=4)).double()
    >>> x = torch.randn(3, 6, dtype=torch.float64)
    >>> z, log_det = model(x)            # z (3, 6); log_det (3,) in nats
    >>> bool(((model.inverse(z) - x).abs() < 1e-8).all())
    True
    """

    def __init__(self, config: TNAFConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.transform = build_transform(config)
        self.flows = nn.ModuleList(
            TNAFLayer(config, self.transform, reverse_order=bool(k % 2)) for k in range(config.num_flow_layers)
        )
        self.prior = GaussianPrior((config.num_dims,), learned=False)
