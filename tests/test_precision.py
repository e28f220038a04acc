"""The precision policy (docs/gpu.md): under bf16 only the Transformer trunk runs in bf16; the input, the flow
state between blocks, the transforms, log-determinants and prior stay fp32. Runs on CPU (torch autocasts to bf16
on CPU); the resolved policy per cluster setting; the DeepSpeed config keeps parameters fp32."""

from __future__ import annotations

import pytest
import torch

from tarflow_scale.cli.train import main as train_main
from tarflow_scale.config import TarFlowConfig, load_config
from tarflow_scale.data import augment
from tarflow_scale.models.tarflow import TarFlow, patchify
from tarflow_scale.training.deepspeed_config import build_deepspeed_config, precision_warning, resolve_precision

# |bits/dim under the bf16 policy - bits/dim in fp32| per image, same weights (bits/dim ~2 here): bf16 matmuls
# carry ~3 significant digits into the transform parameters; the flow maths itself is fp32. Measured on this
# model: max 2.0e-3, mean 5e-4 bits/dim.
BPD_TOLERANCE = 5e-3  # max over images
BPD_MEAN_TOLERANCE = 1e-3


def small_model(seed: int = 0) -> TarFlow:
    """8x8 images, patch 2 (16 tokens of 12), 2 blocks, with random (non-identity) output heads."""
    torch.manual_seed(seed)
    config = TarFlowConfig(image_size=8, patch_size=2, channels=64, head_dim=16, num_blocks=2, layers_per_block=2)
    model = TarFlow(config)
    with torch.no_grad():
        for block in model.blocks:
            block.proj_out.weight.normal_(0, 0.05)
            block.proj_out.bias.normal_(0, 0.05)
    return model.eval()


def test_bf16_policy_keeps_every_dequantized_value_through_the_first_block():
    model = small_model().set_trunk_dtype(torch.bfloat16)
    batch = 256
    # Every pixel at level 200 (in 192..255, where a bf16 has only 3 values per 8-bit bin), dequantized uniformly.
    pixels = torch.full((batch, 3, 8, 8), 200, dtype=torch.uint8)
    x = augment(pixels, "uniform", 0.0, torch.Generator().manual_seed(0))
    assert x.dtype == torch.float32
    column = patchify(x, 2)[:, -1, 0]  # one coordinate of the last token (block 0 keeps the raster order)
    assert column.unique().numel() == batch, "the seeded draws are distinct in fp32"
    assert column.bfloat16().unique().numel() <= 3, "what a bf16 input would have kept (the defect)"
    with torch.no_grad():
        z, log_det = model.blocks[0](patchify(x, 2))
    assert z.dtype == torch.float32 and log_det.dtype == torch.float32
    # Every image's value survives: z of that coordinate is still distinct for all 256 draws.
    assert z[:, -1, 0].unique().numel() == batch
    # And the first block did real work (not the identity), so the test exercises the transform.
    assert (z[:, -1] - patchify(x, 2)[:, -1]).abs().max() > 1e-3


def test_bf16_policy_runs_the_trunk_in_bf16_and_the_flow_in_fp32():
    model = small_model().set_trunk_dtype(torch.bfloat16)
    seen: dict[str, torch.dtype] = {}

    def record(name: str, output) -> None:  # a forward hook must return None (else it replaces the output)
        seen.setdefault(name, output.dtype)

    model.blocks[0].layers[0].mlp[0].register_forward_hook(lambda m, i, o: record("mlp", o))
    model.blocks[0].register_forward_hook(lambda m, i, o: record("block", o[0]))
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    z, log_det = model(x)
    assert seen == {"mlp": torch.bfloat16, "block": torch.float32}
    assert z.dtype == log_det.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # Without the policy nothing runs in bf16.
    seen.clear()
    model.set_trunk_dtype(None)(x)
    assert seen["mlp"] == torch.float32


def test_bf16_policy_log_prob_matches_fp32_within_tolerance():
    model = small_model(seed=1)
    pixels = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    x = augment(pixels, "uniform", 0.0, torch.Generator().manual_seed(2))
    with torch.no_grad():
        fp32 = model.set_trunk_dtype(None).bits_per_dim(x)
        bf16 = model.set_trunk_dtype(torch.bfloat16).bits_per_dim(x)
    gap = (bf16 - fp32).abs()
    assert 0 < gap.max().item() < BPD_TOLERANCE, gap.max()  # > 0: bf16 really ran
    assert gap.mean().item() < BPD_MEAN_TOLERANCE, gap.mean()


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], "fp32"),  # CPU
        (["cluster.use_gpu=true", "data.noise=gaussian"], "bf16"),  # Gaussian noise on GPU
        (["cluster.use_gpu=true", "data.noise=uniform"], "fp32"),  # density: bits/dim must stay a bound
        (["cluster.use_gpu=true", "data.noise=uniform", "deepspeed.precision=bf16"], "bf16"),  # forced: warns
        (["cluster.use_gpu=true", "deepspeed.precision=fp32"], "fp32"),
    ],
)
def test_auto_precision_resolves_by_noise_and_device(overrides, expected):
    config = load_config(None, overrides)
    assert resolve_precision(config) == expected
    warns = expected == "bf16" and config.data.noise == "uniform"
    assert (precision_warning(config) is not None) == warns
    ds = build_deepspeed_config(config)
    # DeepSpeed's bf16 section would make the parameters bf16: it stays off under every policy.
    assert ds["bf16"]["enabled"] is False


def test_dry_run_prints_the_resolved_precision(capsys):
    assert train_main(["--config", "imagenet64_density", "--dry-run", "cluster.num_workers=16"]) == 0
    out = capsys.readouterr().out
    assert "# precision: fp32 (auto, data.noise=uniform on GPU): fp32 with TF32 matmuls" in out
    assert "# batch: 256 = 16 workers x micro-batch 16 x 1 accumulation step(s)" in out
    assert train_main(["--config", "imagenet64_density", "--dry-run", "deepspeed.precision=bf16"]) == 0
    captured = capsys.readouterr()
    assert "# precision: bf16 (set)" in captured.out and "not a valid bound" in captured.err
    assert train_main(["--config", "imagenet64_cond", "--dry-run", "deepspeed.tf32=false", "data.noise=uniform"]) == 0
    assert "strict fp32" in capsys.readouterr().out


def test_deepspeed_comm_settings_come_from_the_config():
    gpu = build_deepspeed_config(load_config("imagenet64_cond"))["zero_optimization"]
    assert gpu["overlap_comm"] is True and gpu["contiguous_gradients"] is True
    assert gpu["reduce_bucket_size"] == gpu["allgather_bucket_size"] == 58_288_152  # derived: tests/test_memory.py
    cpu = build_deepspeed_config(load_config(None, ["deepspeed.reduce_bucket_size=1000"]))["zero_optimization"]
    assert cpu["overlap_comm"] is False and cpu["reduce_bucket_size"] == 1000
    z3 = build_deepspeed_config(load_config(None, ["deepspeed.zero_stage=3", "deepspeed.overlap_comm=true"]))
    assert z3["zero_optimization"]["overlap_comm"] is True and "allgather_bucket_size" not in z3["zero_optimization"]
