"""Generic invariants of every per-token transform (zuko-style), in float64 on CPU."""

from __future__ import annotations

import pytest
import torch

from tarflow_scale.models.transforms import (
    AffineTransform,
    ShiftTransform,
    TokenTransform,
    VolumePreservingAffineTransform,
)
from tarflow_scale.models.transforms.mixture import MixtureCDFTransform
from tarflow_scale.models.transforms.spline import RationalQuadraticSplineTransform

D = 6  # dimensions per token
PARAM_SCALE = 1.5  # random head outputs of a size that bends the transforms well away from the identity
EPS = torch.finfo(torch.float64).eps
F64 = torch.float64

TRANSFORMS: dict[str, TokenTransform] = {
    "affine": AffineTransform(),
    "affine_vp": VolumePreservingAffineTransform(),
    "shift": ShiftTransform(),
    "spline_k4": RationalQuadraticSplineTransform(num_bins=4, bound=3.0),
    "spline_k8": RationalQuadraticSplineTransform(num_bins=8, bound=4.0),
    "mixture_k4": MixtureCDFTransform(num_components=4),
}
# Param slots whose gradient vanishes at zero params by symmetry: identical mixture components make
# F(x) independent of the weights. Every other slot must be trainable from a zero-initialised head.
DEAD_AT_IDENTITY = {"mixture_k4": range(0, 4)}

parametrize = pytest.mark.parametrize("name", list(TRANSFORMS))
# An inverse that did not converge warns; here that is a failure.
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")


def _randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale


def _inputs(t: TokenTransform, seed: int, n: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """x of shape (N, D) and random params (N, D, P): a Gaussian bulk, far tails, and for splines x on
    every knot of its own spline (bin edges, +-B) and just beside the outer knots."""
    params = _randn(n, D, t.num_params, seed=seed, scale=PARAM_SCALE)
    x = _randn(n, D, seed=seed + 1, scale=3.0)
    x[:8] = torch.tensor([-1e3, -50.0, -20.0, -1e-300, 0.0, 20.0, 50.0, 1e3], dtype=F64)[:, None]
    if isinstance(t, RationalQuadraticSplineTransform):
        knot_x = t.knots(params)[0]  # (N, D, K + 1)
        edges = [knot_x[..., j] for j in range(t.num_bins + 1)]
        beside = [torch.nextafter(e, e * 2) for e in (knot_x[..., 0], knot_x[..., -1])]  # just in the tails
        x = torch.cat([x, *edges, *beside])
        params = params.repeat(len(edges) + len(beside) + 1, 1, 1)
    return x, params


@parametrize
def test_shapes_and_dtypes(name: str) -> None:
    t = TRANSFORMS[name]
    x, params = _randn(2, 3, D, seed=0), _randn(2, 3, D, t.num_params, seed=1)
    z, log_deriv = t.forward(x, params)
    assert z.shape == log_deriv.shape == x.shape
    assert z.dtype == log_deriv.dtype == F64
    x_back = t.inverse(z, params)
    assert x_back.shape == x.shape and x_back.dtype == F64
    assert t.num_params == params.shape[-1]


@parametrize
def test_zero_params_are_the_identity(name: str) -> None:
    t = TRANSFORMS[name]
    x = torch.cat([_inputs(t, seed=2)[0], torch.linspace(-30, 30, 601, dtype=F64)[:, None].expand(-1, D)])
    params = torch.zeros(*x.shape, t.num_params, dtype=F64)
    z, log_deriv = t.forward(x, params)
    x_back = t.inverse(x, params)
    # Bitwise, for every transform: token 0 of each TarFlow block must pass through unchanged.
    assert torch.equal(z, x) and torch.equal(x_back, x)
    assert torch.equal(log_deriv, torch.zeros_like(x))


@parametrize
def test_strictly_increasing(name: str) -> None:
    t = TRANSFORMS[name]
    params = _randn(D, t.num_params, seed=3, scale=PARAM_SCALE).expand(4001, D, t.num_params)
    grid = torch.linspace(-12, 12, 4001, dtype=F64)[:, None].expand(-1, D)  # covers spline tails too
    z, log_deriv = t.forward(grid, params)
    assert (z.diff(dim=0) > 0).all()
    assert log_deriv.isfinite().all()


@parametrize
def test_inverse_round_trip(name: str) -> None:
    t = TRANSFORMS[name]
    x, params = _inputs(t, seed=4)
    z, log_deriv = t.forward(x, params)
    x_back = t.inverse(z, params)
    # Rounding z to a few ulps moves x by that much over dz/dx: an error no inverse can avoid, and the
    # only one allowed on top of the target accuracy (1e-10, or the mixture's stated iteration tolerance).
    conditioning = 8 * EPS * (1 + z.abs()) * torch.exp(-log_deriv)
    target = t.inverse_tol * (1 + x.abs()) if isinstance(t, MixtureCDFTransform) else 1e-10
    assert ((x_back - x).abs() <= target + conditioning).all()
    # The other direction, from every knot of the output side (bin edges and +-B) for splines.
    if isinstance(t, RationalQuadraticSplineTransform):
        params = params[:50]
        knot_z = t.knots(params)[1]
        z = torch.cat([knot_z[..., j] for j in range(t.num_bins + 1)])
        params = params.repeat(t.num_bins + 1, 1, 1)
        z_back = t.forward(t.inverse(z, params), params)[0]
        assert ((z_back - z).abs() <= 1e-10).all()


@parametrize
def test_log_derivative_matches_autograd(name: str) -> None:
    t = TRANSFORMS[name]
    x, params = _inputs(t, seed=5)
    x.requires_grad_(True)
    z, log_deriv = t.forward(x, params)
    # Elementwise: with a diagonal Jacobian (checked below) d(sum z)/dx_i = dz_i/dx_i.
    (dz_dx,) = torch.autograd.grad(z.sum(), x)
    torch.testing.assert_close(dz_dx.log(), log_deriv.detach(), rtol=0, atol=1e-10)
    # Per token, the form every transform must satisfy: sum of log-derivatives = log|det| of the full
    # (D x D) Jacobian; the Jacobian is diagonal (each z_i depends on x_i alone) with positive sign.
    for i in range(0, x.shape[0], x.shape[0] // 7):
        x_i, params_i = x[i].detach(), params[i]
        jac = torch.autograd.functional.jacobian(lambda v, p=params_i: t.forward(v, p)[0], x_i)
        assert torch.equal(jac, torch.diag(torch.diagonal(jac)))
        sign, log_abs_det = torch.linalg.slogdet(jac)
        assert sign == 1
        torch.testing.assert_close(log_abs_det, log_deriv[i].detach().sum(), rtol=0, atol=1e-9)


def param_gradient_sizes(t: TokenTransform, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Largest |gradient| per param slot (P,) of a Gaussian negative log-likelihood at zero params (a
    zero-initialised head), after checking that the gradient is finite there and at `params`."""
    for p in (params, torch.zeros_like(params)):
        p = p.clone().requires_grad_(True)
        z, log_deriv = t.forward(x, p)
        (0.5 * z.square() - log_deriv).sum().backward()  # a Gaussian negative log-likelihood
        assert p.grad.isfinite().all()
    return p.grad.abs().amax(dim=(0, 1))


@parametrize
def test_param_gradients_finite_and_alive_at_identity(name: str) -> None:
    t = TRANSFORMS[name]
    x, params = _inputs(t, seed=6)
    # At zero params (a zero-initialised head) every slot must receive gradient somewhere.
    alive = param_gradient_sizes(t, x, params) > 0  # (P,)
    dead = set(DEAD_AT_IDENTITY.get(name, ()))
    assert [bool(a) for a in alive] == [j not in dead for j in range(t.num_params)]


@parametrize
def test_guide_is_linear_extrapolation(name: str) -> None:
    t = TRANSFORMS[name]
    cond, uncond = _randn(3, D, t.num_params, seed=7), _randn(3, D, t.num_params, seed=8)
    assert torch.equal(t.guide(cond, uncond, 0.0), cond)
    torch.testing.assert_close(t.guide(cond, uncond, 2.5), cond + 2.5 * (cond - uncond))


@parametrize
def test_bf16_inputs_compute_in_fp32(name: str) -> None:
    t = TRANSFORMS[name]
    x, params = (v.to(torch.bfloat16) for v in _inputs(t, seed=9, n=64))
    z, log_deriv = t.forward(x, params)
    assert z.dtype == torch.bfloat16 and log_deriv.dtype == torch.float32
    assert z.isfinite().all() and log_deriv.isfinite().all()
    # Same result as running the maths in fp32 on the upcast inputs: nothing is computed in bf16.
    z32, log_deriv32 = t.forward(x.float(), params.float())
    assert torch.equal(z, z32.to(torch.bfloat16)) and torch.equal(log_deriv, log_deriv32)
    x_back = t.inverse(z, params)
    assert x_back.dtype == torch.bfloat16 and x_back.isfinite().all()


def test_mixture_inverse_takes_newton_steps() -> None:
    # Bisection alone needs ~45 halvings from the initial bracket to 1e-10; safeguarded Newton far fewer.
    t = MixtureCDFTransform(num_components=4, max_iter=25)  # a miss warns, which fails here
    x, params = _inputs(t, seed=10, n=300)
    z, _ = t.forward(x, params)
    assert ((t.inverse(z, params) - x).abs() <= 1e-10 * (1 + x.abs())).all()
