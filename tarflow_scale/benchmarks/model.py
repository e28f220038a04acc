"""`tarflow-bench [model]`: single-process throughput of a config — training and sampling images/s, achieved FLOP/s.

FLOPs are counted by torch's FlopCounterMode on one real step (not estimated by formula); the peak is a
large matmul timed in the same run, on the same device and dtype, so the fraction is honest for this machine.
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
from tarflow_scale.config import Guidance
from tarflow_scale.models.tarflow import TarFlow


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a square matmul: the practical peak this process can reach."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up
    return 2 * size**3 / seconds_per_call(lambda: a @ b, device, repeats)


# MFU's model FLOPs count causal attention as half of the full T x T product (QK^T and AV): the masked half is
# not model work, and fused kernels skip it. FlashAttention's own benchmarks use this convention.
FLOP_CONVENTION = (
    "model FLOPs, causal attention counted as half of the full T x T product (FlashAttention's convention)"
)


def count_train_flops(model: TarFlow, x: torch.Tensor, y: torch.Tensor | None) -> int:
    """Model FLOPs of one training step (forward + backward) on the batch x (FLOP_CONVENTION).

    Counted by torch's FlopCounterMode on one image and multiplied by the batch (FLOPs are linear in it), with SDPA
    on its math backend: its matmuls are counted on every device (a fused CPU attention kernel is not registered
    with the counter, and would drop ~20% of the paper model's FLOPs). There the attention products are the
    step's only batched matmuls (aten.bmm; every Linear is an addmm/mm), all causal, so half of them are dropped.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        (-model.log_prob(x[:1], None if y is None else y[:1]).mean()).backward()
    model.zero_grad(set_to_none=True)
    counts = counter.get_flop_counts()["Global"]
    attention = counts.get(torch.ops.aten.bmm, 0)
    return (counter.get_total_flops() - attention // 2) * x.shape[0]


def bench_training(model: TarFlow, batch: int, steps: int, device: torch.device, dtype: torch.dtype) -> dict:
    c = model.config
    x = torch.randn(batch, c.in_channels, c.image_size, c.image_size, device=device)
    y = torch.randint(0, c.num_classes, (batch,), device=device) if c.num_classes else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    # The trainer's precision policy: only the Transformer trunk autocasts; the flow maths stays fp32.
    model.set_trunk_dtype(dtype if dtype != torch.float32 else None)
    flops = count_train_flops(model, x, y)

    def step():
        loss = -model.log_prob(x, y).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    seconds = seconds_per_call(step, device, steps)
    return {"images_per_s": batch / seconds, "step_s": seconds, "flops_per_s": flops / seconds}


@torch.no_grad()
def bench_sampling(model: TarFlow, batch: int, device: torch.device, guidance: float) -> float:
    c = model.config
    y = torch.randint(0, c.num_classes, (batch,), device=device) if c.num_classes else None
    # Unconditional models guide by attention temperature.
    guided = Guidance(weight=guidance, attn_temp=1.0 if c.num_classes else 1.5)
    model.sample(min(batch, 2), y=None if y is None else y[:2], guidance=guided)  # warm-up
    return batch / seconds_per_call(lambda: model.sample(batch, y=y, guidance=guided), device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tarflow-bench model", description=__doc__)
    parser.add_argument("--config", help="YAML run config (default: the built-in tiny run)")
    parser.add_argument("--batch-size", type=int, default=0, help="training batch (default: the config's micro-batch)")
    parser.add_argument("--sample-batch-size", type=int, default=16, help="images per sampling call (default 16)")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps")
    add_device_option(parser)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-data", action="store_true", help="skip the loader throughput (needs data.path)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.channels=256")
    args = parser.parse_args(argv)
    config = load_suite_config(parser.prog, args.config, args.overrides)
    if config is None:
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    model = model_with_live_heads(config.model, device)
    c = config.model
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device: {device} ({name}), {torch.get_num_threads()} CPU threads, dtype {dtype}, torch {torch.__version__}")
    print(
        f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {c.image_size}px patch {c.patch_size} "
        f"({c.num_tokens} tokens x {c.token_dim}), width {c.channels}, {c.num_blocks}x{c.layers_per_block} layers, "
        f"transform {c.transform}"
    )
    peak = measure_matmul_peak(device, dtype)
    batch = args.batch_size or config.micro_batch_size
    train = bench_training(model, batch, args.steps, device, dtype)
    plain = bench_sampling(model, args.sample_batch_size, device, guidance=0.0)
    guided = bench_sampling(model, args.sample_batch_size, device, guidance=1.0)
    print(f"matmul peak:        {peak / 1e9:10.1f} GFLOP/s")
    print(
        f"training:           {train['images_per_s']:10.1f} images/s  "
        f"(batch {batch}, {train['step_s'] * 1e3:.1f} ms/step, "
        f"{train['flops_per_s'] / 1e9:.1f} GFLOP/s = {100 * train['flops_per_s'] / peak:.1f}% of peak)"
    )
    if not args.no_data:
        from dataclasses import replace

        from tarflow_scale.benchmarks.data import loader_throughput
        from tarflow_scale.data import resolve_data_path

        data = replace(config.data, path=resolve_data_path(config.data))
        loader = loader_throughput(data, batch, num_batches=20)
        print(
            f"data loader:        {loader['images_per_s']:10.1f} images/s  ({data.num_workers} worker(s), "
            f"{loader['images_per_s_per_worker']:.1f}/worker: {loader['images_per_s'] / train['images_per_s']:.1f}x "
            "the training step's need)"
        )
    print(f"sampling:           {plain:10.1f} images/s  (batch {args.sample_batch_size}, no guidance)")
    print(f"sampling, guided:   {guided:10.1f} images/s  (batch {args.sample_batch_size}, cond+uncond batched)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
