"""Deep sigmoidal flow token transform (Neural Autoregressive Flows), inverted by bracketed bisection."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import IterativeTokenTransform, ShiftedSoftplus
from .logistic_mixture import logit_of_sigmoid_mixture


class DeepSigmoidalTransform(IterativeTokenTransform):
    r"""Deep sigmoidal flow (DSF, Huang et al. 2018, arXiv 1804.00779) per dimension, with an output affine.

    One stage maps u to logit(sum_j w_j sigmoid(a_j u + b_j)) with H hidden units, a_j > 0 and w on the
    simplex; ``num_stages`` stages are composed (each monotonic, so the composition is), then
    z = u_S exp(s) + t. Params, shape (..., D, 3 H S + 2) for x of shape (..., D):

      * stage k uses ``params[..., 3Hk : 3H(k+1)]`` = [slope pre-activations p (H), shifts b (H),
        weight logits (H)]; a(p) = m_a + softplus(p + c), c = log(expm1(1 - m_a)), so a(0) = 1 and a > m_a
        (``min_slope``), evaluated as 1 + log1p(r expm1(p)), r = sigmoid(c), for p <= 0 so that a(0) == 1
        exactly (the form of the spline's knot derivatives);
      * ``params[..., -2]`` output log-scale s, ``params[..., -1]`` output shift t.

    With y_j = a_j u + b_j, everything is computed in log space (NAF's DSF is a logistic-mixture CDF with
    means -b_j / a_j and scales 1 / a_j, so the formulas are those of MixtureCDFTransform):

        log F      = logsumexp_j(log w_j + logsigmoid(y_j)),
        log(1 - F) = logsumexp_j(log w_j + logsigmoid(-y_j)),          (never log1p(-F): exact tails)
        log F'     = logsumexp_j(log w_j + log a_j + logsigmoid(y_j) + logsigmoid(-y_j)),
        log|d stage/du| = log F' - log F - log(1 - F).

    Each term is evaluated relative to the zero-param unit sigmoid(u), whose logit is u itself: with
    delta+_j = logsigmoid(y_j) - logsigmoid(u), delta-_j = logsigmoid(-y_j) - logsigmoid(-u) and
    L(v) = logsumexp_j(logits_j + v_j) - logsumexp_j(logits_j),

        stage(u)        = u + L(delta+) - L(delta-),
        log|d stage/du| = L(delta+ + delta- + log a) - L(delta+) - L(delta-),

    with delta+_j = log1p(sigmoid(-y_j) expm1(y_j - u)) (delta- likewise) while |y_j - u| <= 1. Zero params
    (a = 1, b = 0, equal weights, s = t = 0) make every delta exactly 0: z == x and log|dz/dx| == 0 bitwise,
    as the TokenTransform contract asks. In both tails a stage is asymptotically linear with slope min_j a_j,
    so z stays finite for any finite x.

    Initialisation (``init_head``): at zero params all H units are identical and so are the gradients of their
    slots (the weight logits get none), so a head zero-initialised for this transform would never separate
    them; its bias spreads the shifts b_j instead.

    The inverse solves the composed map for x by bisection. Since F is a convex combination of sigmoids,
    min_j y_j <= logit F(u) <= max_j y_j, so stage(u) = v has its root in [min_j, max_j] of (v - b_j) / a_j:
    propagating [g, g], g = (z - t) exp(-s), back through the stages gives a guaranteed bracket for x (a
    single point, returned as is, when every stage's units coincide: zero params, or hidden=1). It is halved,
    evaluating the whole composition, until every element's half-width is at most tol (1 + |x|), with
    tol = max(``inverse_tol``, 16 eps of the compute dtype); the midpoint is returned, so |x - x*| <= tol (1 + |x|)
    up to the rounding of the forward map. 1e-10 in float64 by default needs about 40-60 halvings. Elements
    still unconverged after ``max_iter`` halvings are reported with a warning.

    Guidance (``guide``) keeps the default linear extrapolation of the raw head outputs, which keeps every
    guided transform valid (slopes via softplus, weights via softmax).

    Example::

        >>> t = DeepSigmoidalTransform(hidden=8)
        >>> x = torch.randn(2, 5, 12, dtype=torch.float64)
        >>> p = torch.randn(2, 5, 12, t.num_params, dtype=torch.float64)
        >>> z, log_deriv = t.forward(x, p)  # (2, 5, 12) each
        >>> bool(((t.inverse(z, p) - x).abs() <= 1e-9 * (1 + x.abs())).all())
        True
    """

    INIT_SHIFT_SPREAD = 1.0  # init_head: shifts b_j evenly in [-1, 1], slopes 1, equal weights

    def __init__(
        self,
        hidden: int,
        num_stages: int = 1,
        min_slope: float = 1e-3,
        inverse_tol: float = 1e-10,
        max_iter: int = 200,
    ) -> None:
        if hidden < 1 or num_stages < 1:
            raise ValueError(f"hidden and num_stages must be >= 1, got {hidden} and {num_stages}")
        if not 0 < min_slope < 1:
            raise ValueError(f"min_slope must lie in (0, 1), got {min_slope}")
        super().__init__(inverse_tol, max_iter)
        self.hidden = hidden
        self.num_stages = num_stages
        self.min_slope = min_slope
        self.num_params = 3 * hidden * num_stages + 2
        self._slope = ShiftedSoftplus(min_slope)  # a(p) = m + softplus(p + c): a(0) == 1 exactly

    # ------------------------------------------------------------------------------------------------------
    # Parameters

    def init_head(self, head: nn.Linear) -> None:
        """Zero, except the shifts b_j of every stage spread evenly over [-INIT_SHIFT_SPREAD, INIT_SHIFT_SPREAD].

        At all-zero params the H units coincide, receive identical gradients (the weight logits none) and never
        separate: the DSF would train as one affine map. The spread breaks the tie; the start is then a
        monotonic map near the identity rather than the identity itself.
        """
        super().init_head(head)
        if self.hidden == 1:
            return
        H = self.hidden
        with torch.no_grad():
            # Head outputs are laid out (D, num_params): slot d * num_params + p.
            bias = head.bias.view(-1, self.num_params)
            shifts = torch.linspace(-self.INIT_SHIFT_SPREAD, self.INIT_SHIFT_SPREAD, H)
            for k in range(self.num_stages):
                bias[:, 3 * H * k + H : 3 * H * k + 2 * H] = shifts

    def weight_logit_slots(self) -> list[int]:
        """Param slots that get no gradient at zero params (identical units), for tests and init checks."""
        H = self.hidden
        return [3 * H * k + 2 * H + j for k in range(self.num_stages) for j in range(H)]

    def _prepare(self, x: Tensor, params: Tensor) -> tuple[Tensor, list[tuple[Tensor, ...]], Tensor, Tensor]:
        """Cast and broadcast; split params into per-stage (slope, log slope, shift, logits, logsumexp) and s, t."""
        x, params = self._broadcast(x, params)
        H = self.hidden
        stages = []
        for k in range(self.num_stages):
            chunk = params[..., 3 * H * k : 3 * H * (k + 1)]  # (..., D, 3H)
            slope = self._slope(chunk[..., :H])
            logits = chunk[..., 2 * H :]
            stages.append((slope, torch.log(slope), chunk[..., H : 2 * H], logits, torch.logsumexp(logits, -1, True)))
        return x, stages, params[..., -2], params[..., -1]

    # ------------------------------------------------------------------------------------------------------
    # Maths

    @staticmethod
    def _stage(u: Tensor, stage: tuple[Tensor, ...], need_deriv: bool = True) -> tuple[Tensor, Tensor | None]:
        """One sigmoidal stage: value (..., D) and log-derivative (..., D) (None unless need_deriv)."""
        slope, log_slope, shift, logits, log_norm = stage

        def units(u_: Tensor) -> Tensor:  # y_j = a_j u + b_j, (..., D, H)
            return slope * u_ + shift

        return logit_of_sigmoid_mixture(u, units, log_slope if need_deriv else None, logits, log_norm)

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """z = stage_S(... stage_1(x)) exp(s) + t; returns z (dtype of x) and log|dz/dx| (>= fp32), (..., D)."""
        u, stages, log_scale, shift = self._prepare(x, params)
        log_deriv = log_scale
        for stage in stages:
            u, stage_log_deriv = self._stage(u, stage)
            log_deriv = log_deriv + stage_log_deriv
        z = u * torch.exp(log_scale) + shift
        return z.to(x.dtype), log_deriv

    def _composed(self, x: Tensor, stages: list[tuple[Tensor, ...]]) -> Tensor:
        for stage in stages:
            x = self._stage(x, stage, need_deriv=False)[0]
        return x

    def inverse(self, z: Tensor, params: Tensor) -> Tensor:
        """x with forward(x) = z, by bisection in a guaranteed bracket; no autograd graph (iterative)."""
        with torch.no_grad():
            zc, stages, log_scale, shift = self._prepare(z, params)
            target = (zc - shift) * torch.exp(-log_scale)  # what the composed stages must output
            lo, hi = target, target
            for slope, _, b, _, _ in reversed(stages):  # preimage bracket of [lo, hi] under each stage
                lo = ((lo.unsqueeze(-1) - b) / slope).amin(dim=-1)
                hi = ((hi.unsqueeze(-1) - b) / slope).amax(dim=-1)
            x = self._bisect(target, lo, hi, stages)
        return x.to(z.dtype)

    def _bisect(self, target: Tensor, lo: Tensor, hi: Tensor, stages: list[tuple[Tensor, ...]]) -> Tensor:
        tol = self.tolerance(target.dtype)
        # A point bracket is the exact root: all units of every stage coincide, e.g. zero params (bitwise
        # identity, as the contract asks) or hidden=1, where each stage is the affine map a u + b.
        exact, root = lo == hi, lo
        # Widen by the tolerance: the bracket's own rounding must not exclude the root.
        lo, hi = lo - tol * (1 + lo.abs()), hi + tol * (1 + hi.abs())
        for _ in range(self.max_iter):
            x = lo + 0.5 * (hi - lo)
            done = (0.5 * (hi - lo) <= tol * (1 + x.abs())) | exact
            if bool(done.all()):
                return torch.where(exact, root, x)
            below = self._composed(x, stages) < target  # increasing: the root lies above x
            lo, hi = torch.where(below, x, lo), torch.where(below, hi, x)
        x = torch.where(exact, root, lo + 0.5 * (hi - lo))
        unconverged = (0.5 * (hi - lo) > tol * (1 + x.abs())) & ~exact
        if bool(unconverged.any()):
            largest = float((0.5 * (hi - lo))[unconverged].max())
            self._warn_unconverged(unconverged, tol, f" halvings (largest half-width {largest:.2e})")
        return x

    def __repr__(self) -> str:
        return f"{type(self).__name__}(hidden={self.hidden}, num_stages={self.num_stages})"
