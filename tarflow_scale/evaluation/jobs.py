"""The evaluation jobs: each cuts its work into fixed units (index ranges or data parts), runs the missing ones on
the worker pool, and assembles the result from every unit in order, so the numbers do not depend on the workers."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..artifacts.provenance import TrainingNoise
from ..atomic import atomic_path
from ..config import EvalConfig, RunConfig
from ..data import DataError, read_manifest
from ..models.decoding import DecodingStats
from ..sampling import save_grid
from . import fid as fidlib
from .bpd import summarize
from .pool import Progress, WorkerPool
from .units import UnitStore

JOB_ORDER = ("bpd", "sample", "denoise", "fid_stats", "fid")  # fid_stats before fid: fid reads what it writes
# Data jobs cut a split into fixed index ranges (units): never tied to the worker count, so a re-run with other
# workers reuses the finished units and assembles the same numbers.
BPD_UNIT_IMAGES = 512
REFERENCE_UNIT_IMAGES = 8192  # a unit saves (D, D) float64 statistics: 32 MB for Inception
BPD_DESCRIPTIONS = {
    "dequantized": "bits/dim of the 8-bit held-out images: uniform dequantization x = (u + v)/128 - 1, "
    "v ~ U[0,1)^D, bpd = (E_v[-log p(x)] - D log(2/256)) / (D ln 2); an upper bound on the discrete NLL",
    "noisy_data_nll": "NOT a discrete-data bits/dim: -log p(x + sigma*eps) of the held-out images with the training "
    "Gaussian noise (sigma = training data.noise_std on [-1,1]) added, a continuous density, reported in bits per "
    "dimension on the 8-bit pixel scale (the same -D log(2/256) shift as the dequantized value)",
}


def _chunks(total: int, size: int) -> list[list[int]]:
    """Sample indices 0..total-1 in fixed chunks: the same chunks whatever the number of workers."""
    return [list(range(start, min(start + size, total))) for start in range(0, total, size)]


def data_fingerprint(manifest) -> str:
    """Identifies a split's content (its shards' checksums), wherever the copy lives."""
    return hashlib.sha256("\n".join(manifest.sha256).encode()).hexdigest()


PASSES_KEYS = ("passes", "calls")


def _passes_summary(units: list[dict[str, np.ndarray]], num_tokens: int) -> dict[str, Any] | None:
    """Mean model passes per block over every sampling call of a job (models/decoding.py DecodingStats.summary);
    None if its units were saved before passes were recorded."""
    if not units or any("passes" not in u for u in units):
        return None
    total = DecodingStats(num_tokens=num_tokens)
    for unit in units:
        total.merge(DecodingStats(dict(enumerate(unit["passes"].tolist())), calls=int(unit["calls"])))
    return total.summary()


def _run_units(
    pool: WorkerPool,
    store: UnitStore,
    method: str,
    names: list[str],
    items: list[tuple],
    progress: Progress,
    count: Callable[[Any], int],
    to_arrays: Callable[[Any], dict[str, Any]],
) -> list[dict[str, np.ndarray]]:
    """Load the finished units, compute the rest on the workers (each saved as it arrives); all, in unit order."""
    todo = [i for i, name in enumerate(names) if not store.done(name)]
    store.reused += len(names) - len(todo)
    if len(todo) < len(names):
        print(f"[{method}] {len(names) - len(todo)} of {len(names)} units already done in {store.folder}", flush=True)
    pool.map(
        method,
        [items[i] for i in todo],
        progress,
        count,
        on_result=lambda j, result: store.save(names[todo[j]], to_arrays(result)),
    )
    return [store.load(name) for name in names]


def run_bpd(
    pool: WorkerPool, config: RunConfig, noise: TrainingNoise, store_for: Callable[[str, dict], UnitStore]
) -> tuple[dict, dict[str, dict[str, float]]]:
    """Exact bits/dim over data.eval_split: every sample exactly once across workers (checked)."""
    split = config.data.eval_split
    manifest = read_manifest(config.data.path, split)
    n = manifest.num_samples
    num_parts = -(-n // BPD_UNIT_IMAGES)
    kinds = [("dequantized", "uniform", 0.0)]
    if noise.noise == "gaussian":
        kinds.append(("noisy_data_nll", "gaussian", noise.noise_std))
    e = config.eval
    store = store_for(
        "bpd",
        {"data": data_fingerprint(manifest), "split": split, "image_size": config.data.image_size, "kinds": kinds,
         "num_parts": num_parts, "draws": e.bpd_draws, "seed": e.seed, "batch_size": e.batch_size,
         "precision": e.bpd_precision},
    )  # fmt: skip
    progress = Progress("bpd", n, e.progress_every_s)
    names = [f"part_{p:06d}_of_{num_parts:06d}" for p in range(num_parts)]
    parts = _run_units(
        pool, store, "bpd_part", names, [(p, num_parts, kinds) for p in range(num_parts)], progress,
        lambda r: len(r["keys"]), lambda r: {"keys": np.array(r["keys"], dtype=str), **r["values"]},
    )  # fmt: skip
    parts = [{"keys": list(u["keys"]), "values": {name: u[name] for name, _, _ in kinds}} for u in parts]
    timing = {**progress.finish(), "units": store.summary()}
    keys = [k for r in parts for k in r["keys"]]
    if len(keys) != n or len(set(keys)) != n:
        raise DataError(
            f"bits/dim saw {len(keys)} images ({len(set(keys))} distinct) of the {n} in {manifest.name}/{split}: "
            "the exactly-once pass failed"
        )
    per_image: dict[str, dict[str, float]] = {}
    result: dict[str, Any] = {"split": split, "num_images": n, "draws": config.eval.bpd_draws, **timing}
    for name, kind, noise_std in kinds:
        values = np.concatenate([r["values"][name] for r in parts])
        result[name] = {
            **summarize(values),
            "noise": kind,
            "noise_std": noise_std,
            "description": BPD_DESCRIPTIONS[name],
        }
        for key, value in zip(keys, values.tolist()):
            per_image.setdefault(key, {})[name] = value
    if noise.noise == "gaussian":
        result["note"] = (
            f"the model was trained on Gaussian-noised data (sigma={noise.noise_std}): 'dequantized' is a valid but "
            "loose bound for it; 'noisy_data_nll' is the likelihood of the data it was trained on"
        )
    return result, per_image


def sampling_settings(e: EvalConfig) -> dict[str, Any]:
    """How sample k is drawn (eval.seed, eval.max_redraws, eval.guidance, eval.decoding): recorded in metrics.json
    and part of each sampling job's plan, so a changed setting starts fresh units."""
    return {
        "seed": e.seed, "max_redraws": e.max_redraws, "guidance": asdict(e.guidance), "decoding": asdict(e.decoding),
    }  # fmt: skip


def _sample_plan(e: EvalConfig, denoise_std: float | None) -> dict:
    plan = {"denoise_std": denoise_std, "step": e.denoise_step, "batch_size": e.batch_size}
    return {"settings": sampling_settings(e), **plan}


def run_sampling(
    pool: WorkerPool,
    config: RunConfig,
    denoise_std: float | None,
    out_dir: Path,
    store_for: Callable[[str, dict], UnitStore],
) -> dict[str, Any]:
    """eval.num_samples samples (and their Tweedie-denoised versions when denoise_std is given): grids + npz."""
    e = config.eval
    store = store_for("sample", _sample_plan(e, denoise_std))
    progress = Progress("sample", e.num_samples, e.progress_every_s)
    chunks = _chunks(e.num_samples, e.batch_size)
    items = [(c, e.guidance, e.decoding, denoise_std, e.denoise_step) for c in chunks]

    def to_arrays(r: dict) -> dict[str, Any]:
        out = {"indices": np.array(r["indices"]), "images": r["images"].numpy(), "redrawn": r["redrawn"]}
        out.update({k: r[k] for k in PASSES_KEYS})
        if r["labels"] is not None:
            out["labels"] = r["labels"].numpy()
        if "denoised" in r:
            out["denoised"] = r["denoised"].numpy()
        return out

    names = [f"chunk_{c[0]:09d}_{c[-1]:09d}" for c in chunks]
    units = _run_units(pool, store, "sample_chunk", names, items, progress, lambda r: len(r["indices"]), to_arrays)
    timing = {**progress.finish(), "units": store.summary()}
    results = [
        {"images": torch.from_numpy(u["images"]), "redrawn": int(u["redrawn"]),
         "labels": torch.from_numpy(u["labels"]) if "labels" in u else None,
         "denoised": torch.from_numpy(u["denoised"]) if "denoised" in u else None}
        for u in units
    ]  # fmt: skip
    images = torch.cat([r["images"] for r in results])
    arrays = {"indices": np.arange(e.num_samples), "images": images.numpy()}
    labels = [r["labels"] for r in results]
    if labels[0] is not None:
        arrays["labels"] = torch.cat(labels).numpy()
    files = {"grid": str(save_grid(images, out_dir / "samples.png"))}
    result: dict[str, Any] = {
        "num_samples": e.num_samples,
        "num_nonfinite_redrawn": sum(r["redrawn"] for r in results),
        "settings": sampling_settings(e),
        "decoding_passes": _passes_summary(units, config.model.num_tokens),
        **timing,
    }
    if denoise_std is not None:
        denoised = torch.cat([r["denoised"] for r in results])
        arrays["denoised"] = denoised.numpy()
        files["denoised_grid"] = str(save_grid(denoised, out_dir / "samples_denoised.png"))
        result["denoise"] = {
            "noise_std": denoise_std,
            "step": e.denoise_step,
            "rms_change": float((denoised - images).pow(2).mean().sqrt()),  # in the [-1, 1] pixel scale
        }
    with atomic_path(out_dir / "samples.npz", suffix=".npz") as tmp:
        np.savez(tmp, **arrays)
    result["files"] = {**files, "arrays": str(out_dir / "samples.npz")}
    return result


def reference_meta(config: RunConfig, manifest) -> dict[str, Any]:
    return {
        "extractor": config.eval.fid_feature_extractor,
        "image_size": config.model.image_size,
        "split": config.data.train_split,
        "data_fingerprint": data_fingerprint(manifest),
    }


def _stats_arrays(stats: fidlib.FeatureStats) -> dict[str, Any]:
    order = sorted(range(len(stats.kid_ids)), key=lambda i: stats.kid_ids[i])
    return {
        "num": stats.num,
        "mean": stats.mean if stats.num else np.zeros(0),
        "scatter": stats.scatter if stats.num else np.zeros((0, 0)),
        "kid_ids": np.array([stats.kid_ids[i] for i in order], dtype=str),
        "kid_features": stats.kid_matrix(),
    }


def _stats_from_arrays(u: dict[str, np.ndarray]) -> fidlib.FeatureStats:
    num = int(u["num"])
    if num == 0:
        return fidlib.FeatureStats()
    return fidlib.FeatureStats(num, u["mean"], u["scatter"], list(u["kid_ids"]), list(u["kid_features"]))


def run_fid_stats(
    pool: WorkerPool, config: RunConfig, path: Path, store_for: Callable[[str, dict], UnitStore]
) -> dict[str, Any]:
    """Reference statistics of every image of data.train_split (exactly once), cached at `path`."""
    split = config.data.train_split
    manifest = read_manifest(config.data.path, split)
    n = manifest.num_samples
    num_parts = -(-n // REFERENCE_UNIT_IMAGES)
    e = config.eval
    store = store_for(
        "fid_stats",
        {**reference_meta(config, manifest), "num_parts": num_parts, "kid_max": e.kid_max_features,
         "batch_size": e.batch_size, "data_image_size": config.data.image_size},
    )  # fmt: skip
    progress = Progress("fid_stats", n, e.progress_every_s)
    items = [(p, num_parts, split, n) for p in range(num_parts)]
    names = [f"part_{p:06d}_of_{num_parts:06d}" for p in range(num_parts)]
    units = _run_units(
        pool, store, "reference_part", names, items, progress, lambda r: r["count"],
        lambda r: _stats_arrays(r["stats"]),
    )  # fmt: skip
    timing = {**progress.finish(), "units": store.summary()}
    stats = fidlib.FeatureStats()
    for unit in units:  # merged in part order: the same floating-point result however the work was spread
        stats = stats.merge(_stats_from_arrays(unit))
    parts = [{"count": int(u["num"])} for u in units]
    if stats.num != n or sum(r["count"] for r in parts) != n:
        raise DataError(f"FID reference saw {stats.num} of the {n} images in {manifest.name}/{split}")
    fidlib.save_reference(path, stats, {**reference_meta(config, manifest), "data_path": config.data.path})
    return {"path": str(path), "num_images": n, "num_kid_features": len(stats.kid_ids), **timing}


def run_fid(
    pool: WorkerPool,
    config: RunConfig,
    denoise_std: float | None,
    reference: fidlib.ReferenceStats,
    reference_path: Path,
    out_dir: Path,
    store_for: Callable[[str, dict], UnitStore],
) -> dict[str, Any]:
    e = config.eval
    png_dir = str(out_dir / "fid_samples") if e.fid_save_png else None
    store = store_for(
        "fid",
        {**_sample_plan(e, denoise_std), "extractor": e.fid_feature_extractor},
    )
    progress = Progress("fid", e.fid_num_samples, e.progress_every_s)
    chunks = _chunks(e.fid_num_samples, e.batch_size)
    items = [(c, e.guidance, e.decoding, denoise_std, e.denoise_step, png_dir) for c in chunks]
    names = [f"chunk_{c[0]:09d}_{c[-1]:09d}" for c in chunks]
    units = _run_units(
        pool, store, "fid_chunk", names, items, progress, lambda r: r["count"],
        lambda r: {"indices": np.array(r["indices"]), "feats": r["feats"], "redrawn": r["redrawn"],
                   **{k: r[k] for k in PASSES_KEYS}},
    )  # fmt: skip
    timing = {**progress.finish(), "units": store.summary()}
    stats = fidlib.FeatureStats()
    for unit in units:  # streamed in sample order: exactly the same statistics however the work was spread
        indices = unit["indices"].tolist()
        stats.add(unit["feats"], indices, [i < e.kid_max_features for i in indices])
    results = [{"redrawn": int(u["redrawn"])} for u in units]
    metrics = fidlib.fid_and_kid(stats, reference, e.seed)
    result = {
        **metrics,
        "feature_extractor": e.fid_feature_extractor,
        "num_generated": stats.num,
        "num_reference": int(reference.meta.get("num", 0)),
        "reference": str(reference_path),
        "reference_meta": reference.meta,
        "denoised": denoise_std is not None,
        "denoise_noise_std": denoise_std,
        "num_nonfinite_redrawn": sum(r["redrawn"] for r in results),
        "settings": sampling_settings(e),
        "decoding_passes": _passes_summary(units, config.model.num_tokens),
        "protocol": fidlib.PROTOCOL,
        **timing,
    }
    if png_dir:
        result["png_dir"] = png_dir
    if e.fid_feature_extractor != "inception":
        result["warning"] = f"feature_extractor={e.fid_feature_extractor}: a pipeline test, these numbers are not FID"
    return result
