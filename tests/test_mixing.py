"""Token mixers (CDFlow, permutation) against dense linear algebra, alone and inside a full TarFlow, in float64."""

from __future__ import annotations

import pytest
import torch
from test_flow import TRANSFORMS, assert_cached_sampler_equals_naive, available_transforms, full_jacobian, make_model

from tarflow_scale import NULL_LABEL, TarFlow, TarFlowConfig
from tarflow_scale.config import ConfigError, from_dict
from tarflow_scale.models.mixing import (
    CirculantDiagonalMixer,
    FeaturePermutation,
    build_mixer,
    circulant_log_abs_det,
    circulant_matrix,
)

MIXER_KINDS = ["permute", "cdflow"]


def randomise_(mixer, seed=0):
    """Random, well-conditioned CDFlow factors: |FFT(c_j)_k| = |1 + xi| with xi ~ 0.3 complex normal."""
    if isinstance(mixer, CirculantDiagonalMixer):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            n = mixer.dim
            mixer.log_diag.copy_(torch.randn(mixer.log_diag.shape, generator=g) * 0.3)
            mixer.circulant.copy_(torch.randn(mixer.circulant.shape, generator=g) * 0.3 / n**0.5)
    return mixer


def random_mixer(n, m, seed=0):
    return randomise_(CirculantDiagonalMixer(n, m).double(), seed)


# ----------------------------------------------------------------------------------------------------------
# The mixers alone


def test_circulant_matrix_layout():
    c = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    C = circulant_matrix(c)
    assert torch.equal(C[:, 0], c), "first column is c"
    assert torch.equal(C[0], torch.tensor([1.0, 4.0, 3.0, 2.0], dtype=torch.float64)), "C[i, k] = c[(i - k) mod n]"
    for n in (1, 2, 5, 8):  # the rfft-bin weighting, odd and even n
        c = torch.randn(n, dtype=torch.float64)
        expected = torch.linalg.slogdet(circulant_matrix(c))[1]
        torch.testing.assert_close(circulant_log_abs_det(torch.fft.rfft(c), n), expected)


@pytest.mark.parametrize("n", [1, 2, 7, 12, 48, 96])
@pytest.mark.parametrize("m", [1, 2, 3])
def test_cdflow_against_dense_matrix(n, m):
    mixer = random_mixer(n, m, seed=n * 10 + m)
    W = mixer.matrix()
    assert W.shape == (n, n) and W.dtype == torch.float64
    sign, log_abs_det = torch.linalg.slogdet(W)
    assert abs(mixer.log_abs_det().item() - log_abs_det.item()) < 1e-10
    if n > 1:
        assert (W - torch.eye(n, dtype=W.dtype)).abs().max() > 1e-2, "random factors should mix"

    x = torch.randn(3, 5, n, dtype=torch.float64)  # (B, T, n)
    y, log_det = mixer(x)
    torch.testing.assert_close(y, x @ W.T, atol=1e-12, rtol=0)
    assert log_det.shape == (3,)
    torch.testing.assert_close(log_det, torch.full((3,), 5 * log_abs_det.item(), dtype=torch.float64))
    assert (mixer.inverse(y) - x).abs().max() < 1e-10
    torch.testing.assert_close(mixer.inverse(x), torch.linalg.solve(W, x.unsqueeze(-1)).squeeze(-1))

    # Gradients reach every factor through the log-determinant and the output.
    (y.sum() + log_det.sum()).backward()
    assert mixer.log_diag.grad.abs().min() > 0 or n == 1
    assert mixer.circulant.grad.abs().max() > 0


def test_cdflow_starts_as_identity_and_counts_parameters():
    mixer = CirculantDiagonalMixer(12, 3)
    assert sum(p.numel() for p in mixer.parameters()) == (2 * 3 + 1) * 12
    x = torch.randn(2, 4, 12)
    y, log_det = mixer(x)
    torch.testing.assert_close(y, x, atol=1e-6, rtol=0)
    assert log_det.abs().max() < 1e-6
    assert torch.equal(mixer.matrix(), torch.eye(12))


def test_cdflow_bf16_input_is_computed_in_fp32():
    mixer = randomise_(CirculantDiagonalMixer(48, 2))
    x = torch.randn(2, 3, 48)
    y32, ld32 = mixer(x)
    y16, ld16 = mixer.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16 and ld16.dtype == torch.float32
    assert (y16.float() - y32).abs().max() < 0.1
    assert (ld16 - ld32).abs().max() < 0.5  # bf16 parameters: ~3 significant digits per factor


def test_permutation_mixer():
    mixer = FeaturePermutation(12, seed=3)
    P = mixer.matrix().double()
    assert torch.equal(P @ P.T, torch.eye(12, dtype=torch.float64))
    assert not torch.equal(P, torch.eye(12, dtype=torch.float64))
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    y, log_det = mixer(x)
    assert torch.equal(y, x @ P.T) and torch.equal(mixer.inverse(y), x)
    assert torch.equal(log_det, torch.zeros(2, dtype=torch.float64))
    assert torch.equal(FeaturePermutation(12, seed=3).perm, mixer.perm), "the permutation is a function of the seed"
    assert "perm" in mixer.state_dict(), "checkpoints carry the permutation"


def test_build_mixer():
    assert build_mixer("none", 12) is None
    assert isinstance(build_mixer("permute", 12, seed=1), FeaturePermutation)
    assert build_mixer("cdflow", 12, num_factors=3).num_factors == 3
    with pytest.raises(ValueError, match="model.mixer='dense'"):
        build_mixer("dense", 12)


# ----------------------------------------------------------------------------------------------------------
# Mixers inside a TarFlow: the generic checks of tests/test_flow.py with mixers between the blocks


def make_mixed_model(mixer, transform="affine", num_classes=0, patch_size=2, seed=0):
    model = make_model(transform, num_classes, patch_size, seed=seed, mixer=mixer, mixer_factors=2)
    assert len(model.mixers) == model.config.num_blocks - 1
    for k, m in enumerate(model.mixers):
        randomise_(m, seed=seed * 100 + k)
    return model


MODEL_VARIANTS = [
    pytest.param(mixer, t, k, p, id=f"{mixer}-{t}-classes{k}-patch{p}")
    for mixer in MIXER_KINDS
    for t in available_transforms()
    for k, p in ((0, 1), (3, 2))
]


@pytest.mark.parametrize("mixer,transform,num_classes,patch_size", MODEL_VARIANTS)
def test_model_with_mixers_log_det_equals_autograd_jacobian(mixer, transform, num_classes, patch_size):
    model = make_mixed_model(mixer, transform, num_classes, patch_size)
    for seed in range(2):
        x = torch.randn(1, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        y = None if not num_classes else torch.tensor([seed])
        _, log_det = model(x, y)
        sign, brute = torch.linalg.slogdet(full_jacobian(model, x, y))
        # The blocks preserve orientation; a permutation may flip it, once per token.
        mixer_signs = [torch.linalg.slogdet(m.matrix().double())[0] ** model.config.num_tokens for m in model.mixers]
        assert sign == torch.stack(mixer_signs).prod()
        assert abs(log_det.item() - brute.item()) < 1e-8


@pytest.mark.parametrize("mixer,transform,num_classes,patch_size", MODEL_VARIANTS)
def test_model_with_mixers_inverse_of_forward_is_identity(mixer, transform, num_classes, patch_size):
    model = make_mixed_model(mixer, transform, num_classes, patch_size)
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64) * 1.5
    y = None if not num_classes else torch.tensor([NULL_LABEL, 0, 1, 2, 1])
    z, _ = model(x, y)
    torch.testing.assert_close(model.inverse(z, y), x, atol=TRANSFORMS[transform][1] * 100, rtol=0)


def test_mixers_change_the_model():
    """The mixers really act: same blocks, different mixers, different z and log-det."""
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    plain = make_model("affine")
    mixed = make_mixed_model("cdflow")
    mixed.load_state_dict(plain.state_dict(), strict=False)
    (z0, ld0), (z1, ld1) = plain(x), mixed(x)
    assert (z0 - z1).abs().max() > 1e-2 and (ld0 - ld1).abs().max() > 1e-2


@pytest.mark.parametrize("mixer", MIXER_KINDS)
@pytest.mark.parametrize("transform", available_transforms())
@pytest.mark.parametrize(
    "num_classes,guidance,annealed,attn_temp", [(0, 0.0, False, 1.0), (3, 2.0, True, 1.3), (0, 1.0, False, 1.5)]
)
def test_model_with_mixers_cached_sampler_equals_naive_sampler(
    mixer, transform, num_classes, guidance, annealed, attn_temp
):
    model = make_mixed_model(mixer, transform, num_classes)
    assert_cached_sampler_equals_naive(model, num_classes, guidance, annealed, attn_temp)


# ----------------------------------------------------------------------------------------------------------
# Config and checkpoints


def test_mixer_none_keeps_state_dict_keys():
    small = {"image_size": 4, "patch_size": 2, "channels": 16, "head_dim": 8}
    assert from_dict(TarFlowConfig, small).mixer == "cdflow"  # the default; the paper's architecture says none
    plain = from_dict(TarFlowConfig, {**small, "mixer": "none"})
    assert plain.mixer == "none"
    model = TarFlow(plain)
    keys = set(model.state_dict())
    assert not any(key.startswith("mixers") for key in keys)
    expected = {f"blocks.{n}" for n in model.blocks.state_dict()} | {f"prior.{n}" for n in model.prior.state_dict()}
    assert keys == expected, "mixer=none must add no state-dict entries"
    TarFlow(plain).load_state_dict(model.state_dict(), strict=True)

    num_blocks = plain.num_blocks
    for kind, per_mixer in (("permute", {"perm"}), ("cdflow", {"log_diag", "circulant"})):
        mixed = TarFlow(from_dict(TarFlowConfig, {**small, "mixer": kind}))
        extra = set(mixed.state_dict()) - keys
        assert extra == {f"mixers.{k}.{name}" for k in range(num_blocks - 1) for name in per_mixer}
        TarFlow(mixed.config).load_state_dict(mixed.state_dict(), strict=True)


def test_mixer_config_is_validated():
    with pytest.raises(ConfigError, match="model.mixer"):
        from_dict(TarFlowConfig, {"mixer": "dense"}, prefix="model.")
    with pytest.raises(ConfigError, match="model.mixer_factors must be >= 1"):
        TarFlowConfig(mixer="cdflow", mixer_factors=0).validate()
    one_block = TarFlow(
        TarFlowConfig(image_size=4, patch_size=2, channels=16, head_dim=8, num_blocks=1, mixer="cdflow")
    )
    assert len(one_block.mixers) == 0, "mixers sit between blocks"
