"""TarFlow invariants, checked against brute force (autograd Jacobians, naive samplers) in float64."""

from __future__ import annotations

import math

import pytest
import torch

from tarflow_scale import NULL_LABEL, TarFlow, TarFlowConfig, patchify, unpatchify
from tarflow_scale.config import Guidance
from tarflow_scale.models.transforms import AffineTransform

# Every model variant the generic checks run over: (transform, extra config, inverse tolerance).
TRANSFORMS = {
    "affine": ({}, 1e-10),
    "affine_vp": ({"prior": "learned"}, 1e-10),
    "shift": ({"prior": "learned"}, 1e-10),
    "spline": ({"num_bins": 4, "spline_bound": 3.0}, 1e-9),
    "mixture": ({"num_components": 3}, 1e-7),
}


def available_transforms() -> list[str]:
    """Every token transform of the package (each is required: a missing one fails the import, never skips)."""
    return list(TRANSFORMS)


def make_model(transform="affine", num_classes=0, patch_size=2, image_size=4, in_channels=2, seed=0, **kw):
    """A tiny float64 model with random (non-zero) output projections, so no block is the identity. No mixers
    unless `mixer=` is given (tests/test_mixing.py runs these checks with them)."""
    torch.manual_seed(seed)
    extra = {"mixer": "none", **TRANSFORMS[transform][0]}
    extra.update(kw)
    config = TarFlowConfig(
        image_size=image_size,
        in_channels=in_channels,
        patch_size=patch_size,
        channels=16,
        head_dim=8,
        num_blocks=3,
        layers_per_block=1,
        num_classes=num_classes,
        transform=transform,
        **extra,
    )
    model = TarFlow(config).double()
    # Splines and mixtures compose into a numerically singular flow (cond(J) ~ 1e10+) at larger head weights.
    std = 0.3 if transform.startswith("affine") else 0.1
    with torch.no_grad():
        for block in model.blocks:
            block.proj_out.weight.normal_(0, std)
            block.proj_out.bias.normal_(0, std)
        if config.prior == "learned":
            model.prior.log_std.normal_(0, 0.3)
    return model.eval()


def random_labels(model, batch, generator=None):
    if not model.config.num_classes:
        return None
    y = torch.randint(0, model.config.num_classes, (batch,), generator=generator)
    y[0] = NULL_LABEL  # one dropped label in every batch
    return y


VARIANTS = [
    pytest.param(t, k, p, id=f"{t}-classes{k}-patch{p}") for t in available_transforms() for k in (0, 3) for p in (1, 2)
]


def test_patchify_round_trip_and_layout():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float64).reshape(2, 3, 4, 4)
    tokens = patchify(x, 2)
    assert tokens.shape == (2, 4, 12)
    # Token 1 is the top-right 2x2 patch: channel-major, then rows, then columns within the patch.
    expected = torch.stack([x[:, c, i, 2 + j] for c in range(3) for i in range(2) for j in range(2)], dim=1)
    torch.testing.assert_close(tokens[:, 1], expected)
    assert torch.equal(unpatchify(tokens, 2, 3, 4), x)


@pytest.mark.parametrize("transform,num_classes,patch_size", VARIANTS)
def test_inverse_of_forward_is_identity(transform, num_classes, patch_size):
    model = make_model(transform, num_classes, patch_size)
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64) * 1.5
    y = random_labels(model, 5)
    z, _ = model(x, y)
    assert (z - x).abs().max() > 1e-2, "random output projections should move x"
    torch.testing.assert_close(model.inverse(z, y), x, atol=TRANSFORMS[transform][1] * 100, rtol=0)


def full_jacobian(model, x, y):
    def f(flat):
        return model(flat.view(1, *x.shape[1:]), y)[0].flatten()

    return torch.autograd.functional.jacobian(f, x.flatten())


@pytest.mark.parametrize("transform,num_classes,patch_size", VARIANTS)
def test_log_det_equals_autograd_jacobian(transform, num_classes, patch_size):
    model = make_model(transform, num_classes, patch_size)
    for seed in range(2):
        x = torch.randn(1, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        y = None if not num_classes else torch.tensor([seed])
        _, log_det = model(x, y)
        sign, brute = torch.linalg.slogdet(full_jacobian(model, x, y))
        assert sign > 0, "a TarFlow is orientation preserving"
        assert abs(log_det.item() - brute.item()) < 1e-8


@pytest.mark.parametrize("transform", available_transforms())
def test_each_block_is_autoregressive_in_its_own_order(transform):
    model = make_model(transform, num_classes=3)
    T, D = model.config.num_tokens, model.config.token_dim
    y = torch.tensor([1])
    for block in model.blocks:
        x = torch.randn(1, T, D, dtype=torch.float64)

        def in_block_order(flat, block=block):
            x_tokens = block.permute(flat.view(1, T, D))
            return block.permute(block(x_tokens, y)[0]).flatten()

        J = torch.autograd.functional.jacobian(in_block_order, block.permute(x).flatten()).view(T, D, T, D)
        for out_t in range(T):
            for in_t in range(out_t + 1, T):
                assert J[out_t, :, in_t].abs().max() == 0, f"token {out_t} depends on later token {in_t}"
        assert torch.equal(J[0, :, 0], torch.eye(D, dtype=J.dtype)), "token 0 must be the identity"
        # Earlier tokens really do condition later ones (else the test above would be vacuous).
        assert J[T - 1, :, : T - 1].abs().max() > 1e-6


def naive_inverse(model, z, y=None, guidance=0.0, annealed=False, attn_temp=1.0):
    """Reference sampler: a full causal pass (no cache) for every token, guidance written out longhand, and a
    dense solve for each mixer between blocks."""
    c = model.config
    tokens = patchify(z, c.patch_size)
    B = z.shape[0]
    null = None if not c.num_classes else torch.full((B,), NULL_LABEL)
    for k in reversed(range(c.num_blocks)):
        if k < len(model.mixers):
            W = model.mixers[k].matrix().to(tokens.dtype)
            tokens = torch.linalg.solve(W, tokens.transpose(1, 2)).transpose(1, 2)  # x_t = W^{-1} y_t
        block = model.blocks[k]
        zb = block.permute(tokens)
        x = zb.clone()
        T = x.shape[1]
        for t in range(T - 1):
            cond = block.transform_params(x, y)[:, t + 1]
            if guidance:
                temps = torch.full((B,), attn_temp, dtype=z.dtype)
                uncond = block.transform_params(x, null, temps)[:, t + 1]
                w = guidance * (t + 1) / (T - 1) if annealed else guidance
                cond = cond + w * (cond - uncond)
            x[:, t + 1] = block.transform.inverse(zb[:, t + 1], cond)
        tokens = block.permute(x)
    return unpatchify(tokens, c.patch_size, c.in_channels, c.image_size)


def assert_cached_sampler_equals_naive(model, num_classes, guidance, annealed, attn_temp):
    """model.inverse (KV cache, guidance as one batch of 2B) equals naive_inverse on the same float64 noise."""
    z = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    y = None if not num_classes else torch.tensor([0, 2, 1])
    with torch.no_grad():
        naive = naive_inverse(model, z, y, guidance, annealed, attn_temp)
    cached = model.inverse(z, y, Guidance(guidance, annealed, attn_temp))
    torch.testing.assert_close(cached, naive, atol=1e-9, rtol=0)


@pytest.mark.parametrize("transform", available_transforms())
@pytest.mark.parametrize(
    "num_classes,guidance,annealed,attn_temp",
    [
        (0, 0.0, False, 1.0),
        (3, 0.0, False, 1.0),
        (3, 1.5, False, 1.0),
        (3, 2.0, True, 1.3),
        (0, 1.0, False, 1.5),
    ],
)
def test_cached_sampler_equals_naive_sampler(transform, num_classes, guidance, annealed, attn_temp):
    assert_cached_sampler_equals_naive(make_model(transform, num_classes), num_classes, guidance, annealed, attn_temp)


def test_guidance_weight_zero_is_plain_conditional_sampling():
    model = make_model("affine", num_classes=3)
    z = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])
    plain = model.inverse(z, y)
    assert torch.equal(model.inverse(z, y, Guidance(0.0, attn_temp=2.0)), plain)
    # A vanishing weight takes the batched cond+uncond path: its conditional half must be untouched.
    torch.testing.assert_close(model.inverse(z, y, Guidance(1e-12)), plain, atol=1e-9, rtol=0)
    assert (model.inverse(z, y, Guidance(1.0)) - plain).abs().max() > 1e-3


def test_attention_temperature_guidance_of_unconditional_model():
    model = make_model("affine")
    z = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    plain = model.inverse(z)
    # At temperature 1 the guiding pass equals the conditional one, so guidance is a no-op.
    torch.testing.assert_close(model.inverse(z, guidance=Guidance(2.0, attn_temp=1.0)), plain, atol=1e-12, rtol=0)
    assert (model.inverse(z, guidance=Guidance(2.0, attn_temp=1.5)) - plain).abs().max() > 1e-4


def test_null_label_semantics():
    learned = make_model("affine", num_classes=3)
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    none = learned.log_prob(x, None)
    torch.testing.assert_close(learned.log_prob(x, torch.full((2,), NULL_LABEL)), none)
    assert (learned.log_prob(x, torch.tensor([0, 0])) - none).abs().max() > 1e-6

    mean = make_model("affine", num_classes=3, null_label="mean")
    block = mean.blocks[0]
    embedded = block.label_embedding(torch.tensor([NULL_LABEL]), 1, x)
    torch.testing.assert_close(embedded[0, 0], block.class_embed.mean(0))
    assert block.class_embed.shape[0] == 3, "the mean null label needs no extra row"


def test_identity_model_bits_per_dim_is_analytic_for_standard_normal_data():
    model = TarFlow(TarFlowConfig(image_size=8, patch_size=2, channels=32, num_blocks=2)).double()
    x = torch.randn(64, 3, 8, 8, dtype=torch.float64)
    D = 3 * 8 * 8
    nll = 0.5 * x.pow(2).flatten(1).sum(1) + 0.5 * D * math.log(2 * math.pi)
    torch.testing.assert_close(model.bits_per_dim(x), nll / (D * math.log(2)))
    # In expectation: the entropy of N(0, 1) in bits, 0.5 log2(2 pi e) ~ 2.047.
    assert abs(model.bits_per_dim(x).mean().item() - 0.5 * math.log2(2 * math.pi * math.e)) < 0.05
    # Dequantized 8-bit convention: -log P(bin) = -log p - D log(2/256).
    discrete = model.bits_per_dim(x, log_bin_width=math.log(2 / 256))
    torch.testing.assert_close(discrete - model.bits_per_dim(x), torch.full((64,), 7.0, dtype=torch.float64))


def test_zero_initialised_model_is_identity_and_learned_prior_scales_density():
    # Blocks only: CDFlow mixers start as the identity only up to FFT round-off.
    config = TarFlowConfig(image_size=4, patch_size=2, channels=16, head_dim=8, prior="learned", mixer="none")
    model = TarFlow(config).double()
    x = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    z, log_det = model(x)
    assert torch.equal(z, x) and torch.equal(log_det, torch.zeros(3, dtype=torch.float64))
    with torch.no_grad():
        model.prior.log_std.fill_(math.log(2.0))
    expected = torch.distributions.Normal(0.0, 2.0).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(model.log_prob(x), expected)


def test_volume_preserving_transform_has_zero_log_det():
    model = make_model("affine_vp")
    x = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    _, log_det = model(x)
    assert log_det.abs().max() < 1e-12


def test_sample_draws_from_prior_and_respects_generator():
    model = make_model("affine", num_classes=3)
    y = torch.tensor([0, 1])
    a = model.sample(2, y=y, generator=torch.Generator().manual_seed(7))
    b = model.sample(2, y=y, generator=torch.Generator().manual_seed(7))
    assert a.shape == (2, 2, 4, 4) and torch.equal(a, b)
    eps = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(model(model.sample(eps, y=y), y)[0], eps)


def test_bf16_forward_is_finite_and_close_to_fp32():
    torch.manual_seed(0)
    config = TarFlowConfig(image_size=8, patch_size=2, channels=32, num_blocks=2)
    model = TarFlow(config)
    with torch.no_grad():
        for block in model.blocks:
            block.proj_out.weight.normal_(0, 0.02)
    x = torch.randn(4, 3, 8, 8)
    reference = model.log_prob(x)
    low = model.to(torch.bfloat16).log_prob(x.to(torch.bfloat16))
    assert low.dtype == torch.float32, "likelihood terms are accumulated in fp32"
    assert torch.isfinite(low).all()
    assert ((low - reference).abs() / reference.abs()).max() < 0.05


def test_bad_input_shapes_are_named():
    model = make_model("affine", num_classes=3)
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 2, 4, 4\)"):
        model(torch.randn(2, 3, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="labels must have shape"):
        model(torch.randn(2, 2, 4, 4, dtype=torch.float64), torch.tensor([1]))
    unconditional = make_model("affine")
    with pytest.raises(ValueError, match="unconditional model"):
        unconditional(torch.randn(1, 2, 4, 4, dtype=torch.float64), torch.tensor([0]))


def test_transform_is_pluggable():
    model = make_model("affine")
    assert all(isinstance(block.transform, AffineTransform) for block in model.blocks)
    assert model.blocks[0].proj_out.out_features == model.config.token_dim * AffineTransform.num_params


def test_mixture_head_init_breaks_component_symmetry():
    """Identical mixture components get identical gradients forever; the head init must separate them."""
    torch.manual_seed(0)
    config = TarFlowConfig(image_size=4, patch_size=2, channels=16, head_dim=8, num_blocks=1, transform="mixture")
    model = TarFlow(config).double()
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    (-model.log_prob(x).mean()).backward()
    K, P = config.num_components, model.transform.num_params
    grad_means = model.blocks[0].proj_out.bias.grad.view(-1, P)[:, K : 2 * K]  # (D, K)
    assert (grad_means[:, 1:] - grad_means[:, :1]).abs().max() > 1e-8
    z, _ = model(x)
    torch.testing.assert_close(patchify(z, 2)[:, 0], patchify(x, 2)[:, 0], atol=0, rtol=0)  # token 0 identity
