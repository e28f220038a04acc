"""Checks only a CUDA device can make: bf16 numerics and device/CPU agreement. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from tarflow_scale import TarFlow, TarFlowConfig
from tarflow_scale.config import Guidance

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none visible)"),
]


def small_model() -> TarFlow:
    torch.manual_seed(0)
    model = TarFlow(TarFlowConfig(image_size=16, patch_size=2, channels=64, num_blocks=4, num_classes=3))
    with torch.no_grad():
        for block in model.blocks:
            block.proj_out.weight.normal_(0, 0.01)
    return model


def test_bf16_autocast_log_prob_matches_fp32_on_gpu():
    model = small_model().cuda()
    x = torch.randn(8, 3, 16, 16, device="cuda")
    y = torch.arange(8, device="cuda") % 3
    reference = model.log_prob(x, y)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        low = model.log_prob(x, y)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    assert ((low - reference).abs() / reference.abs()).max() < 0.02


def test_gpu_sampling_matches_cpu():
    model = small_model()
    z = torch.randn(4, 3, 16, 16)
    y = torch.tensor([0, 1, 2, 0])
    cpu = model.inverse(z, y, Guidance(1.5))
    gpu = model.cuda().inverse(z.cuda(), y.cuda(), Guidance(1.5)).cpu()
    torch.testing.assert_close(gpu, cpu, atol=1e-3, rtol=1e-3)


def test_bf16_trunk_policy_on_gpu_keeps_fp32_flow_and_dequantized_values():
    """The trainer's bf16 policy on CUDA: trunk in bf16, flow state fp32, every dequantized value kept."""
    from tarflow_scale.data import augment
    from tarflow_scale.models.tarflow import patchify

    model = small_model().cuda().set_trunk_dtype(torch.bfloat16)
    x = torch.randn(8, 3, 16, 16, device="cuda")
    y = torch.arange(8, device="cuda") % 3
    with torch.no_grad():
        reference = model.set_trunk_dtype(None).log_prob(x, y)
        low = model.set_trunk_dtype(torch.bfloat16).log_prob(x, y)
    assert low.dtype == torch.float32
    assert ((low - reference).abs() / reference.abs()).max() < 0.02
    pixels = torch.full((256, 3, 16, 16), 200, dtype=torch.uint8)
    dequantized = augment(pixels, "uniform", 0.0, torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        z, _ = model.blocks[0](patchify(dequantized, 2), torch.zeros(256, dtype=torch.long, device="cuda"))
    assert z.dtype == torch.float32
    assert z[:, -1, 0].unique().numel() == patchify(dequantized, 2)[:, -1, 0].unique().numel()


def test_tf32_is_enabled_for_fp32_runs_on_gpu_unless_disabled():
    from tarflow_scale.config import load_config
    from tarflow_scale.training.trainer import configure_precision

    device = torch.device("cuda")
    density = load_config("imagenet64_density")
    assert configure_precision(small_model(), density, device) == "fp32"
    assert torch.backends.cuda.matmul.allow_tf32
    strict = load_config("imagenet64_density", ["deepspeed.tf32=false"])
    configure_precision(small_model(), strict, device)
    assert not torch.backends.cuda.matmul.allow_tf32


def test_bucketed_cuda_graphs_replay_the_eager_samples(monkeypatch):
    """One CUDA graph per cache-read bucket and block (captured once each: the Python step runs only while warming
    up and capturing), replayed at its bucket's positions, samples what the eager sampler and the uncaptured static
    step sample (models/decoding/static.py)."""
    import torch.nn.functional as F

    from tarflow_scale.config import Decoding
    from tarflow_scale.models import tarflow, transformer
    from tarflow_scale.models.decoding.static import read_buckets, static_sequential

    model = small_model().cuda()
    T = model.config.num_tokens
    z = torch.randn(4, 3, 16, 16, device="cuda")
    y = torch.tensor([0, 1, 2, 0], device="cuda")
    guided = Guidance(1.5, annealed=True)
    eager = model.inverse(z, y, guided)
    lengths: list[int] = []
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, *args, **kwargs):
        lengths.append(k.shape[2])  # the cache slots this pass reads
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(transformer.F, "scaled_dot_product_attention", recording_sdpa)
    graphed = model.inverse(z, y, guided, Decoding(cuda_graph=True))
    calls_per_block = 2 * len(read_buckets(T)) * model.config.layers_per_block  # a warm-up and a capture each
    assert len(lengths) == calls_per_block * model.config.num_blocks, "replays run no Python"
    assert sorted(set(lengths)) == list(read_buckets(T))
    torch.testing.assert_close(graphed, eager, atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(tarflow, "block_decoder", lambda decoding, index: static_sequential)
    static = model.inverse(z, y, guided)
    torch.testing.assert_close(graphed, static, atol=1e-6, rtol=1e-6)  # the same kernels, launched one by one


def test_frozen_score_and_bf16_trunk_lower_the_tweedie_peak_on_gpu():
    """The Tweedie step's peak GPU memory: freezing the parameters drops each Linear's input from what autograd keeps
    (by the per-layer count of config/memory.py, 2TC + TH of 8TC + 2TH values: ~37%), the bf16 trunk halves the
    matmul inputs; the bf16 step stays within bf16 rounding of fp32 (tests/test_eval_precision.py)."""
    from tarflow_scale.sampling import tweedie_denoise

    model = small_model().cuda()
    x = torch.randn(16, 3, 16, 16, device="cuda") * 0.5
    y = torch.arange(16, device="cuda") % 3

    def peak(fn) -> int:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start

    def unfrozen() -> torch.Tensor:
        with torch.enable_grad():
            xx = x.detach().requires_grad_(True)
            return torch.autograd.grad(model.log_prob(xx, y).sum(), xx)[0]

    unfrozen_peak = peak(unfrozen)
    fp32_peak = peak(lambda: tweedie_denoise(model, x, 0.05, y, precision="fp32"))
    bf16_peak = peak(lambda: tweedie_denoise(model, x, 0.05, y, precision="bf16"))
    assert fp32_peak < 0.85 * unfrozen_peak, (fp32_peak, unfrozen_peak)
    assert bf16_peak < fp32_peak, (bf16_peak, fp32_peak)
    fp32 = tweedie_denoise(model, x, 0.05, y, precision="fp32")
    bf16 = tweedie_denoise(model, x, 0.05, y, precision="bf16")
    assert (bf16 - fp32).abs().max() <= 0.02 * (fp32 - x).abs().max() + 1e-6
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
