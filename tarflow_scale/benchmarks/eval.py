"""`tarflow-bench eval`: per evaluation job, images/s and peak memory of one worker — sampling with and without
guidance, Tweedie denoising (micro-batched by eval.denoise_batch_size), and exact bits/dim — for the tiny and a
mid-size config (CPU), or any config given with --config (the paper's on a GPU: docs/gpu.md).

Measures the library functions each Ray worker runs (generate, tweedie_denoise, batch_bits_per_dim) in this
process, without Ray: multiply images/s by the number of workers for a cluster; the peak memory is per worker.
Peak memory: on GPU the allocator's peak (torch.cuda.max_memory_allocated) per job; on CPU the process's peak
resident set (VmHWM, reset before each job through /proc/self/clear_refs), which includes the interpreter, torch
and the weights. Models get small random output heads so sampling does real work rather than the identity.
"""

from __future__ import annotations

import argparse
import platform
import re
import sys
from pathlib import Path

import torch

from tarflow_scale.benchmarks.common import add_device_option, fastest_call, load_suite_config, model_with_live_heads
from tarflow_scale.config import Guidance, TarFlowConfig
from tarflow_scale.evaluation.bpd import batch_bits_per_dim
from tarflow_scale.evaluation.generate import generate
from tarflow_scale.models.tarflow import TarFlow
from tarflow_scale.sampling import tweedie_denoise

# A mid-size model at the tiny run's resolution: 3x wider, deeper blocks (~40M parameters).
MID_OVERRIDES = ["model.channels=384", "model.head_dim=64", "model.num_blocks=6", "model.layers_per_block=4"]


class PeakMemory:
    """Peak memory of one job: reset before it, read after it (MiB)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.exact = device.type == "cuda" or Path("/proc/self/clear_refs").exists()

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.exact:
            try:  # "5" resets the process's peak RSS (Linux >= 4.0)
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                self.exact = False

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        status = Path("/proc/self/status")
        if status.exists():
            return int(re.search(r"VmHWM:\s+(\d+)", status.read_text()).group(1)) / 1024
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # never reset: the process's maximum


def _timed(fn, device: torch.device, repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls, after one warm-up call."""
    fn()
    return fastest_call(fn, device, repeats)


def build(config: TarFlowConfig, device: torch.device) -> TarFlow:
    return model_with_live_heads(config, device).eval()


def bench_model(
    model: TarFlow, batch: int, repeats: int, device: torch.device, noise_std: float, denoise_batch: int = 0
) -> dict[str, tuple[float, float]]:
    """(images/s, peak memory MiB) of each evaluation workload at batch size `batch`."""
    c = model.config
    indices = list(range(batch))
    # Unconditional models guide by attention temperature (TarFlow §2.5), conditional ones by the null label.
    guided = Guidance(weight=1.0, attn_temp=1.0 if c.num_classes else 1.5)
    out = {}
    memory = PeakMemory(device)
    for name, guidance, denoise in (
        ("sample", Guidance(), False),
        ("sample_guided", guided, False),
        ("sample_denoised", Guidance(), True),
        ("sample_guided_denoised", guided, True),
    ):

        def run(guidance=guidance, denoise=denoise):
            images, labels, _ = generate(model, indices, guidance)
            if denoise:
                tweedie_denoise(model, images, noise_std, labels, batch_size=denoise_batch)

        memory.reset()
        seconds = _timed(run, device, repeats)
        out[name] = (batch / seconds, memory.peak_mib())
    pixels = torch.randint(0, 256, (batch, c.in_channels, c.image_size, c.image_size), dtype=torch.uint8)
    labels = torch.arange(batch) % c.num_classes if c.num_classes else None
    keys = [f"bench{i:06d}" for i in range(batch)]
    memory.reset()
    seconds = _timed(lambda: batch_bits_per_dim(model, pixels.to(device), labels, keys), device, repeats)
    out["bpd"] = (batch / seconds, memory.peak_mib())
    return out


# (key, eval job it stands for)
JOBS = (
    ("sample", "sample"),
    ("sample_guided", "sample, guided"),
    ("sample_denoised", "denoise"),
    ("sample_guided_denoised", "fid (guided+denoised, no features)"),
    ("bpd", "bpd"),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tarflow-bench eval", description=__doc__)
    parser.add_argument("--config", default="configs/tiny.yaml", help="the small config (default configs/tiny.yaml)")
    parser.add_argument("--batch-size", type=int, default=16, help="eval.batch_size: images per worker per pass")
    parser.add_argument(
        "--denoise-batch-size", type=int, default=-1, help="eval.denoise_batch_size (default: the config's; 0: all)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per workload; the fastest counts")
    add_device_option(parser)
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
    print(f"batch {args.batch_size}, fastest of {args.repeats} calls after a warm-up; one worker")
    kind = "GPU allocator peak" if device.type == "cuda" else "process peak RSS (VmHWM, reset per job)"
    header = f"{'config':<6} {'params':>8} {'tokens':>6}  {'job':<52} {'images/s':>10} {'peak MiB':>10}"
    print(f"peak memory: {kind}")
    print(header)
    print("-" * len(header))
    for label, overrides in runs:
        config = load_suite_config(parser.prog, args.config, overrides)
        if config is None:
            return 2
        model = build(config.model, device)
        noise_std = config.data.noise_std if config.data.noise == "gaussian" else 0.05
        denoise_batch = config.eval.denoise_batch_size if args.denoise_batch_size < 0 else args.denoise_batch_size
        results = bench_model(model, args.batch_size, args.repeats, device, noise_std, denoise_batch)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        for key, job in JOBS:
            rate, peak = results[key]
            if key in ("sample_denoised", "sample_guided_denoised"):
                job = f"{job}, den. batch {min(denoise_batch or args.batch_size, args.batch_size)}"
            row = f"{label:<6} {params:>7.1f}M {config.model.num_tokens:>6}  {job:<52} {rate:>10.1f} {peak:>10.0f}"
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
