"""`tarflow-bench sweep`: what a FID sweep (eval.sweep) costs against one evaluation per setting, each counted with
its worker start-up (the model loaded on every worker) and its fid job (generation, denoising, features).

Runs the real `tarflow-eval` path (`evaluation.orchestrate.evaluate`) on local Ray workers: a small model with live
heads (configs/tiny.yaml unless --config), a synthetic training split for the reference statistics (built once,
untimed), pooled-pixel features (no Inception weights needed; the cost of the features is the same per setting
either way). The bound a sweep must meet: S settings cost at most the S single runs' generation plus one model load
per worker (one pool start-up, workers load in parallel). Prints each single run, the sweep, the bound and the
ratios. Timings on a shared machine vary: read the ratios of a quiet run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tarflow_scale.artifacts import read_provenance, save_export
from tarflow_scale.benchmarks.common import load_suite_config, model_with_live_heads
from tarflow_scale.config import ConfigError, DataConfig, RunConfig
from tarflow_scale.data import write_split
from tarflow_scale.data.sources import ArraySource

DEFAULT_SWEEP = ["eval.sweep.guidance=[0,1,2]"]


@dataclass
class Cost:
    """One evaluation: its worker start-up (model loads), its fid job and the whole call, seconds."""

    load_s: float
    fid_s: float
    wall_s: float

    @property
    def total_s(self) -> float:
        return self.load_s + self.fid_s


def _setup(config: RunConfig, folder: Path, num_reference: int) -> Path:
    """A synthetic training split of the model's image shape and an export of a live-headed model: the checkpoint."""
    m = config.model
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (num_reference, m.image_size, m.image_size, m.in_channels), dtype=np.uint8)
    classes = max(m.num_classes, 1)
    source = ArraySource(
        images=images, labels=np.arange(num_reference) % classes, keys=[f"ref{i:06d}" for i in range(num_reference)],
        num_classes=m.num_classes, class_names=[], description={"benchmark": "sweep"},
    )  # fmt: skip
    data = folder / "data"
    write_split(str(data), source, name="bench", split="train", samples_per_shard=256, progress=False)
    import torch

    model = model_with_live_heads(m, torch.device("cpu"), std=0.05)
    run = RunConfig(model=m, data=DataConfig(path=str(data), noise=config.data.noise, noise_std=config.data.noise_std))
    path = folder / "model.safetensors"
    return save_export(model.state_dict(), run, path, source="benchmark", tag="bench", ema=False)


def _evaluate(checkpoint: Path, out: Path, overrides: list[str], repeats: int = 1) -> Cost:
    """The fastest of `repeats` evaluations, each into a fresh folder (no finished units to reuse)."""
    from tarflow_scale.evaluation.orchestrate import evaluate
    from tarflow_scale.evaluation.resolve import resolve_config

    info = read_provenance(checkpoint)
    costs = []
    for attempt in range(repeats):
        config = resolve_config(info, None, overrides)
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # the evaluation's own progress lines
            report = evaluate(config, info, out / f"attempt_{attempt}")
        wall = time.perf_counter() - start
        fid = report["results"].get("fid", {})
        costs.append(Cost(report["cluster"]["worker_startup_s"], fid.get("seconds", 0.0), wall))
    return min(costs, key=lambda c: c.total_s)


def _row(name: str, cost: Cost) -> str:
    return f"{name:<44} {cost.load_s:>8.2f} {cost.fid_s:>10.2f} {cost.total_s:>11.2f} {cost.wall_s:>8.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tarflow-bench sweep", description=__doc__)
    parser.add_argument("--config", default="configs/tiny.yaml", help="the model (default configs/tiny.yaml)")
    parser.add_argument("--workers", type=int, default=2, help="cluster.num_workers (default 2)")
    parser.add_argument("--num-samples", type=int, default=64, help="eval.fid_num_samples per setting (default 64)")
    parser.add_argument("--batch-size", type=int, default=16, help="eval.batch_size (default 16)")
    parser.add_argument("--num-reference", type=int, default=256, help="training images for the reference statistics")
    parser.add_argument("--repeats", type=int, default=1, help="evaluations per run; the fastest counts (default 1)")
    parser.add_argument("--address", help="Ray cluster to join (default: a fresh local one)")
    default = " ".join(DEFAULT_SWEEP)
    parser.add_argument("overrides", nargs="*", help=f"eval.sweep.* lists and dotted overrides (default: {default})")
    args = parser.parse_args(argv)
    sweep_args = [o for o in args.overrides if o.startswith("eval.sweep.")] or DEFAULT_SWEEP
    others = [o for o in args.overrides if not o.startswith("eval.sweep.")]
    config = load_suite_config(parser.prog, args.config, others)
    if config is None:
        return 2
    common = [
        *others, "eval.jobs=[fid]", "eval.fid_feature_extractor=pooled_pixels", "data.num_workers=0",
        f"cluster.num_workers={args.workers}", f"eval.fid_num_samples={args.num_samples}",
        f"eval.batch_size={args.batch_size}", f"eval.kid_max_features={args.num_samples}", "eval.progress_every_s=600",
    ]  # fmt: skip
    import ray

    with tempfile.TemporaryDirectory(prefix="tarflow-bench-sweep-") as tmp:
        folder = Path(tmp)
        checkpoint = _setup(config, folder, args.num_reference)
        try:
            from tarflow_scale.evaluation.resolve import resolve_config

            info = read_provenance(checkpoint)
            planned = resolve_config(info, None, [*common, *sweep_args]).eval
        except ConfigError as e:
            print(f"{parser.prog}: config error: {e}", file=sys.stderr)
            return 2
        points = planned.sweep.points(planned.guidance, planned.decoding, planned.denoise_step)
        swept = planned.sweep.swept()
        started = not ray.is_initialized()  # a caller's running Ray (a test session) is used as it is
        if started and args.address:
            ray.init(address=args.address, log_to_driver=False)
        elif started:
            ray.init(address="local", num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
        try:
            _evaluate(checkpoint, folder / "reference", [*common, "eval.jobs=[fid_stats]"])  # untimed: cached stats
            singles = []
            for i, point in enumerate(points):
                setting = [f"eval.{name}={value}" for name, value in point.values().items()]  # named as under eval
                cost = _evaluate(checkpoint, folder / f"single_{i}", [*common, *setting], args.repeats)
                singles.append((point.label(swept), cost))
            sweep = _evaluate(checkpoint, folder / "sweep", [*common, *sweep_args], args.repeats)
        finally:
            if started:
                ray.shutdown()

    print(f"tarflow-bench sweep: {len(points)} settings ({' x '.join(swept)}), {args.num_samples} samples each, "
          f"batch {args.batch_size}, {args.workers} CPU workers ({platform.processor() or platform.machine()}), "
          f"pooled-pixel features, model {args.config} {' '.join(others)}".rstrip()
          + (f"; fastest of {args.repeats}" if args.repeats > 1 else ""))  # fmt: skip
    header = f"{'run':<44} {'load s':>8} {'fid job s':>10} {'load+fid s':>11} {'wall s':>8}"
    print(header)
    print("-" * len(header))
    for label, cost in singles:
        print(_row(f"single {label}", cost))
    separate = Cost(*(sum(getattr(c, k) for _, c in singles) for k in ("load_s", "fid_s", "wall_s")))
    print(_row("separate runs, total", separate))
    print(_row("one sweep", sweep))
    # One model load per worker: the sweep's own pool start-up (workers load in parallel). Start-ups vary by
    # seconds on a loaded machine, so the single runs' mean is printed beside it.
    bound = separate.fid_s + sweep.load_s
    verdict = "within" if sweep.total_s <= bound else "ABOVE"
    print(
        f"bound: the settings' generation in single runs {separate.fid_s:.2f}s + one model load per worker "
        f"{sweep.load_s:.2f}s (single runs' mean {separate.load_s / len(singles):.2f}s) = {bound:.2f}s"
    )
    print(
        f"sweep: {sweep.total_s:.2f}s = {sweep.total_s / bound:.2f}x the bound ({verdict} it); model loads: 1 pool "
        f"start-up vs {len(singles)}; generation {sweep.fid_s / separate.fid_s:.2f}x the single runs'"
    )
    print(
        f"against separate runs: {sweep.total_s / separate.total_s:.2f}x their load+fid, "
        f"{sweep.wall_s / separate.wall_s:.2f}x their wall time"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
