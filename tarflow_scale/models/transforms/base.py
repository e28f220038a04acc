"""The per-token transform interface every TarFlow block plugs in (affine, spline, mixture, ...)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def at_least_fp32(t: Tensor) -> Tensor:
    """Promote bf16/fp16 to fp32 for exp/log maths; keep fp32 and fp64 as they are."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


class TokenTransform:
    """An elementwise monotonic bijection z = f(x; params), one per dimension of a token.

    Contract (checked for every transform by tests/test_transforms.py):
      * `params` has shape (..., D, num_params) for `x` of shape (..., D);
      * all-zero params give the identity, so a zero-initialised head starts as the identity flow and the
        first token of each block (whose params are zero by the shift, TarFlow Sec. 3) is left unchanged;
      * `forward` returns z and the elementwise log|dz/dx| (same shape as x, in nats);
      * `inverse(forward(x)) == x` for any finite params.
    Maths runs in at least fp32 whatever the input dtype (bf16 training).
    """

    num_params: int
    # The inverse is a fixed sequence of tensor ops (no host-side convergence test), so a CUDA graph can capture it.
    closed_form_inverse: bool = True

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def inverse(self, z: Tensor, params: Tensor) -> Tensor:
        raise NotImplementedError

    def init_head(self, head: nn.Linear) -> None:
        """Initialise the linear layer that outputs the parameters: zero, so every block starts as the identity."""
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)

    def guide(self, params_cond: Tensor, params_uncond: Tensor, weight: float | Tensor) -> Tensor:
        """Classifier-free guidance on the raw head outputs: p_c + w (p_c - p_u); w = 0 gives p_c."""
        return params_cond + weight * (params_cond - params_uncond)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_params={self.num_params})"
