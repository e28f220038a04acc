"""Benchmark ZeRO stages 1/2/3 on one config: images/s and peak memory per rank, from real training runs.

Each stage trains the same config for `--steps` steps under Ray Train + DeepSpeed; the rate is taken from the
logged steps after the first (compilation and start-up excluded) and memory is the largest rank's peak.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from tarflow_scale.benchmarks.common import load_suite_config
from tarflow_scale.training.metrics import read_metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tarflow-bench zero", description=__doc__)
    parser.add_argument("--config", help="YAML run config (default: the built-in tiny run)")
    parser.add_argument("--steps", type=int, default=30, help="training steps per ZeRO stage (default 30)")
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3], help="ZeRO stages to run (default 1 2 3)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. cluster.num_workers=2")
    args = parser.parse_args(argv)
    from tarflow_scale.training.cluster import init_ray, launch

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for stage in args.stages:
            overrides = [
                *args.overrides,
                f"run_dir={Path(tmp) / f'zero{stage}'}",
                f"deepspeed.zero_stage={stage}",
                f"train.num_steps={args.steps}",
                "train.log_every=1",
                "train.sample_every=0",
                f"train.checkpoint_every={args.steps}",
                "optim.ema_decay=0",
            ]
            config = load_suite_config(parser.prog, args.config, overrides)
            if config is None:
                return 2
            init_ray(config.cluster.address)
            launch(config)
            records = [r for r in read_metrics(config.run_dir) if "images_per_s" in r]
            steady = records[1:] or records
            rate = sum(r["images_per_s"] for r in steady) / len(steady)
            rows.append((stage, config.cluster.num_workers, rate, max(r["peak_mem_mb"] for r in records)))
    print(f"\n{'ZeRO':>5} {'ranks':>6} {'images/s':>10} {'peak MiB/rank':>14}")
    for stage, ranks, rate, mem in rows:
        print(f"{stage:>5} {ranks:>6} {rate:>10.1f} {mem:>14.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
