"""`tarflow-bench eval`: evaluation throughput of one worker — sampling images/s with and without
guidance and Tweedie denoising, and exact bits/dim images/s — for the tiny and a mid-size config.

Measures the library functions each Ray worker runs (generate, tweedie_denoise, batch_bits_per_dim) in this
process, without Ray: multiply by the number of workers for a cluster. Models get small random output heads
so sampling does real work rather than the identity.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

from tarflow_scale.config import ConfigError, TarFlowConfig, load_config
from tarflow_scale.evaluation.bpd import batch_bits_per_dim
from tarflow_scale.evaluation.denoise import tweedie_denoise
from tarflow_scale.evaluation.generate import SampleSettings, generate
from tarflow_scale.models.tarflow import TarFlow

# A mid-size model at the tiny run's resolution: 3x wider, deeper blocks (~40M parameters).
MID_OVERRIDES = ["model.channels=384", "model.head_dim=64", "model.num_blocks=6", "model.layers_per_block=4"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: torch.device, repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls, after one warm-up call (the minimum is the least disturbed by
    other load on a shared machine)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def build(config: TarFlowConfig, device: torch.device) -> TarFlow:
    torch.manual_seed(0)
    model = TarFlow(config)
    with torch.no_grad():
        for block in model.blocks:
            block.proj_out.weight.normal_(0, 1e-3)
    return model.to(device).eval()


def bench_model(model: TarFlow, batch: int, repeats: int, device: torch.device, noise_std: float) -> dict[str, float]:
    """images/s of each evaluation workload at batch size `batch`."""
    c = model.config
    indices = list(range(batch))
    # Unconditional models guide by attention temperature (TarFlow §2.5), conditional ones by the null label.
    guided = SampleSettings(guidance=1.0, attn_temp=1.0 if c.num_classes else 1.5)
    out = {}
    for name, settings, denoise in (
        ("sample", SampleSettings(), False),
        ("sample_guided", guided, False),
        ("sample_denoised", SampleSettings(), True),
        ("sample_guided_denoised", guided, True),
    ):

        def run(settings=settings, denoise=denoise):
            images, labels, _ = generate(model, indices, settings)
            if denoise:
                tweedie_denoise(model, images, noise_std, labels)

        out[name] = batch / _timed(run, device, repeats)
    pixels = torch.randint(0, 256, (batch, c.in_channels, c.image_size, c.image_size), dtype=torch.uint8)
    labels = torch.arange(batch) % c.num_classes if c.num_classes else None
    keys = [f"bench{i:06d}" for i in range(batch)]
    out["bpd"] = batch / _timed(lambda: batch_bits_per_dim(model, pixels.to(device), labels, keys), device, repeats)
    return out


COLUMNS = (
    ("sample", "sample"),
    ("sample_guided", "+guidance"),
    ("sample_denoised", "+denoise"),
    ("sample_guided_denoised", "+guid+den"),
    ("bpd", "bpd"),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tarflow-bench eval", description=__doc__)
    parser.add_argument("--config", default="configs/tiny.yaml", help="the small config (default configs/tiny.yaml)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per call (default 16)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per workload; the fastest counts")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device (default: cuda if available)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-mid", action="store_true", help="only the small config")
    parser.add_argument("overrides", nargs="*", help="dotted overrides applied to both configs")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    runs = [("tiny", args.overrides)] + ([] if args.no_mid else [("mid", [*MID_OVERRIDES, *args.overrides])])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device: {device} ({name}), {torch.get_num_threads()} CPU threads, fp32, torch {torch.__version__}")
    print(f"batch {args.batch_size}, fastest of {args.repeats} calls after a warm-up; images/s of one worker")
    header = f"{'config':<6} {'params':>8} {'tokens':>6} " + " ".join(f"{label:>10}" for _, label in COLUMNS)
    print(header)
    print("-" * len(header))
    for label, overrides in runs:
        try:
            config = load_config(args.config, overrides)
        except ConfigError as e:
            print(f"bench_eval: config error: {e}", file=sys.stderr)
            return 2
        model = build(config.model, device)
        noise_std = config.data.noise_std if config.data.noise == "gaussian" else 0.05
        rates = bench_model(model, args.batch_size, args.repeats, device, noise_std)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        row = f"{label:<6} {params:>7.1f}M {config.model.num_tokens:>6} "
        print(row + " ".join(f"{rates[key]:>10.1f}" for key, _ in COLUMNS), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
