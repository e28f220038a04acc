"""`tarflow-bench shards`: sampling to WebDataset shards (`tarflow-sample --format shards`) at 1 and 2 Ray workers —
images/s in all and per worker (PNG encoding, packing and the driver's atomic writes included; worker start-up
apart), and the one-process sampler (`sample_images`, one thread) on the same model for comparison. Each worker
gets one CPU (one torch thread), so on CPU the per-worker rate is what one more core buys. The shards of every
worker count are checked to be the same files.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from tarflow_scale.benchmarks.common import load_suite_config, model_with_live_heads
from tarflow_scale.config import Guidance
from tarflow_scale.sampling import sample_images


def shard_digests(folder: Path) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("samples-train-*.tar"))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tarflow-bench shards", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/tiny.yaml", help="recipe or YAML (default: the tiny quickstart model)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.channels=256")
    p.add_argument("--num", type=int, default=128, help="samples per run (default 128)")
    p.add_argument("--shard-size", type=int, default=16, help="samples per shard (default 16)")
    p.add_argument("--batch-size", type=int, default=16, help="samples drawn at once by a worker (default 16)")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts (default 1,2)")
    p.add_argument("--guidance", type=float, default=0.0, help="guidance weight (unconditional: attn_temp 1.5)")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: an embedded local one)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (default: CPU workers)")
    args = p.parse_args(argv)
    config = load_suite_config(p.prog, args.config, args.overrides)
    if config is None:
        return 2
    counts = [int(w) for w in args.workers.split(",") if w]
    if not counts or min(counts) < 1 or min(args.num, args.shard_size, args.batch_size) < 1:
        print("error: --workers, --num, --shard-size and --batch-size must be >= 1", file=sys.stderr)
        return 2
    import ray

    from tarflow_scale.evaluation.pool import init_ray
    from tarflow_scale.evaluation.shard_sampling import sample_to_shards
    from tarflow_scale.evaluation.shard_worker import ShardSampling

    c = config.model
    model = model_with_live_heads(c, torch.device("cpu")).eval()
    labels = "balanced" if c.num_classes else None
    guidance = Guidance(args.guidance, attn_temp=1.0 if c.num_classes else 1.5)
    spec = ShardSampling(num=args.num, labels=labels, guidance=guidance, shard_size=args.shard_size)
    print(f"# tarflow-bench shards: {platform.node()} {platform.machine()}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}; {'GPU' if args.gpu else 'CPU (1 thread)'} workers")  # fmt: skip
    print(f"# model: {c.image_size}px patch {c.patch_size} -> {c.num_tokens} tokens, {c.num_blocks} blocks x "
          f"{c.layers_per_block} layers, {c.channels} channels, classes={c.num_classes}; guidance {args.guidance}; "
          f"{args.num} samples in shards of {args.shard_size}, batch {args.batch_size}")  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    y = torch.arange(args.num) % c.num_classes if c.num_classes else None
    sample_images(model, args.num, labels=y, guidance=guidance, batch_size=args.batch_size)
    baseline = args.num / (time.perf_counter() - start)
    torch.set_num_threads(threads)
    print("| workers | images/s | images/s per worker | per worker vs one process | worker start-up s |")
    print("|---|---|---|---|---|")
    print(f"| one process (sample_images, 1 thread, no files) | {baseline:.2f} | {baseline:.2f} | 1.00x | - |")
    started = init_ray(args.address)
    digests = {}
    try:
        with tempfile.TemporaryDirectory(prefix="tarflow-bench-shards-") as tmp:
            for workers in counts:
                out = Path(tmp) / f"w{workers}"
                out.mkdir()
                report = sample_to_shards(
                    model, out, spec, num_workers=workers, use_gpu=args.gpu, batch_size=args.batch_size,
                    progress_every_s=1e9, stream=io.StringIO(),
                )  # fmt: skip
                per_worker = report.images_per_s / workers
                print(f"| {workers} | {report.images_per_s:.2f} | {per_worker:.2f} | {per_worker / baseline:.2f}x | "
                      f"{report.startup_s:.1f} |", flush=True)  # fmt: skip
                digests[workers] = shard_digests(out)
    finally:
        if started:
            ray.shutdown()
    same = len({tuple(d) for d in digests.values()}) == 1
    print(f"# shards identical across worker counts {counts}: {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
