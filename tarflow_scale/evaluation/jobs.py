"""The evaluation jobs: each cuts its work into fixed units (index ranges or data parts), runs the missing ones on
the worker pool, and assembles the result from every unit in order, so the numbers do not depend on the workers."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..artifacts.provenance import TrainingNoise
from ..atomic import atomic_path
from ..config import EvalConfig, RunConfig, SweepPoint
from ..config.sweep import SWEPT
from ..data import DataError, read_manifest
from ..models.decoding import DecodingStats
from ..sampling import save_grid
from . import fid as fidlib
from .bpd import summarize
from .pool import Progress, WorkerPool
from .sample_sets import SampleSet
from .sweep import write_sweep_outputs
from .units import UnitStore
from .worker import GRID_SAMPLES

JOB_ORDER = ("bpd", "sample", "denoise", "fid_stats", "fid")  # fid_stats before fid: fid reads what it writes
# Data jobs cut a split into fixed index ranges (units): never tied to the worker count, so a re-run with other
# workers reuses the finished units and assembles the same numbers.
BPD_UNIT_IMAGES = 512
REFERENCE_UNIT_IMAGES = 8192  # a unit saves (D, D) float64 statistics: 32 MB for Inception
SAMPLES_UNIT_IMAGES = 2048  # fid_samples: about this many existing images per unit (16 KB of features each)
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
    """Mean model passes per block over every sampling call of a job (DecodingStats.summary, models/decoding/stats.py);
    None when a unit holds no pass counts."""
    if not units or any("passes" not in u for u in units):
        return None
    total = DecodingStats(num_tokens=num_tokens)
    for unit in units:
        total.merge(DecodingStats(dict(enumerate(unit["passes"].tolist())), calls=int(unit["calls"])))
    return total.summary()


@dataclass
class UnitSet:
    """The units of one job under one plan (one sweep setting): their store, names and work items."""

    store: UnitStore
    names: list[str]
    items: list[tuple]


def _compute_missing(
    pool: WorkerPool,
    method: str,
    sets: list[UnitSet],
    progress: Progress,
    count: Callable[[Any], int],
    to_arrays: Callable[[Any], dict[str, Any]],
) -> None:
    """Compute every unit not yet finished, of every set, in one pass over the workers (each saved as it arrives):
    a sweep's settings share the workers, which load the model once."""
    todo = [(u, i) for u in sets for i, name in enumerate(u.names) if not u.store.done(name)]
    for u in sets:
        reused = len(u.names) - sum(1 for v, _ in todo if v is u)
        u.store.reused += reused
        if reused:
            print(f"[{method}] {reused} of {len(u.names)} units already done in {u.store.folder}", flush=True)

    def save(j: int, result: Any) -> None:
        u, i = todo[j]
        u.store.save(u.names[i], to_arrays(result))

    pool.map(method, [u.items[i] for u, i in todo], progress, count, on_result=save)


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
    _compute_missing(pool, method, [UnitSet(store, names, items)], progress, count, to_arrays)
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
    meta = {**reference_meta(config, manifest), "channels": manifest.channels, "data_path": config.data.path}
    fidlib.save_reference(path, stats, meta)
    return {"path": str(path), "num_images": n, "num_kid_features": len(stats.kid_ids), **timing}


def _add_features(stats: fidlib.FeatureStats, feats: np.ndarray, indices: list[int], kid_max_features: int) -> None:
    stats.add(feats, indices, [i < kid_max_features for i in indices])


def _fid_common(
    config: RunConfig, reference: fidlib.ReferenceStats, reference_path: Path, denoise_std: float | None
) -> dict[str, Any]:
    """What every FID result records about how it was scored."""
    e = config.eval
    common = {
        "feature_extractor": e.fid_feature_extractor,
        "num_reference": int(reference.meta.get("num", 0)),
        "reference": str(reference_path),
        "reference_meta": reference.meta,
        "denoised": denoise_std is not None,
        "denoise_noise_std": denoise_std,
        "protocol": fidlib.PROTOCOL,
    }
    if e.fid_feature_extractor != "inception":
        common["warning"] = f"feature_extractor={e.fid_feature_extractor}: a pipeline test, these numbers are not FID"
    return common


def _score_setting(
    config: RunConfig, e: EvalConfig, units: UnitSet, reference: fidlib.ReferenceStats
) -> tuple[dict[str, Any], np.ndarray | None]:
    """FID/KID of one setting from its units, streamed in sample order (exactly the same statistics however the
    work was spread), and the pixels of its first GRID_SAMPLES samples (None from units saved without them)."""
    stats = fidlib.FeatureStats()
    passes, redrawn, seconds, grid = [], 0, [], []
    for name in units.names:  # one unit in memory at a time: a sweep holds S x 50k features otherwise
        unit = units.store.load(name)
        _add_features(stats, unit["feats"], unit["indices"].tolist(), e.kid_max_features)
        passes.append({k: unit[k] for k in PASSES_KEYS if k in unit})
        redrawn += int(unit["redrawn"])
        seconds.append(float(unit["seconds"]) if "seconds" in unit else None)
        if unit["indices"][0] < GRID_SAMPLES:
            grid.append(unit.get("grid"))
    busy = None if None in seconds else sum(seconds)
    result = {
        **fidlib.fid_and_kid(stats, reference, e.seed),
        "num_generated": stats.num,
        "num_nonfinite_redrawn": redrawn,
        "settings": sampling_settings(e),
        "decoding_passes": _passes_summary(passes, config.model.num_tokens),
        # Worker-seconds spent on this setting's units (recorded in each unit, so a resumed run keeps them).
        "images_per_s_per_worker": stats.num / busy if busy else None,
        "units": units.store.summary(),
    }
    return result, (None if any(g is None for g in grid) else np.concatenate(grid))


def run_fid(
    pool: WorkerPool,
    config: RunConfig,
    denoise_std: float | None,
    reference: fidlib.ReferenceStats,
    reference_path: Path,
    out_dir: Path,
    store_for: Callable[[str, dict], UnitStore],
    points: list[SweepPoint] | None = None,
) -> dict[str, Any]:
    """FID and KID of eval.fid_num_samples generated samples, under each sampling setting of `points` (a sweep;
    None: the eval section's own setting). Sample k has the same seed under every setting. Each setting's units
    are planned exactly as a single-setting run of it, so runs and sweeps reuse each other's finished units."""
    e = config.eval
    sweep = points is not None
    points = points or [SweepPoint(e.guidance, e.decoding, e.denoise_step)]
    swept = e.sweep.swept() if sweep else []
    chunks = _chunks(e.fid_num_samples, e.batch_size)
    names = [f"chunk_{c[0]:09d}_{c[-1]:09d}" for c in chunks]
    settings, sets = [], []
    for point in points:
        pe = replace(e, guidance=point.guidance, decoding=point.decoding, denoise_step=point.denoise_step)
        png_dir = None
        if e.fid_save_png:  # a sweep: one folder per setting, named by its swept values
            folder = out_dir / "fid_samples"
            png_dir = str(folder / point.label(swept).replace(" ", "_") if sweep else folder)
        store = store_for("fid", {**_sample_plan(pe, denoise_std), "extractor": e.fid_feature_extractor})
        items = [(c, point.guidance, point.decoding, denoise_std, point.denoise_step, png_dir) for c in chunks]
        settings.append((pe, png_dir))
        sets.append(UnitSet(store, names, items))
    progress = Progress("fid", e.fid_num_samples * len(points), e.progress_every_s)
    _compute_missing(
        pool, "fid_chunk", sets, progress, lambda r: r["count"],
        lambda r: {"indices": np.array(r["indices"]), "feats": r["feats"], "redrawn": r["redrawn"],
                   "grid": r["grid"], "seconds": r["seconds"], **{k: r[k] for k in PASSES_KEYS}},
    )  # fmt: skip
    timing = progress.finish()
    common = _fid_common(config, reference, reference_path, denoise_std)
    rows, grids = [], []
    for point, (pe, png_dir), units in zip(points, settings, sets):
        row, grid = _score_setting(config, pe, units, reference)
        if png_dir:
            row["png_dir"] = png_dir
        rows.append({"setting": point.values(), **row} if sweep else row)
        grids.append(grid)
    if not sweep:
        return {**rows[0], **common, **timing}
    summary = {
        "swept": swept,
        "values": {name: list(getattr(e.sweep, key)) for key, name in SWEPT.items() if getattr(e.sweep, key)},
        "num_settings": len(points),
        "rows": rows,
    }
    summary.update(write_sweep_outputs(rows, swept, grids, out_dir, e.fid_feature_extractor))
    return {"sweep": summary, "num_generated_per_setting": e.fid_num_samples, **common, **timing}


def fid_samples_unit_images(batch_size: int) -> int:
    """Images per unit of the fid_samples job: a multiple of eval.batch_size, so the workers featurise the same
    batches as the generating fid job's chunks and the statistics are summed identically."""
    return batch_size * max(1, SAMPLES_UNIT_IMAGES // batch_size)


def run_fid_samples(
    pool: WorkerPool,
    config: RunConfig,
    samples: SampleSet,
    reference: fidlib.ReferenceStats,
    reference_path: Path,
    store_for: Callable[[str, dict], UnitStore],
) -> dict[str, Any]:
    """FID and KID of the first eval.fid_num_samples images of an existing sample set (eval.fid_samples), each
    exactly once (checked), in the set's order; nothing is generated."""
    e = config.eval
    n = e.fid_num_samples
    size = fid_samples_unit_images(e.batch_size)
    ranges = [(start, min(start + size, n)) for start in range(0, n, size)]
    store = store_for(
        "fid_samples",
        {"samples": samples.fingerprint, "format": samples.kind, "split": samples.split, "num": n,
         "unit_images": size, "batch_size": e.batch_size, "extractor": e.fid_feature_extractor},
    )  # fmt: skip
    names = [f"images_{a:09d}_{b - 1:09d}" for a, b in ranges]
    progress = Progress("fid", n, e.progress_every_s)
    _compute_missing(
        pool, "fid_samples_chunk", [UnitSet(store, names, [(samples.range(a, b),) for a, b in ranges])], progress,
        lambda r: r["count"], lambda r: {"indices": np.array(r["indices"]), "feats": r["feats"]},
    )  # fmt: skip
    timing = {**progress.finish(), "units": store.summary()}
    stats, seen = fidlib.FeatureStats(), []
    for name in names:  # in eval.batch_size slices: the additions the generating fid job makes, chunk by chunk
        unit = store.load(name)
        indices, feats = unit["indices"].tolist(), unit["feats"]
        if len(feats) != len(indices):
            raise DataError(f"{samples.path}: a unit read {len(feats)} images for {len(indices)} indices")
        for i in range(0, len(indices), e.batch_size):
            _add_features(stats, feats[i : i + e.batch_size], indices[i : i + e.batch_size], e.kid_max_features)
        seen += indices
    if seen != list(range(n)):
        raise DataError(f"{samples.path}: scored {len(seen)} images ({len(set(seen))} distinct) of {n}")
    return {
        **fidlib.fid_and_kid(stats, reference, e.seed),
        "num_generated": stats.num,
        "samples": {**samples.describe(), "num_scored": n},
        **_fid_common(config, reference, reference_path, None),
        "denoised": None,
        "note": "eval.fid_samples: existing images were scored; eval.guidance, eval.decoding, eval.denoise_step and "
        "eval.fid_denoise were not used (nothing was sampled)",
        **timing,
    }
