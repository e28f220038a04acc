"""`tarflow-eval`'s whole evaluation: every check that can fail before Ray starts, then the jobs on a worker pool,
then metrics.json, the per-image CSV and TensorBoard."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import ray

from ..artifacts import Provenance, TrainingNoise, load_model
from ..config import ConfigError, RunConfig, SweepPoint
from ..data import DataError, check_first_sample, check_shard_sizes, read_manifest, resolve_data_path
from . import fid as fidlib
from .jobs import JOB_ORDER, data_fingerprint, run_bpd, run_fid, run_fid_samples, run_fid_stats, run_sampling
from .outputs import METRICS_FILE, build_report, check_finite_results, write_per_image, write_report, write_tensorboard
from .pool import WorkerPool, init_ray
from .precision import job_precision
from .sample_sets import SampleSet, find_sample_set
from .units import UnitStore, model_fingerprint


def _check_data(config: RunConfig, split: str):
    manifest = read_manifest(config.data.path, split)
    check_shard_sizes(config.data.path, manifest)  # cheap; `tarflow-data verify` is the full check
    m, size = config.model, config.data.image_size or manifest.image_size
    if size != m.image_size or manifest.channels != m.in_channels:
        raise ConfigError(
            f"data.path={config.data.path} split {split} gives {manifest.channels}x{size}x{size} images but the "
            f"checkpoint's model takes {m.in_channels}x{m.image_size}x{m.image_size} (set data.path / data.image_size)"
        )
    if m.num_classes and manifest.num_classes != m.num_classes:
        raise ConfigError(
            f"the checkpoint's model has {m.num_classes} classes but data.path={config.data.path} has "
            f"{manifest.num_classes}: evaluate on the dataset it was trained on"
        )
    check_first_sample(config.data.path, manifest)  # a split in a form the loaders refuse (16-bit, alpha) fails here
    return manifest


def _plan_fid(config: RunConfig, jobs: list[str]) -> tuple[Path, fidlib.ReferenceStats | None, bool]:
    """Where the reference statistics are, the statistics when they are ready to use, and whether to build them.

    eval.fid_reference="" means the cache next to the data, built on first use; an explicit path must exist
    unless fid_stats is among the jobs. Cached statistics must match the extractor, the image size and (when the
    training shards are readable) the shards' checksums, otherwise a FidError says how to rebuild them.
    """
    e = config.eval
    if e.fid_feature_extractor == "inception":
        fidlib.check_inception_weights(e.inception_path)
    build = "fid_stats" in jobs
    explicit = bool(e.fid_reference)
    try:
        manifest = _check_data(config, config.data.train_split)
    except DataError:
        if build or not explicit:
            raise
        manifest = None  # precomputed statistics can be used where the training shards are not mounted
    if explicit:
        path = Path(e.fid_reference).expanduser()
    else:
        path = fidlib.default_reference_path(
            config.data.path, config.data.train_split, e.fid_feature_extractor, config.model.image_size
        )
    if build or "fid" not in jobs:
        return path, None, build
    if not explicit and not path.is_file():
        return path, None, True  # the default cache next to the data: computed once, on first use
    expect = {"extractor": e.fid_feature_extractor, "image_size": config.model.image_size}
    if manifest is not None:
        expect["data_fingerprint"] = data_fingerprint(manifest)
    return path, fidlib.load_reference(path, expect), False  # FidError: missing, stale or other settings


def _denoise_std(config: RunConfig, noise: TrainingNoise) -> float:
    return config.eval.denoise_noise_std or noise.noise_std


def _plan_fid_samples(config: RunConfig, reference: fidlib.ReferenceStats | None) -> SampleSet:
    """eval.fid_samples: the existing images, of the reference's size and channels, and enough of them."""
    e, m = config.eval, config.model
    channels = reference.meta.get("channels", m.in_channels) if reference is not None else m.in_channels
    samples = find_sample_set(e.fid_samples, e.fid_samples_split, channels, m.image_size)
    if samples.num_images < e.fid_num_samples:
        raise ConfigError(
            f"eval.fid_samples={e.fid_samples} holds {samples.num_images} images, fewer than eval.fid_num_samples="
            f"{e.fid_num_samples}: set eval.fid_num_samples={samples.num_images} (FID depends on the count: compare "
            "scores of equal counts) or add samples"
        )
    return samples


def _check_sweep(config: RunConfig, fid_denoise_std: float | None) -> list[SweepPoint] | None:
    """eval.sweep's settings (validated with the eval section), or None when nothing is swept."""
    e = config.eval
    if not e.sweep.active:
        return None
    if e.sweep.denoise_step and fid_denoise_std is None:
        raise ConfigError(
            "eval.sweep.denoise_step is set but the FID samples are not denoised (eval.fid_denoise=false, or the "
            "checkpoint was trained without Gaussian noise): there is no Tweedie step to sweep"
        )
    # Each point differs from eval.decoding in its mode only, which Decoding.check does not depend on: the
    # pre-flight check of eval.decoding covers them all.
    return e.sweep.points(e.guidance, e.decoding, e.denoise_step)


def evaluate(
    config: RunConfig,
    checkpoint: Provenance,
    out_dir: str | Path,
    address: str | None = None,
    verbose: bool = False,
    argv: list[str] | None = None,
) -> dict[str, Any]:
    """Run config.eval.jobs on Ray workers and write OUT/metrics.json (+ PNG grids); returns the report."""
    start = time.perf_counter()
    e = config.eval
    jobs = [j for j in JOB_ORDER if j in e.jobs]
    out_dir = Path(out_dir)
    noise = checkpoint.noise
    model = load_model(checkpoint.path)  # strict: weights must match the embedded config

    # Every check that can fail before spending time on workers.
    denoise_std = _denoise_std(config, noise)
    if "denoise" in jobs and denoise_std <= 0:
        raise ConfigError(
            f"eval.jobs has denoise but the checkpoint was trained with data.noise={noise.noise} ({noise.source}): "
            "there is no Gaussian noise to remove; set eval.denoise_noise_std>0 to denoise anyway"
        )
    fid_denoise_std = denoise_std if (e.fid_denoise and denoise_std > 0) else None
    needs_data = bool({"bpd", "fid_stats", "fid"} & set(jobs))
    if needs_data and not config.data.path:
        raise ConfigError(
            f"eval.jobs {sorted(set(jobs) & {'bpd', 'fid_stats', 'fid'})} need data but data.path is empty: "
            f"{checkpoint.path} records no dataset (an imported checkpoint?); pass data.path=DATA"
        )
    if needs_data:
        config.data.path = resolve_data_path(config.data)  # builds the bundled set once, here, not per worker
    if "bpd" in jobs:
        _check_data(config, config.data.eval_split)
    reference_path, reference, build_reference = None, None, False
    if "fid" in jobs or "fid_stats" in jobs:
        reference_path, reference, build_reference = _plan_fid(config, jobs)
    samples, points = None, None
    if "fid" in jobs and e.fid_samples:
        samples = _plan_fid_samples(config, reference)
    elif "fid" in jobs:
        points = _check_sweep(config, fid_denoise_std)
    num_workers = config.cluster.num_workers  # the one knob: evaluation runs on the cluster's workers
    e.decoding.check(model, "cuda" if config.cluster.use_gpu else "cpu", key="eval.decoding.")
    out_dir.mkdir(parents=True, exist_ok=True)

    weights = model_fingerprint(model)

    def store_for(job: str, plan: dict) -> UnitStore:
        return UnitStore(out_dir, job, {"job": job, "weights": weights, **plan})

    started = init_ray(address or config.cluster.address, verbose)
    results: dict[str, Any] = {}
    try:
        pool = WorkerPool(model, config, num_workers, source=str(checkpoint.path))
        try:
            if "bpd" in jobs:
                results["bpd"], per_image = run_bpd(pool, config, noise, store_for)
                write_per_image(per_image, out_dir / "bpd_per_image.csv")
                results["bpd"]["per_image_file"] = str(out_dir / "bpd_per_image.csv")
            if "sample" in jobs or "denoise" in jobs:
                denoise = denoise_std if "denoise" in jobs else None
                sampled = run_sampling(pool, config, denoise, out_dir, store_for)
                results["sample"] = {k: v for k, v in sampled.items() if k != "denoise"}
                if "denoise" in jobs:
                    results["denoise"] = {**sampled["denoise"], "files": sampled["files"]}
            if build_reference:
                results["fid_stats"] = run_fid_stats(pool, config, reference_path, store_for)
            if "fid" in jobs:
                if reference is None:
                    reference = fidlib.load_reference(reference_path, {})
                if samples is not None:
                    results["fid"] = run_fid_samples(pool, config, samples, reference, reference_path, store_for)
                else:
                    results["fid"] = run_fid(
                        pool, config, fid_denoise_std, reference, reference_path, out_dir, store_for, points
                    )
        finally:
            pool.close()
        for job, result in results.items():  # the precision each job ran at (evaluation/precision.py)
            result["precision"] = job_precision(job, e, denoised=job == "denoise" or bool(result.get("denoised")))
        cluster = {
            "address": ray.get_runtime_context().gcs_address,
            "num_workers": num_workers,
            "worker_devices": pool.devices,
            "worker_startup_s": pool.startup_s,
            "workers_replaced": pool.replaced,
            "use_gpu": config.cluster.use_gpu,
            "cpus_per_worker": config.cluster.cpus_per_worker,
            "num_nodes": len([n for n in ray.nodes() if n.get("Alive")]),
        }
    finally:
        if started:
            ray.shutdown()
    check_finite_results(results, out_dir)  # a NaN would become null in metrics.json
    report = build_report(config, checkpoint, noise, results, cluster, time.perf_counter() - start, argv)
    report["metrics_file"] = str(out_dir / METRICS_FILE)
    write_report(report, out_dir / METRICS_FILE)
    write_tensorboard(report, out_dir)  # the same numbers and grids, viewable beside the training curves
    return report
