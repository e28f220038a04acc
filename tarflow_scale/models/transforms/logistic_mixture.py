"""The logit of a mixture of logistic sigmoids, exactly the identity at zero deviation: the maths the mixture-CDF
(Flow++) and deep sigmoidal (NAF) token transforms share."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def logit_of_sigmoid_mixture(
    u: Tensor, units: Callable[[Tensor], Tensor], log_dy: Tensor | None, logits: Tensor, log_norm: Tensor
) -> tuple[Tensor, Tensor | None]:
    """logit(sum_k w_k sigmoid(y_k)) and its log-derivative in u, w = softmax(logits), y = units(u).

    u: (..., D); units: u[..., None] (..., D, 1) -> y (..., D, K), each unit's argument, an increasing affine
    function of u; log_dy: (..., D, K), log dy_k/du (None: the value only); logits: (..., D, K) and log_norm =
    logsumexp(logits) (..., D, 1). Returns (..., D) each.

    Each term is taken relative to sigmoid(u), whose logit is u itself: with delta+_k = logsigmoid(y_k) -
    logsigmoid(u), delta-_k = logsigmoid(-y_k) - logsigmoid(-u) and L(v) = logsumexp_k(logits_k + v_k) - log_norm,

        value      = u + L(delta+) - L(delta-),
        log d/du   = L(delta+ + delta- + log dy/du) - L(delta+) - L(delta-),

    and log(1 - F) comes from its own mixture, never from F, so both tails are exact. Where every y_k == u (zero
    params) each delta is exactly 0, so the value is u and the log-derivative 0, bitwise.
    """
    u_ = u.unsqueeze(-1)  # (..., D, 1)
    y = units(u_)
    diff = y - u_  # exactly 0 for a zero-param unit
    # Near the identity, the log1p/expm1 form is exactly 0 at diff = 0 whatever the kernels' rounding;
    # elsewhere (where expm1 could overflow) the plain difference. `where`, not clamp, keeps gradients.
    near = diff.abs() <= 1
    diff_near = torch.where(near, diff, torch.zeros_like(diff))
    delta_pos = torch.where(
        near, torch.log1p(torch.sigmoid(-y) * torch.expm1(diff_near)), F.logsigmoid(y) - F.logsigmoid(u_)
    )
    delta_neg = torch.where(
        near, torch.log1p(torch.sigmoid(y) * torch.expm1(-diff_near)), F.logsigmoid(-y) - F.logsigmoid(-u_)
    )

    def log_mix(v: Tensor) -> Tensor:  # L(v) = log sum_k w_k exp(v_k), exactly 0 when v == 0
        return (torch.logsumexp(logits + v, dim=-1, keepdim=True) - log_norm).squeeze(-1)

    dev_cdf, dev_sf = log_mix(delta_pos), log_mix(delta_neg)  # log F - logsig(u), log(1 - F) - logsig(-u)
    value = u + (dev_cdf - dev_sf)
    if log_dy is None:
        return value, None
    return value, log_mix(delta_pos + delta_neg + log_dy) - dev_cdf - dev_sf
