"""T-NAF, its deep sigmoidal transform, the MAF baseline and the digits data: invariants against brute force."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_transforms import param_gradient_sizes

from tarflow_scale.config import ConfigError, MAFConfig, TNAFConfig, load_config
from tarflow_scale.config.study import TNAFRunConfig
from tarflow_scale.data.tabular import (
    DIGITS_NUM_LEVELS,
    dequantize_digits,
    digits_levels_split,
    load_digits_split,
)
from tarflow_scale.models.maf import MAF
from tarflow_scale.models.tnaf import TNAF
from tarflow_scale.models.transforms.sigmoidal import DeepSigmoidalTransform

F64 = torch.float64
EPS = torch.finfo(F64).eps
D = 5  # dimensions of the tiny models
STUDY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tabular" / "tnaf_digits.yaml"
# An inverse that did not converge warns; here that is a failure.
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: intra-op threads only add synchronisation. The dimension-by-dimension inverses (thousands
    of small ops) ran 100x slower with 2 threads than with 1 on a loaded 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# T-NAF variants the generic checks run over: name -> TNAFConfig fields.
TNAF_VARIANTS = {
    "dsf": {"transform": "dsf", "dsf_hidden": 4},
    "dsf_2stages": {"transform": "dsf", "dsf_hidden": 3, "dsf_stages": 2},
    "spline": {"transform": "spline", "num_bins": 4, "spline_bound": 3.0},
    "mixture": {"transform": "mixture", "num_components": 3},
    "affine": {"transform": "affine"},
}


def available_tnaf_variants() -> list[str]:
    """Every T-NAF variant (each is required: a missing transform fails the import, never skips)."""
    return list(TNAF_VARIANTS)


def make_tnaf(variant: str = "dsf", num_flow_layers: int = 2, seed: int = 0) -> TNAF:
    """A tiny float64 T-NAF with random (non-zero) heads, so no dimension's transform is x-independent."""
    torch.manual_seed(seed)
    config = TNAFConfig(
        num_dims=D,
        channels=16,
        head_dim=8,
        layers_per_flow=1,
        num_flow_layers=num_flow_layers,
        **TNAF_VARIANTS[variant],
    )
    model = TNAF(config).double()
    with torch.no_grad():
        for flow in model.flows:
            flow.proj_out.weight.normal_(0, 0.2)
            flow.proj_out.bias.add_(torch.randn_like(flow.proj_out.bias) * 0.2)
    return model.eval()


def make_maf(seed: int = 0) -> MAF:
    torch.manual_seed(seed)
    model = MAF(MAFConfig(num_dims=D, hidden_width=8, num_hidden_layers=2, num_flow_layers=3)).double()
    with torch.no_grad():
        for flow in model.flows:
            flow.made.out.weight.normal_(0, 0.3)
            flow.made.out.bias.normal_(0, 0.3)
    return model.eval()


MODELS = [pytest.param("tnaf", v, id=f"tnaf-{v}") for v in available_tnaf_variants()] + [
    pytest.param("maf", None, id="maf")
]


def make(kind: str, variant: str | None):
    return make_tnaf(variant) if kind == "tnaf" else make_maf()


def randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale


# ----------------------------------------------------------------------------------------------------------
# Whole models: T-NAF with every transform, and MAF


@pytest.mark.parametrize("kind,variant", MODELS)
def test_log_det_equals_autograd_jacobian(kind, variant):
    model = make(kind, variant)
    for seed in range(2):
        x = randn(1, D, seed=seed, scale=1.5)
        _, log_det = model(x)
        jac = torch.autograd.functional.jacobian(lambda v: model(v.view(1, D))[0].flatten(), x.flatten())
        sign, brute = torch.linalg.slogdet(jac)
        assert sign > 0, "an autoregressive flow with increasing transforms preserves orientation"
        assert abs(log_det.item() - brute.item()) < 1e-8


@pytest.mark.parametrize("kind,variant", MODELS)
def test_inverse_of_forward_is_identity(kind, variant):
    model = make(kind, variant)
    x = randn(6, D, seed=3, scale=1.5)
    z, _ = model(x)
    assert (z - x).abs().max() > 1e-2, "random heads should move x"
    x_back = model.inverse(z)
    # DSF (1e-10 bisection) and mixture solve to a stated tolerance; errors in early dimensions move the
    # parameters of later ones, so allow a conditioning factor of 100 on top.
    assert ((x_back - x).abs() <= 1e-8 * (1 + x.abs())).all()
    torch.testing.assert_close(model(x_back)[0], z, atol=1e-8, rtol=0)


@pytest.mark.parametrize("kind,variant", MODELS)
def test_each_layer_is_autoregressive_in_its_own_order(kind, variant):
    model = make(kind, variant)
    for flow in model.flows:
        x = randn(1, D, seed=4)

        def in_layer_order(flat, flow=flow):
            return flow.permute(flow(flow.permute(flat.view(1, D)))[0]).flatten()

        J = torch.autograd.functional.jacobian(in_layer_order, flow.permute(x).flatten())  # (D, D)
        assert torch.equal(J.triu(1), torch.zeros_like(J)), "dz_i/dx_j must vanish for j > i"
        assert (J.diagonal() > 0).all()
        # Earlier dimensions really do condition later ones (else the check above would be vacuous).
        assert J[D - 1, : D - 1].abs().max() > 1e-6


def naive_tnaf_inverse(model: TNAF, z: torch.Tensor) -> torch.Tensor:
    """Reference: a full causal pass (no KV cache) for every dimension of every layer."""
    for flow in reversed(model.flows):
        zl = flow.permute(z)
        x = torch.zeros_like(zl)
        for i in range(D):
            params = flow.transform_params(x)[:, i]  # row i reads x[:, :i] only, all already final
            x[:, i] = flow.transform.inverse(zl[:, i], params)
        z = flow.permute(x)
    return z


@pytest.mark.parametrize("variant", available_tnaf_variants())
def test_cached_inverse_equals_naive_inverse(variant):
    model = make_tnaf(variant)
    z = randn(4, D, seed=5)
    with torch.no_grad():
        naive = naive_tnaf_inverse(model, z)
    torch.testing.assert_close(model.inverse(z), naive, atol=1e-9, rtol=0)


def test_sample_draws_from_prior_and_respects_generator():
    for model in (make_tnaf("dsf"), make_maf()):
        a = model.sample(3, generator=torch.Generator().manual_seed(7))
        b = model.sample(3, generator=torch.Generator().manual_seed(7))
        assert a.shape == (3, D) and torch.equal(a, b)
        eps = torch.randn(3, D, generator=torch.Generator().manual_seed(7), dtype=F64)
        torch.testing.assert_close(model(a)[0], eps, atol=1e-8, rtol=0)


@pytest.mark.parametrize("variant", ["spline", "affine"])
def test_fresh_tnaf_with_tie_free_transform_is_identity(variant):
    model = TNAF(TNAFConfig(num_dims=D, channels=16, head_dim=8, **TNAF_VARIANTS[variant])).double()
    x = randn(3, D, seed=6)
    z, log_det = model(x)
    assert torch.equal(z, x) and torch.equal(log_det, torch.zeros(3, dtype=F64))
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(x).sum(1)
    torch.testing.assert_close(model.log_prob(x), expected)


def test_fresh_dsf_tnaf_units_are_not_tied():
    # With a zero head the H units of every DSF would coincide and get identical gradients for ever; the
    # head bias spreads their shifts, so the first gradient already tells them apart.
    model = TNAF(TNAFConfig(num_dims=D, channels=16, head_dim=8, dsf_hidden=4)).double()
    H = model.transform.hidden
    (-model.log_prob(randn(16, D, seed=7)).mean()).backward()
    grad = model.flows[0].proj_out.bias.grad
    shift_grads, weight_grads = grad[H : 2 * H], grad[2 * H : 3 * H]
    assert (shift_grads - shift_grads[0]).abs().max() > 1e-6
    assert weight_grads.abs().max() > 1e-6
    assert model.flows[0].proj_out.weight.grad.abs().max() > 0


def test_bad_input_shape_is_named():
    with pytest.raises(ValueError, match=r"expected vectors of shape \(B, 5\)"):
        make_tnaf()(torch.randn(2, 4, dtype=F64))
    with pytest.raises(ValueError, match=r"expected vectors of shape \(B, 5\)"):
        make_maf()(torch.randn(2, D, 1, dtype=F64))


def test_maf_masks_see_only_earlier_dimensions():
    made = make_maf().flows[0].made
    J = torch.autograd.functional.jacobian(lambda v: made(v.view(1, D)).flatten(), randn(D, seed=8))
    J = J.view(D, 2, D).permute(1, 0, 2)  # (alpha/mu, output dimension i, input dimension j)
    assert torch.equal(J.triu(), torch.zeros_like(J)), "output i must read x_<i only"
    assert J[:, D - 1, : D - 1].abs().min() > 0, "the last output reads every earlier dimension"


# ----------------------------------------------------------------------------------------------------------
# The deep sigmoidal transform alone

DSF_TRANSFORMS = {
    "h4": DeepSigmoidalTransform(hidden=4),
    "h3_s2": DeepSigmoidalTransform(hidden=3, num_stages=2),
    "h1": DeepSigmoidalTransform(hidden=1),
}
dsf_parametrize = pytest.mark.parametrize("name", list(DSF_TRANSFORMS))


def dsf_inputs(t: DeepSigmoidalTransform, seed: int, n: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, 6) with a Gaussian bulk and far tails, random params (N, 6, P)."""
    params = randn(n, 6, t.num_params, seed=seed, scale=1.5)
    x = randn(n, 6, seed=seed + 1, scale=3.0)
    x[:8] = torch.tensor([-1e3, -50.0, -20.0, -1e-300, 0.0, 20.0, 50.0, 1e3], dtype=F64)[:, None]
    return x, params


@dsf_parametrize
def test_dsf_zero_params_are_the_identity_bitwise(name):
    t = DSF_TRANSFORMS[name]
    x = torch.cat([dsf_inputs(t, seed=0)[0], torch.linspace(-30, 30, 601, dtype=F64)[:, None].expand(-1, 6)])
    params = torch.zeros(*x.shape, t.num_params, dtype=F64)
    z, log_deriv = t.forward(x, params)
    assert torch.equal(z, x) and torch.equal(t.inverse(x, params), x)
    assert torch.equal(log_deriv, torch.zeros_like(x))


@dsf_parametrize
def test_dsf_strictly_increasing(name):
    t = DSF_TRANSFORMS[name]
    params = randn(6, t.num_params, seed=1, scale=1.5).expand(4001, 6, t.num_params)
    z, log_deriv = t.forward(torch.linspace(-12, 12, 4001, dtype=F64)[:, None].expand(-1, 6), params)
    assert (z.diff(dim=0) > 0).all() and log_deriv.isfinite().all()


@dsf_parametrize
def test_dsf_log_derivative_matches_autograd(name):
    t = DSF_TRANSFORMS[name]
    x, params = dsf_inputs(t, seed=2)
    x.requires_grad_(True)
    z, log_deriv = t.forward(x, params)
    (dz_dx,) = torch.autograd.grad(z.sum(), x)  # elementwise map: d(sum z)/dx_i = dz_i/dx_i
    torch.testing.assert_close(dz_dx.log(), log_deriv.detach(), rtol=0, atol=1e-10)


@dsf_parametrize
def test_dsf_inverse_within_stated_tolerance(name):
    t = DSF_TRANSFORMS[name]
    x, params = dsf_inputs(t, seed=3)
    z, log_deriv = t.forward(x, params)
    x_back = t.inverse(z, params)
    # The stated bisection tolerance, plus the error no inverse can avoid: a few ulps of z over dz/dx.
    conditioning = 8 * EPS * (1 + z.abs()) * torch.exp(-log_deriv)
    assert ((x_back - x).abs() <= t.inverse_tol * (1 + x.abs()) + conditioning).all()
    if t.hidden == 1:  # each stage is then the affine map a u + b: the bracket is the exact root
        torch.testing.assert_close(x_back, x, atol=1e-12, rtol=1e-12)


def test_dsf_unconverged_inverse_warns():
    t = DeepSigmoidalTransform(hidden=4, max_iter=5)
    x, params = dsf_inputs(t, seed=4, n=20)
    with pytest.warns(RuntimeWarning, match="not within tol"):
        t.inverse(t.forward(x, params)[0], params)


@dsf_parametrize
def test_dsf_param_gradients_finite_and_alive_except_tied_weights(name):
    t = DSF_TRANSFORMS[name]
    x, params = dsf_inputs(t, seed=5)
    # At zero params every slot gets gradient except the weight logits of the (identical) units, whose
    # gradient vanishes by symmetry (up to rounding when stages are composed).
    size = param_gradient_sizes(t, x, params)  # (P,)
    tied = set(t.weight_logit_slots())  # hidden=1: softmax of one logit, dead everywhere
    for j in range(t.num_params):
        assert (size[j] <= 1e-12 * size.max()) if j in tied else (size[j] > 1e-6), f"slot {j}"


def test_dsf_bf16_inputs_compute_in_fp32():
    t = DSF_TRANSFORMS["h4"]
    x, params = (v.to(torch.bfloat16) for v in dsf_inputs(t, seed=6, n=32))
    z, log_deriv = t.forward(x, params)
    assert z.dtype == torch.bfloat16 and log_deriv.dtype == torch.float32
    z32, log_deriv32 = t.forward(x.float(), params.float())
    assert torch.equal(z, z32.to(torch.bfloat16)) and torch.equal(log_deriv, log_deriv32)
    assert t.inverse(z, params).dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------------------
# Data, config and the study


def test_digits_split_is_seeded_disjoint_and_dequantized():
    train_levels, val_levels = digits_levels_split(seed=0, val_fraction=0.2)
    assert train_levels.shape == (1438, 64) and val_levels.shape == (359, 64)
    again = digits_levels_split(seed=0, val_fraction=0.2)
    assert torch.equal(again[0], train_levels) and not torch.equal(digits_levels_split(1, 0.2)[1], val_levels)
    train, val = load_digits_split(seed=0, val_fraction=0.2)
    assert train.dtype == torch.float32 and train.shape == (1438, 64) and val.shape == (359, 64)
    assert train.min() >= -1 and train.max() <= 1
    # Each value lies in its level's bin of width 2/17: the level is recovered by flooring.
    recovered = torch.floor((val.double() + 1) * DIGITS_NUM_LEVELS / 2).clamp(max=DIGITS_NUM_LEVELS - 1)
    assert torch.equal(recovered, val_levels)
    assert torch.equal(load_digits_split(0, 0.2)[1], val), "the held-out noise is fixed by the seed"
    fresh = dequantize_digits(train_levels, torch.Generator().manual_seed(1))
    assert not torch.equal(fresh, train)


def test_study_config_loads_with_sizes_for_the_study(tmp_path):
    config = load_config(STUDY_CONFIG, ["tnaf.channels=16"], cls=TNAFRunConfig)
    assert config.tnaf.channels == 16 and config.tarflow.patch_size == 1 and config.tarflow.image_size == 8
    shipped = load_config(STUDY_CONFIG, cls=TNAFRunConfig)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    from tarflow_scale.models.tarflow import TarFlow

    tnaf, tarflow, maf = count(TNAF(shipped.tnaf)), count(TarFlow(shipped.tarflow)), count(MAF(shipped.maf))
    assert tarflow / tnaf >= 8, "the study's T-NAF should have about 10x fewer parameters than its TarFlow"
    assert abs(maf / tarflow - 1) < 0.1, "the MAF baseline should match the TarFlow's parameter count"
    with pytest.raises(ConfigError, match=r"tnaf\.num_dims=10 must equal"):
        load_config(STUDY_CONFIG, ["tnaf.num_dims=10"], cls=TNAFRunConfig)
    partial = tmp_path / "partial.yaml"
    partial.write_text("tarflow:\n  patch_size: 2\n")  # the other keys keep the run's 8x8 geometry
    assert load_config(partial, cls=TNAFRunConfig).tarflow.image_size == 8
    bad = tmp_path / "bad.yaml"
    bad.write_text("tarflow:\n  image_size: 16\n  patch_size: 1\n")
    with pytest.raises(ConfigError, match="tarflow.image_size=16"):
        load_config(bad, cls=TNAFRunConfig)


def test_study_runs_end_to_end(tmp_path, capsys):
    from conftest import load_tool

    main = load_tool("study_tnaf").main

    tiny = [
        f"run_dir={tmp_path}",
        "study.budget_s=0.3",
        "study.select_every_s=0.1",
        "study.batch_size=16",
        "tnaf.channels=16",
        "tnaf.layers_per_flow=1",
        "tarflow.channels=16",
        "tarflow.num_blocks=2",
        "maf.hidden_width=64",
        "maf.num_flow_layers=2",
    ]
    assert main(["--config", str(STUDY_CONFIG), *tiny]) == 0
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [r["model"] for r in results] == ["tnaf", "tarflow", "maf"]
    for r in results:
        assert r["steps"] >= 1 and math.isfinite(r["val_nats_per_dim"]) and r["val_se"] > 0
        assert 0 <= r["best_step"] <= r["steps"] and math.isfinite(r["select_nats_per_dim"])
    assert (tmp_path / "config.yaml").is_file()
    assert "held-out nats/dim" in capsys.readouterr().out
