"""The benchmarks' own arithmetic: the FLOP count behind `tarflow-bench gpu`'s model FLOP utilisation."""

from __future__ import annotations

import pytest
import torch

from tarflow_scale.benchmarks.model import count_train_flops
from tarflow_scale.config import TarFlowConfig
from tarflow_scale.models.tarflow import TarFlow


def analytic_train_flops(c: TarFlowConfig, num_params: int) -> int:
    """Model matmul FLOPs (2 per multiply-add) of one image's forward + backward, written out from the architecture.

    Per block: proj_in (D -> C), per layer qkv (C -> 3C), the attention output projection (C -> C), the MLP
    (C -> H -> C), the causal attention (QK^T and AV, counted by FlashAttention's convention as half
    of the full T x T products: 2 x 2 T^2 C / 2), and the head (C -> D P). The
    backward costs twice the forward (gradients of the input and of the weights), except that the first block in
    forward order needs no input gradient for proj_in: its input is the data.
    """
    T, C, D, L = c.num_tokens, c.channels, c.token_dim, c.layers_per_block
    H = int(C * c.mlp_ratio)
    causal_attention = 2 * (2 * T * T * C) // 2
    trunk = L * (2 * T * (3 * C * C + C * C + 2 * C * H) + causal_attention) + 2 * T * C * D * num_params
    proj_in = 2 * T * D * C
    return c.num_blocks * 3 * (trunk + proj_in) - proj_in


@pytest.mark.parametrize(
    "overrides",
    [
        dict(image_size=16, patch_size=4, channels=32, num_blocks=2, layers_per_block=2, head_dim=16),
        dict(image_size=16, patch_size=2, channels=48, num_blocks=3, layers_per_block=1, head_dim=24, mlp_ratio=2.0),
        dict(image_size=8, patch_size=2, channels=32, num_blocks=2, layers_per_block=2, head_dim=16, num_classes=5),
    ],
    ids=["tiny", "patch2", "conditional"],
)
def test_counted_training_flops_equal_the_architecture_count(overrides):
    """Counted on any device (SDPA's math backend), scaled exactly by the batch: on CPU the fused attention kernel
    is invisible to torch's counter, which would understate MFU."""
    config = TarFlowConfig(**overrides)
    torch.manual_seed(0)
    model = TarFlow(config)
    batch = 3
    x = torch.randn(batch, config.in_channels, config.image_size, config.image_size)
    y = torch.arange(batch) % config.num_classes if config.num_classes else None
    expected = analytic_train_flops(config, model.blocks[0].transform.num_params)
    assert count_train_flops(model, x, y) == batch * expected
    assert all(p.grad is None for p in model.parameters())  # counting leaves no gradients behind


@pytest.mark.parametrize(
    "name, part, tflops",
    [
        ("NVIDIA H200 NVL", "H200 NVL", 835.0),
        ("NVIDIA H200", "H200 SXM", 989.4),
        ("NVIDIA H100 NVL", "H100 NVL", 835.0),
        ("NVIDIA H100 PCIe", "H100 PCIe", 756.0),
        ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.4),
    ],
)
def test_mfu_peak_is_the_datasheet_value_of_the_named_part(name, part, tflops):
    from tarflow_scale.benchmarks.gpu import datasheet_peak

    peak, source = datasheet_peak(name)
    assert peak == tflops * 1e12 and source.startswith(f"{part} bf16 dense") and name in source
    assert datasheet_peak("NVIDIA GeForce RTX 4090") is None


@pytest.mark.slow
def test_gpu_proof_runs_every_part_at_toy_size_without_ray(tmp_path):
    """`tools/gpu_proof.sh smoke` (every part of the one-lease GPU proof at toy sizes, on the CPU) under an
    interpreter that refuses to import Ray, as on the GPU image the proof is written for; DeepSpeed is CI's own
    (the GPU image gets it from .whl/). Every part writes its figures to OUT/gpu_proof.md and ends within its cap."""
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    refuse = tmp_path / "site" / "sitecustomize.py"
    refuse.parent.mkdir()
    refuse.write_text(
        "import sys\n"
        "class Refuse:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'ray':\n"
        "            raise ImportError(f'{name} is not on the GPU image')\n"
        "sys.meta_path.insert(0, Refuse())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(refuse.parent), "OUT": str(tmp_path / "out")}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "tarflow_scale" / "torch_extensions"))
    script = str(root / "tools" / "gpu_proof.sh")
    done = subprocess.run(["bash", script, "smoke"], capture_output=True, text=True, env=env, timeout=900)
    report = (tmp_path / "out" / "gpu_proof.md").read_text()
    assert done.returncode == 0, report[-3000:] + done.stderr[-3000:]
    for expected in (
        "## 1. Environment", "6 skipped", "## 2. Training: imagenet64_cond, one rank, ZeRO-2", "training images/s",
        "MFU", "causal attention counted as half", "checkpoint save", "| export == DeepSpeed's fp32 consolidation "
        "of the checkpoint | True", "## 2. Training: imagenet64_density", "peak memory measured", "## 3. Sampling",
        "| sequential |", "| jacobi (tol 1e-2, bf16's floor) |", "passes per block", "## 4. Evaluation",
        "bits/dim, strict fp32", "Tweedie denoise", "KV cache read per token", "Tweedie denoise, bf16 trunk",
    ):  # fmt: skip
        assert expected in report, expected
    assert report.count("done in") == 4 and "stopped at" not in report and "failed" not in report
    assert "imported" not in done.stdout + done.stderr
    bad = subprocess.run(["bash", script, "nonsense"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "unknown mode 'nonsense'" in bad.stderr


@pytest.mark.slow  # platform.processor() runs `uname -p`
def test_gpu_benchmark_reports_a_setting_that_runs_out_of_memory_and_goes_on(monkeypatch, capsys):
    """One run takes every row: a setting that does not fit is a row, not the end of it."""
    from tarflow_scale.benchmarks import gpu

    measure = gpu.bench_train

    def no_room_without_checkpointing(config, batch, steps, device, precision, checkpointing, count_flops=False):
        if not checkpointing:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return measure(config, batch, steps, device, precision, checkpointing, count_flops)

    monkeypatch.setattr(gpu, "bench_train", no_room_without_checkpointing)
    args = ["--config", "tiny", "--device", "cpu", "--micro-batch", "2", "--steps", "1", "--only", "train,memory,bpd",
            "--bpd-batch", "2", "model.num_blocks=2", "model.patch_size=8"]  # fmt: skip
    assert gpu.main(args) == 0
    out = capsys.readouterr().out
    assert "bf16 training, micro-batch 2" in out and "out of memory" in out
    assert "bf16 MFU" not in out  # nothing is reported for the setting that did not run
    assert "peak memory, bf16, micro-batch 2, activation checkpointing" in out and "bits/dim (fp32), batch 2" in out


def test_sample_benchmark_trains_on_the_device_it_measures(monkeypatch):
    """The in-process training runs after the model moved to --device (here "meta", standing in for a GPU): on the
    paper config, training first on the CPU would take tens of minutes."""
    from tarflow_scale.benchmarks import sample

    class Trained(Exception):
        pass

    def record_device(model, *args, **kwargs):
        raise Trained(next(model.parameters()).device)

    monkeypatch.setattr(sample, "train_briefly", record_device)
    monkeypatch.setattr("tarflow_scale.data.resolve_data_path", lambda cfg, **kwargs: cfg.path)
    with pytest.raises(Trained) as trained:
        sample.main(["--device", "meta", "--train-steps", "1", "model.num_blocks=1"])
    assert trained.value.args[0] == torch.device("meta")


@pytest.mark.slow  # starts Ray
def test_shard_sampling_benchmark_runs_at_toy_size_and_finds_identical_shards(capsys):
    from tarflow_scale.cli.bench import main

    overrides = ["model.image_size=8", "model.patch_size=2", "model.channels=32", "model.head_dim=16",
                 "model.num_blocks=2", "model.layers_per_block=1", "model.num_classes=3"]  # fmt: skip
    argv = ["shards", "--num", "6", "--shard-size", "2", "--batch-size", "2", "--workers", "1,2", "--guidance", "1"]
    assert main([*argv, *overrides]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split("|")[1:-1] for line in lines if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert [int(r[0]) for r in rows] == [1, 2]
    for workers, rate, per_worker, *_ in rows:
        assert float(rate) > 0 and abs(float(per_worker) - float(rate) / int(workers)) < 0.01 + 1e-3 * float(rate)
    assert "# shards identical across worker counts [1, 2]: yes" in lines
