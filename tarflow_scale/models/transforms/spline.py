"""Rational-quadratic spline token transform (Neural Spline Flows) with identity tails outside [-B, B]."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import ShiftedSoftplus, TokenTransform


class RationalQuadraticSplineTransform(TokenTransform):
    r"""Monotonic rational-quadratic spline per dimension (Durkan et al. 2019, arXiv 1906.04032).

    K bins cover [-B, B] in x and in z; outside it the map is the identity (log-derivative 0). Boundary
    derivatives are fixed to 1, so the spline joins the tails with a continuous first derivative.

    Params, shape (..., D, 3K - 1) for x of shape (..., D):
      * ``params[..., :K]``     bin-width logits  -> w_k = 1/K + (1 - K m_w)(softmax_k - 1/K) >= m_w,
      * ``params[..., K:2K]``   bin-height logits -> h_k likewise with m_h (widths and heights sum to 1
        and are scaled by 2B),
      * ``params[..., 2K:]``    K - 1 interior knot-derivative pre-activations
        -> d(p) = m_d + softplus(p + c), c = log(expm1(1 - m_d)), so d(0) = 1 and d > m_d.

    In bin k, with knots (x_k, z_k), width w, height h, slope s = h / w, end derivatives d_0, d_1,
    u = (x - x_k) / w in [0, 1] and v = 1 - u:

        z = z_k + h (s u^2 + d_0 u v) / beta,       beta = s u^2 + (d_0 + d_1) u v + s v^2,
        dz/dx = s^2 (d_1 u^2 + 2 s u v + d_0 v^2) / beta^2.

    The inverse solves a u^2 + b u + c = 0 with t = (z - z_k) / h, e = d_0 + d_1 - 2s,
    a = (s - d_0) + t e, b = d_0 - t e, c = -s t, taking the root in [0, 1] in closed form without
    cancellation: u = 2c / (-b - sqrt(b^2 - 4ac)) when b >= 0 (the form of the paper) and
    u = (-b + sqrt(b^2 - 4ac)) / (2a) when b < 0 (then a >= |b| > 0).

    Zero params give equal bins, s = 1 and all derivatives 1, i.e. the identity. The formulas are
    evaluated as the identity plus terms that vanish in that case (z = x + (z_k - x_k) + (h - w) u +
    h u v ((s - d_1) u + (d_0 - s) v) / beta, and dz/dx in the homogeneous form with an extra factor
    (u + v)^2 = 1), so zero params give z == x and log|dz/dx| == 0 bitwise, as TarFlow needs for the
    first token of each block. Maths runs in at least fp32; float64 stays float64.

    Guidance (``guide``) keeps the default: linear extrapolation p_c + w (p_c - p_u) of the raw head
    outputs (logits and pre-activations), which keeps every guided spline valid (monotonic).

    Example::

        >>> t = RationalQuadraticSplineTransform(num_bins=8, bound=4.0)
        >>> x = torch.randn(2, 5, 12, dtype=torch.float64)
        >>> p = torch.randn(2, 5, 12, t.num_params, dtype=torch.float64)
        >>> z, log_deriv = t.forward(x, p)  # (2, 5, 12) each
        >>> torch.allclose(t.inverse(z, p), x, atol=1e-10)
        True
    """

    def __init__(
        self,
        num_bins: int,
        bound: float,
        min_bin_width: float = 1e-3,
        min_bin_height: float = 1e-3,
        min_derivative: float = 1e-3,
    ) -> None:
        if num_bins < 1:
            raise ValueError(f"num_bins must be >= 1, got {num_bins}")
        if bound <= 0:
            raise ValueError(f"bound must be > 0, got {bound}")
        if not 0 <= min_bin_width * num_bins < 1 or not 0 <= min_bin_height * num_bins < 1:
            raise ValueError("min_bin_width and min_bin_height must lie in [0, 1 / num_bins)")
        if not 0 < min_derivative < 1:
            raise ValueError(f"min_derivative must lie in (0, 1), got {min_derivative}")
        self.num_bins = num_bins
        self.bound = float(bound)
        self.min_bin_width = min_bin_width
        self.min_bin_height = min_bin_height
        self.min_derivative = min_derivative
        self.num_params = 3 * num_bins - 1
        self._derivative = ShiftedSoftplus(min_derivative)  # d(p) = m_d + softplus(p + c): d(0) == 1 exactly

    def knots(self, params: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Knot positions in x and z and the derivatives there, each of shape (..., D, K + 1).

        Knots run from -B to B (first and last exactly); derivatives at both ends are exactly 1.
        Computed in the dtype of ``params`` (call with at least fp32).
        """
        K, B = self.num_bins, self.bound
        # Widths and heights go through identical ops, so equal logits give bitwise equal knots in x and z.
        probs = torch.softmax(params[..., : 2 * K].unflatten(-1, (2, K)), dim=-1)  # (..., D, 2, K)
        # Filled on the device, not copied from host data: a host-to-device copy at every token step would sync the
        # GPU and is refused inside CUDA-graph capture.
        min_size = torch.stack([params.new_full((1,), self.min_bin_width), params.new_full((1,), self.min_bin_height)])
        # 1/K + (1 - K m)(p - 1/K) rather than m + (1 - K m) p: equal logits give exactly 1/K whatever m.
        sizes = 1.0 / K + (1.0 - K * min_size) * (probs - 1.0 / K)
        inner = B * (2.0 * torch.cumsum(sizes[..., :-1], dim=-1) - 1.0)  # (..., D, 2, K - 1)
        ends = params.new_full((*inner.shape[:-1], 1), B)
        knots = torch.cat([-ends, inner, ends], dim=-1)  # (..., D, 2, K + 1)

        inner_deriv = self._derivative(params[..., 2 * K :])  # (..., D, K - 1)
        deriv = F.pad(inner_deriv, (1, 1), value=1.0)  # boundary derivatives 1 match the identity tails
        return knots[..., 0, :], knots[..., 1, :], deriv

    @staticmethod
    def _bin(value: Tensor, knots_in: Tensor, knots_out: Tensor, deriv: Tensor) -> tuple[Tensor, ...]:
        """Gather the bin holding ``value`` (in [-B, B]): left knots and sizes in/out, end derivatives."""
        # Counting interior knots <= value puts a value exactly on a knot at the start of the next bin
        # and value == B in the last bin (u = 1).
        inner = knots_in[..., 1:-1].contiguous()  # (..., D, K - 1)
        idx = torch.searchsorted(inner, value.unsqueeze(-1).contiguous(), right=True)
        k0, k1 = idx, idx + 1  # (..., D, 1)
        in0, out0, d0 = knots_in.gather(-1, k0), knots_out.gather(-1, k0), deriv.gather(-1, k0)
        in1, out1, d1 = knots_in.gather(-1, k1), knots_out.gather(-1, k1), deriv.gather(-1, k1)
        return tuple(t.squeeze(-1) for t in (in0, in1 - in0, out0, out1 - out0, d0, d1))

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """z = spline(x) inside [-B, B], z = x outside; returns z (dtype of x) and log|dz/dx| (>= fp32)."""
        xc, p = self._broadcast(x, params)
        knot_x, knot_z, deriv = self.knots(p)
        inside = (xc >= -self.bound) & (xc <= self.bound)
        # Tail values enter the spline as 0, so its unused branch stays finite for autograd (not clamp:
        # its gradient vanishes at x = +-B exactly).
        xs = torch.where(inside, xc, torch.zeros_like(xc))
        x0, w, z0, h, d0, d1 = self._bin(xs, knot_x, knot_z, deriv)
        s = h / w
        u = (xs - x0) / w  # in [0, 1] without clamping: x_k <= x <= x_k+1 and rounding is monotonic
        v = 1.0 - u
        uu, uv, vv = u * u, u * v, v * v
        beta = s * uu + (d0 + d1) * uv + s * vv  # sum of positive terms: no cancellation
        # z_k + h (s u^2 + d_0 u v) / beta rewritten as x + (terms that vanish for the identity).
        z = xs + (z0 - x0) + (h - w) * u + h * uv * ((s - d1) * u + (d0 - s) * v) / beta
        num = d1 * uu + (2.0 * s) * uv + d0 * vv
        one = uu + 2.0 * uv + vv  # (u + v)^2 = 1, evaluated like beta and num so the identity cancels
        log_deriv = 2.0 * torch.log(s) + torch.log(num) + torch.log(one) - 2.0 * torch.log(beta)
        z = torch.where(inside, z, xc)
        log_deriv = torch.where(inside, log_deriv, torch.zeros_like(log_deriv))
        return z.to(x.dtype), log_deriv

    def inverse(self, z: Tensor, params: Tensor) -> Tensor:
        """x = spline^{-1}(z) inside [-B, B] (closed-form quadratic root), x = z outside."""
        zc, p = self._broadcast(z, params)
        knot_x, knot_z, deriv = self.knots(p)
        inside = (zc >= -self.bound) & (zc <= self.bound)
        zs = torch.where(inside, zc, torch.zeros_like(zc))
        z0, h, x0, w, d0, d1 = self._bin(zs, knot_z, knot_x, deriv)
        s = h / w
        t = (zs - z0) / h  # in [0, 1], as u in forward
        e = d0 + d1 - 2.0 * s
        a = (s - d0) + t * e
        b = d0 - t * e
        c = -s * t
        sqrt_disc = (b * b - 4.0 * a * c).clamp(min=0.0).sqrt()
        # Each branch is the cancellation-free form of the same root; b < 0 implies a >= |b| > 0, and
        # the safe denominators keep the unused branch finite.
        neg_b = b < 0
        u_pos = 2.0 * c / torch.where(neg_b, -torch.ones_like(b), -b - sqrt_disc)
        u_neg = (-b + sqrt_disc) / (2.0 * torch.where(neg_b, a, torch.ones_like(a)))
        u = torch.where(neg_b, u_neg, u_pos).clamp(0.0, 1.0)
        # x_k + w u rewritten as z + (terms that vanish for the identity).
        x = zs + (x0 - z0) + (w * u - h * t)
        return torch.where(inside, x, zc).to(z.dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_bins={self.num_bins}, bound={self.bound})"
