"""Mixture-of-logistics CDF token transform (Flow++), inverted by safeguarded Newton iteration."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import IterativeTokenTransform
from .logistic_mixture import logit_of_sigmoid_mixture


class MixtureCDFTransform(IterativeTokenTransform):
    r"""z = logit(F(x)) exp(a) + b per dimension, F a mixture of K logistics (Flow++, arXiv 1902.00275).

    Params, shape (..., D, 3K + 2) for x of shape (..., D):
      * ``params[..., :K]``      mixture logits, pi = softmax(logits),
      * ``params[..., K:2K]``    means mu_k,
      * ``params[..., 2K:3K]``   log-scales log s_k,
      * ``params[..., 3K]``      log-scale a of the output affine, ``params[..., 3K + 1]`` its shift b.

    With y_k = (x - mu_k) / s_k, everything is computed in log space:

        log F      = logsumexp_k(log pi_k + logsigmoid(y_k)),
        log(1 - F) = logsumexp_k(log pi_k + logsigmoid(-y_k)),
        logit F    = log F - log(1 - F),
        log F'     = logsumexp_k(log pi_k + logsigmoid(y_k) + logsigmoid(-y_k) - log s_k),
        log|dz/dx| = a + log F' - log F - log(1 - F).

    log(1 - F) comes from its own mixture of sigmoid(-y_k), never from F, so both tails are exact and
    asymptotically linear (slope 1 / max_k s_k in logit space) instead of saturating at F = 0 or 1.

    Each term is evaluated relative to the zero-param component sigmoid(x), whose logit is x itself:
    with delta+_k = logsigmoid(y_k) - logsigmoid(x), delta-_k = logsigmoid(-y_k) - logsigmoid(-x) and
    L(v) = logsumexp_k(logits_k + v_k) - logsumexp_k(logits_k),

        logit F    = x + L(delta+) - L(delta-),
        log|dz/dx| = a + L(delta+ + delta- - log s) - L(delta+) - L(delta-),

    where delta+_k = log1p(sigmoid(-y_k) expm1(y_k - x)) (and delta- likewise) while |y_k - x| <= 1.
    Zero params (equal weights, mu = 0, s = 1, a = b = 0) make every delta exactly 0, so they give
    z == x and log|dz/dx| == 0 bitwise, as TarFlow needs for the first token of each block. The price is
    that far-tail z carries rounding of order eps |x| rather than eps |z|.

    The inverse solves logit F(x) = g = (z - b) exp(-a). Since F is a convex combination of sigmoids,
    min_k y_k <= logit F(x) <= max_k y_k, so the root lies in [min_k, max_k] of mu_k + g s_k: a guaranteed
    bracket, no expansion needed. Newton steps on logit F (nearly linear in the tails) are taken while
    they stay inside the bracket and shrink fast enough, bisection otherwise (``rtsafe``, Numerical
    Recipes 9.4); every evaluation also narrows the bracket. Iteration stops once every element's last
    step is at most ``tol (1 + |x|)``, with tol = max(``inverse_tol``, 16 eps of the compute dtype):
    1e-10 by default in float64, about 2e-6 in fp32. Elements still unconverged after ``max_iter``
    iterations are reported with a warning.

    Initialisation: at all-zero params the K components coincide, so they receive identical gradients
    (and the logits none) and a head zero-initialised for this transform never separates them, leaving
    a single logistic, i.e. an affine map. Give its output projection small random weights instead; token
    0 of each block still gets exact zeros from the TarFlow shift, hence the identity.

    Guidance (``guide``) keeps the default: linear extrapolation p_c + w (p_c - p_u) of the raw head
    outputs, which keeps every guided transform valid (weights via softmax, scales via exp).

    Example::

        >>> t = MixtureCDFTransform(num_components=4)
        >>> x = torch.randn(2, 5, 12, dtype=torch.float64)
        >>> p = torch.randn(2, 5, 12, t.num_params, dtype=torch.float64)
        >>> z, log_deriv = t.forward(x, p)  # (2, 5, 12) each
        >>> torch.allclose(t.inverse(z, p), x, atol=1e-8)
        True
    """

    def __init__(self, num_components: int, inverse_tol: float = 1e-10, max_iter: int = 100) -> None:
        if num_components < 1:
            raise ValueError(f"num_components must be >= 1, got {num_components}")
        super().__init__(inverse_tol, max_iter)
        self.num_components = num_components
        self.num_params = 3 * num_components + 2

    def init_head(self, head: nn.Linear) -> None:
        """Zero, except a small spread of the component means.

        At all-zero params the K components are identical, receive identical gradients and never separate:
        the mixture would train as one logistic. A small spread breaks the tie and keeps the start near the
        identity (token 0 still gets exact zeros from the block's shift, so it stays the identity).
        """
        super().init_head(head)
        K = self.num_components
        with torch.no_grad():
            # Head outputs are laid out (D, num_params): slot d * num_params + p; means are p in [K, 2K).
            bias = head.bias.view(-1, self.num_params)
            bias[:, K : 2 * K] = torch.linspace(-0.1, 0.1, K) if K > 1 else 0.0

    def _prepare(self, x: Tensor, params: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Cast to the compute dtype, broadcast; split params into (logits, lse(logits), mu, log s, a, b)."""
        x, params = self._broadcast(x, params)
        K = self.num_components
        logits = params[..., :K]  # (..., D, K)
        means, log_scales = params[..., K : 2 * K], params[..., 2 * K : 3 * K]  # (..., D, K)
        log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)  # (..., D, 1)
        return x, (logits, log_norm, means, log_scales, params[..., 3 * K], params[..., 3 * K + 1])

    @staticmethod
    def _logit_cdf(
        x: Tensor, logits: Tensor, log_norm: Tensor, means: Tensor, log_scales: Tensor
    ) -> tuple[Tensor, Tensor]:
        """logit F(x) and log d(logit F)/dx, (..., D); mixture params (..., D, K), log_norm (..., D, 1)."""

        def units(x_: Tensor) -> Tensor:  # y_k = (x - mu_k) / s_k, (..., D, K)
            return (x_ - means) * torch.exp(-log_scales)

        return logit_of_sigmoid_mixture(x, units, -log_scales, logits, log_norm)

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """z = logit(F(x)) exp(a) + b; returns z (dtype of x) and log|dz/dx| (>= fp32), shape (..., D)."""
        xc, (logits, log_norm, means, log_scales, a, b) = self._prepare(x, params)
        logit_cdf, log_deriv = self._logit_cdf(xc, logits, log_norm, means, log_scales)
        z = logit_cdf * torch.exp(a) + b
        return z.to(x.dtype), a + log_deriv

    def inverse(self, z: Tensor, params: Tensor) -> Tensor:
        """x with logit(F(x)) = (z - b) exp(-a), by bracketed Newton/bisection; builds no autograd graph."""
        with torch.no_grad():
            zc, (logits, log_norm, means, log_scales, a, b) = self._prepare(z, params)
            x = self._solve_logit_cdf((zc - b) * torch.exp(-a), logits, log_norm, means, log_scales)
        return x.to(z.dtype)

    def _solve_logit_cdf(
        self, target: Tensor, logits: Tensor, log_norm: Tensor, means: Tensor, log_scales: Tensor
    ) -> Tensor:
        """x with logit F(x) = target, elementwise over (..., D), by rtsafe (see the class docstring)."""
        ends = means + target.unsqueeze(-1) * torch.exp(log_scales)  # mu_k + g s_k, (..., D, K)
        lo, hi = ends.amin(dim=-1), ends.amax(dim=-1)
        tol = self.tolerance(target.dtype)
        x = lo + 0.5 * (hi - lo)
        step = step_before = hi - lo  # as in rtsafe: the last two steps, for the "fast enough" test
        done = step.abs() <= tol * (1 + x.abs())
        for _ in range(self.max_iter):
            if bool(done.all()):
                return x
            logit_cdf, log_deriv = self._logit_cdf(x, logits, log_norm, means, log_scales)
            residual = logit_cdf - target
            below = residual < 0  # logit F is increasing: the root lies above x
            lo, hi = torch.where(below, x, lo), torch.where(below, hi, x)
            newton_step = residual * torch.exp(-log_deriv)
            newton_x = x - newton_step
            # NaN/inf steps (vanishing derivative) fail these comparisons and fall back to bisection.
            use_newton = (newton_x >= lo) & (newton_x <= hi) & (2 * newton_step.abs() <= step_before.abs())
            # Converged elements are frozen, as scalar rtsafe returns: iterating on, rounding noise would
            # fail the "fast enough" test and bisect them back to the middle of a wide bracket.
            step_before = torch.where(done, step_before, step)
            step = torch.where(done, step, torch.where(use_newton, newton_step, 0.5 * (hi - lo)))
            x = torch.where(done, x, torch.where(use_newton, newton_x, lo + 0.5 * (hi - lo)))
            done = done | (step.abs() <= tol * (1 + x.abs()))
        unconverged = ~done
        if bool(unconverged.any()):
            self._warn_unconverged(unconverged, tol, f" (largest last step {float(step[unconverged].abs().max()):.2e})")
        return x

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_components={self.num_components})"
