"""The per-token transform interface every TarFlow block plugs in (affine, spline, mixture, ...), and the pieces
its implementations share: the compute dtype, a positive map exactly 1 at zero, the iterative inverse's bookkeeping."""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def at_least_fp32(t: Tensor) -> Tensor:
    """Promote bf16/fp16 to fp32 for exp/log maths; keep fp32 and fp64 as they are."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


class ShiftedSoftplus:
    """p -> m + softplus(p + c) with softplus(c) = 1 - m: a positive value above `minimum` (m) that is exactly 1 at
    p = 0, so a zero-initialised head gives the identity (a spline's knot derivatives, a sigmoidal unit's slope).

    Two forms of one function: for p <= 0, 1 + log1p(r expm1(p)) with r = sigmoid(c), exactly 1 at p = 0 whatever
    the kernels' rounding; for large p the stable softplus. The first sees min(p, 0), so its unused branch cannot
    overflow and poison gradients (`where`, not clamp: clamp's gradient vanishes at p = 0, which would freeze a
    zero-initialised head).
    """

    def __init__(self, minimum: float) -> None:
        self.minimum = minimum
        self.shift = math.log(math.expm1(1.0 - minimum))  # c
        self.rate = -math.expm1(-(1.0 - minimum))  # r = sigmoid(c)

    def __call__(self, p: Tensor) -> Tensor:
        p_neg = torch.where(p <= 0, p, torch.zeros_like(p))
        small = 1.0 + torch.log1p(self.rate * torch.expm1(p_neg))
        large = self.minimum + F.softplus(p + self.shift)
        return torch.where(p <= 0, small, large)


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

    def _broadcast(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """x (..., D) and params (..., D, num_params) in the compute dtype (at least fp32), broadcast to each other."""
        if params.shape[-1] != self.num_params:
            raise ValueError(f"{self!r} expects params[..., {self.num_params}], got {tuple(params.shape)}")
        dtype = torch.promote_types(at_least_fp32(x).dtype, at_least_fp32(params).dtype)
        shape = torch.broadcast_shapes(x.shape, params.shape[:-1])
        return x.to(dtype).expand(shape), params.to(dtype).expand(*shape, self.num_params)

    def init_head(self, head: nn.Linear) -> None:
        """Initialise the linear layer that outputs the parameters: zero, so every block starts as the identity."""
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)

    def guide(self, params_cond: Tensor, params_uncond: Tensor, weight: float | Tensor) -> Tensor:
        """Classifier-free guidance on the raw head outputs: p_c + w (p_c - p_u); w = 0 gives p_c."""
        return params_cond + weight * (params_cond - params_uncond)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_params={self.num_params})"


class IterativeTokenTransform(TokenTransform):
    """A transform whose inverse is solved numerically: to within tol (1 + |x|), tol = max(`inverse_tol`, 16 eps of
    the compute dtype), in at most `max_iter` iterations; elements still unconverged then are reported with a
    warning, not retried."""

    closed_form_inverse = False  # bisection / Newton with a host-side stopping test: not CUDA-graph capturable

    def __init__(self, inverse_tol: float, max_iter: int) -> None:
        if inverse_tol <= 0 or max_iter < 1:
            raise ValueError("inverse_tol must be > 0 and max_iter >= 1")
        self.inverse_tol = inverse_tol
        self.max_iter = max_iter

    def tolerance(self, dtype: torch.dtype) -> float:
        """The stopping tolerance in `dtype`: inverse_tol, unless the dtype cannot resolve it."""
        return max(self.inverse_tol, 16 * torch.finfo(dtype).eps)

    def _warn_unconverged(self, unconverged: Tensor, tol: float, after: str) -> None:
        """The caller sees how many elements missed the tolerance and by how much (`after`: the iterations' unit
        and the largest remaining step)."""
        warnings.warn(
            f"{type(self).__name__}.inverse: {int(unconverged.sum())} of {unconverged.numel()} elements not within "
            f"tol={tol:.1e} after max_iter={self.max_iter}{after}",
            RuntimeWarning,
            stacklevel=4,  # the caller of inverse()
        )
