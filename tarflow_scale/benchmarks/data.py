"""Training-loader throughput (images/s, per worker), for comparison with the training step rate."""

from __future__ import annotations

import argparse
import time

from tarflow_scale.config import DataConfig
from tarflow_scale.data import make_train_loader


def loader_throughput(cfg: DataConfig, batch_size: int, num_batches: int = 50, warmup_batches: int = 5) -> dict:
    """Images/s of `make_train_loader(cfg, ...)` on rank 0, after `warmup_batches` (worker start-up and
    shuffle-buffer fill are excluded). `images_per_s_per_worker` divides by max(1, cfg.num_workers): with
    num_workers=0 the main process does the work. `tarflow-bench model` prints it beside the step rate."""
    loader = iter(make_train_loader(cfg, batch_size, rank=0, world_size=1, seed=0))
    for _ in range(warmup_batches):
        next(loader)
    start = time.perf_counter()
    for _ in range(num_batches):
        next(loader)
    seconds = time.perf_counter() - start
    images_per_s = num_batches * batch_size / seconds
    return {
        "num_workers": cfg.num_workers,
        "batch_size": batch_size,
        "images_per_s": images_per_s,
        "images_per_s_per_worker": images_per_s / max(1, cfg.num_workers),
        "batches_per_s": num_batches / seconds,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tarflow-bench data", description=__doc__)
    parser.add_argument("--path", default="bundled", help="data.path (default: the bundled dataset)")
    parser.add_argument("--image-size", type=int, default=0, help="data.image_size (0: the shards' size)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    parser.add_argument(
        "--num-workers",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="DataLoader worker counts to measure (default 0 1 2)",
    )
    parser.add_argument("--num-batches", type=int, default=50, help="batches timed per setting (default 50)")
    parser.add_argument(
        "--steps-per-s", type=float, default=None, help="measured training steps/s per rank, to show the headroom"
    )
    args = parser.parse_args(argv)
    for workers in args.num_workers:
        cfg = DataConfig(path=args.path, image_size=args.image_size, num_workers=workers)
        r = loader_throughput(cfg, args.batch_size, args.num_batches)
        line = (
            f"loader  workers={workers}  batch={args.batch_size}  {r['images_per_s']:9.0f} images/s  "
            f"{r['images_per_s_per_worker']:9.0f} images/s/worker"
        )
        if args.steps_per_s:
            needed = args.steps_per_s * args.batch_size
            line += f"  training needs {needed:.0f} images/s -> {r['images_per_s'] / needed:.1f}x headroom"
        print(line, flush=True)


if __name__ == "__main__":
    main()
