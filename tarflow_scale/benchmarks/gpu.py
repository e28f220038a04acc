"""`tarflow-bench gpu`: the figures docs/gpu.md tabulates for the paper's ImageNet64 model on one GPU, with
synthetic data — bf16 training images/s and model FLOP utilisation, peak memory at micro-batch 32 with and without
activation checkpointing, fp32+TF32 training images/s (the density recipe's policy), guided sampling images/s in
fp32 and bf16, and exact bits/dim images/s.

    tarflow-bench gpu                                  # imagenet64_uncond (patch 2, width 768, 8x8), on CUDA
    tarflow-bench gpu --config tiny --device cpu --micro-batch 4 --sample-batch 4 --steps 1   # a CPU smoke run

FLOPs are counted by torch's FlopCounterMode on one real training step (forward + backward; activation
checkpointing's recomputation is not counted, as MFU conventionally excludes it), with causal attention counted as
half of the full T x T product (FlashAttention's convention). MFU divides the achieved model
FLOP/s by the GPU's bf16 dense peak (--peak-tflops, or the datasheet value for a known GPU name); on CPU, or for an
unknown GPU without --peak-tflops, by a bf16 matmul timed in this process, and the line says so.
"""

from __future__ import annotations

import argparse
import platform
import sys

import torch

from tarflow_scale.benchmarks.common import (
    add_device_option,
    load_suite_config,
    model_with_live_heads,
    seconds_per_call,
)
from tarflow_scale.benchmarks.eval import PeakMemory
from tarflow_scale.benchmarks.model import FLOP_CONVENTION, count_train_flops, measure_matmul_peak
from tarflow_scale.config import Decoding, Guidance, TarFlowConfig
from tarflow_scale.evaluation.bpd import batch_bits_per_dim
from tarflow_scale.evaluation.generate import generate
from tarflow_scale.models.precision import apply_precision
from tarflow_scale.models.tarflow import TarFlow

# Datasheet bf16 dense (no sparsity) tensor-core peaks, TFLOP/s: (substring of the device name, model, peak), the
# first match counts, so the specific names come first. The SXM parts report no form factor ("NVIDIA H100 80GB
# HBM3", "NVIDIA H200"); the NVL and PCIe cards run lower clocks and power.
BF16_DENSE_PEAKS = [
    ("H200 NVL", "H200 NVL", 835.0),
    ("H200", "H200 SXM", 989.4),
    ("H100 NVL", "H100 NVL", 835.0),
    ("H100 PCIe", "H100 PCIe", 756.0),
    ("H100", "H100 SXM", 989.4),
    ("A100", "A100", 312.0),
    ("L40S", "L40S", 362.05),
    ("A10G", "A10G", 70.0),
]


def datasheet_peak(device_name: str) -> tuple[float, str] | None:
    """(bf16 dense peak FLOP/s, which part it is taken for) for a CUDA device name, or None if unknown."""
    for key, part, tflops in BF16_DENSE_PEAKS:
        if key in device_name:
            return tflops * 1e12, f"{part} bf16 dense datasheet peak {tflops:g} TFLOP/s (device '{device_name}')"
    return None


def dense_peak(device: torch.device, override: float) -> tuple[float, str]:
    """(FLOP/s, where the figure comes from)."""
    if override:
        return override * 1e12, f"--peak-tflops {override:g}"
    if device.type == "cuda" and (known := datasheet_peak(torch.cuda.get_device_name(device))) is not None:
        return known
    return measure_matmul_peak(device, torch.bfloat16), "a bf16 matmul timed in this process (no datasheet peak)"


def build(config: TarFlowConfig, device: torch.device, checkpointing: bool = False) -> TarFlow:
    model = model_with_live_heads(config, torch.device("cpu"))
    if checkpointing:
        from tarflow_scale.training.trainer import apply_activation_checkpointing

        apply_activation_checkpointing(model)
    return model.to(device)


def bench_train(
    config: TarFlowConfig,
    batch: int,
    steps: int,
    device: torch.device,
    precision: str,
    checkpointing: bool,
    count_flops: bool = False,
) -> dict[str, float]:
    """One GPU, plain AdamW (ZeRO's partitioning does not change one GPU's compute): images/s, peak memory (MiB)
    over the timed steps, under the trainer's precision policy; with count_flops, also FLOPs per step (and /s)."""
    model = build(config, device, checkpointing)
    # The trainer's own policy: "tf32" here is its fp32 policy with TF32 matmuls, "fp32" strict fp32.
    apply_precision(model, "bf16" if precision == "bf16" else "fp32", device, tf32=precision == "tf32")
    x = torch.rand(batch, config.in_channels, config.image_size, config.image_size, device=device) * 2 - 1
    y = torch.randint(0, config.num_classes, (batch,), device=device) if config.num_classes else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    flops = count_train_flops(model, x, y) if count_flops else 0

    def step() -> None:
        loss = -model.log_prob(x, y).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    memory = PeakMemory(device)
    step()  # warm-up (allocates the optimizer state)
    memory.reset()
    seconds = seconds_per_call(step, device, steps)
    return {"images_per_s": batch / seconds, "flops": flops, "flops_per_s": flops / seconds, "peak": memory.peak_mib()}


def bench_sampling(model: TarFlow, batch: int, device: torch.device, precision: str, cuda_graph: bool = False) -> float:
    """Guided sampling images/s (guidance 1: the conditional and guiding passes run as one batch of 2B).
    bf16: the sampler's own precision policy (eval.decoding.precision): bf16 matmuls and KV cache, fp32 flow state.
    cuda_graph: the sequential step replayed as one CUDA graph per block (eval.decoding.cuda_graph)."""
    guidance = Guidance(weight=1.0, attn_temp=1.0 if model.config.num_classes else 1.5)
    decoding = Decoding(precision=precision, cuda_graph=cuda_graph)
    generate(model, [0, 1], guidance, decoding)  # warm-up
    return batch / seconds_per_call(lambda: generate(model, list(range(batch)), guidance, decoding), device)


def bench_bpd(model: TarFlow, batch: int, device: torch.device) -> float:
    c = model.config
    pixels = torch.randint(0, 256, (batch, c.in_channels, c.image_size, c.image_size), dtype=torch.uint8)
    labels = (torch.arange(batch) % c.num_classes).to(device) if c.num_classes else None
    keys = [f"bench{i:06d}" for i in range(batch)]
    batch_bits_per_dim(model, pixels[:2].to(device), None if labels is None else labels[:2], keys[:2])  # warm-up
    pixels = pixels.to(device)
    return batch / seconds_per_call(lambda: batch_bits_per_dim(model, pixels, labels, keys), device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tarflow-bench gpu", description=__doc__)
    parser.add_argument("--config", default="imagenet64_uncond", help="recipe (default: the paper's ImageNet64 model)")
    parser.add_argument("--micro-batch", type=int, default=32, help="training images per step")
    parser.add_argument("--sample-batch", type=int, default=256, help="guided sampling batch")
    parser.add_argument("--bpd-batch", type=int, default=256, help="bits/dim batch")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per setting")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="bf16 dense peak of this GPU, TFLOP/s")
    add_device_option(parser)
    parser.add_argument(
        "--only", default="train,memory,tf32,sample,bpd", help="comma-separated parts: train,memory,tf32,sample,bpd"
    )
    parser.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = parser.parse_args(argv)
    config = load_suite_config(parser.prog, args.config, args.overrides)
    if config is None:
        return 2
    parts = set(args.only.split(","))
    device = torch.device(args.device)
    c = config.model
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    params = sum(p.numel() for p in TarFlow(c).parameters())
    print(f"device: {device} ({name}), torch {torch.__version__}; synthetic data")
    print(
        f"model ({args.config}): {params / 1e6:.1f}M params, {c.image_size}px patch {c.patch_size} ({c.num_tokens} "
        f"tokens x {c.token_dim}), width {c.channels}, {c.num_blocks}x{c.layers_per_block} layers"
    )
    mib = "MiB (GPU allocator peak)" if device.type == "cuda" else "MiB (process peak RSS)"
    rows: list[tuple[str, str]] = []

    def row(label: str, value: str) -> None:
        rows.append((label, value))
        print(f"{label:<68} {value}", flush=True)

    def fits(label: str, measure):
        """measure(), or None after a row saying the setting ran out of GPU memory: the remaining rows still run
        (one run on a GPU should not lose them to the first setting that does not fit)."""
        try:
            return measure()
        except torch.cuda.OutOfMemoryError:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                row(
                    label,
                    f"out of GPU memory ({torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB)",
                )
            else:
                row(label, "out of memory")
            return None

    b = args.micro_batch
    if "train" in parts:
        peak, source = dense_peak(device, args.peak_tflops)
        r = fits(f"bf16 training, micro-batch {b}", lambda: bench_train(c, b, args.steps, device, "bf16", False, True))
        if r:
            row(f"bf16 training, micro-batch {b}", f"{r['images_per_s']:.1f} images/s")
            row(
                "bf16 MFU (model FLOPs / bf16 dense peak)",
                f"{100 * r['flops_per_s'] / peak:.1f}% ({r['flops'] / b / 1e9:.1f} GFLOP/image, {FLOP_CONVENTION}; "
                f"peak: {source})",
            )
            if "memory" in parts:
                row(f"peak memory, bf16, micro-batch {b}, no activation checkpointing", f"{r['peak']:.0f} {mib}")
    if "memory" in parts:
        label = f"bf16 training with activation checkpointing, micro-batch {b}"
        r = fits(label, lambda: bench_train(c, b, max(1, args.steps // 5), device, "bf16", checkpointing=True))
        if r:
            row(f"peak memory, bf16, micro-batch {b}, activation checkpointing", f"{r['peak']:.0f} {mib}")
            row(label, f"{r['images_per_s']:.1f} images/s")
    if "tf32" in parts:
        label = f"{'fp32+TF32' if device.type == 'cuda' else 'fp32 (no TF32 on CPU)'} training (density recipe policy)"
        r = fits(f"{label}, micro-batch {b}", lambda: bench_train(c, b, args.steps, device, "tf32", False))
        if r:
            row(f"{label}, micro-batch {b}", f"{r['images_per_s']:.1f} images/s")
    if "sample" in parts or "bpd" in parts:
        model = build(c, device).eval()
        if "sample" in parts:
            graph = device.type == "cuda" and model.blocks[0].transform.closed_form_inverse
            for precision, cuda_graph in (("fp32", False), ("bf16", False)) + ((("bf16", True),) if graph else ()):
                label = f"guided sampling, batch {args.sample_batch}, {precision}{', CUDA graph' * cuda_graph}"
                rate = fits(
                    label, lambda p=precision, g=cuda_graph: bench_sampling(model, args.sample_batch, device, p, g)
                )
                if rate is not None:
                    row(label, f"{rate:.2f} images/s")
        if "bpd" in parts:
            label = f"bits/dim (fp32), batch {args.bpd_batch}"
            rate = fits(label, lambda: bench_bpd(model, args.bpd_batch, device))
            if rate is not None:
                row(label, f"{rate:.1f} images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
