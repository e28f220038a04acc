"""Evaluation jobs spread over Ray workers: each worker (an actor, one GPU on a cluster) loads the model once;
the driver splits index ranges or data parts among them, gathers the results and writes the report.

The only module of the evaluation that imports Ray; the maths lives in bpd, generate, denoise and fid.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from .. import atomic
from ..atomic import atomic_path
from ..checkpoint import load_model
from ..config import ConfigError, RunConfig, TarFlowConfig, from_dict, to_dict
from ..data import DataError, check_shard_sizes, make_eval_loader, read_manifest, resolve_data_path
from ..models.decoding import DecodingStats
from ..models.tarflow import TarFlow
from ..sampling import save_grid, to_uint8
from . import fid as fidlib
from .bpd import batch_bits_per_dim, summarize
from .denoise import tweedie_denoise
from .generate import SampleSettings, generate
from .report import build_report, write_report, write_tensorboard
from .resolve import CheckpointInfo, TrainingNoise, training_noise
from .units import UnitStore, model_fingerprint

JOB_ORDER = ("bpd", "sample", "denoise", "fid_stats", "fid")  # fid_stats before fid: fid reads what it writes
# Data jobs cut a split into fixed index ranges (units): never tied to the worker count, so a re-run with other
# workers reuses the finished units and assembles the same numbers.
BPD_UNIT_IMAGES = 512
REFERENCE_UNIT_IMAGES = 8192  # a unit saves (D, D) float64 statistics: 32 MB for Inception
METRICS_FILE = "metrics.json"
BPD_DESCRIPTIONS = {
    "dequantized": "bits/dim of the 8-bit held-out images: uniform dequantization x = (u + v)/128 - 1, "
    "v ~ U[0,1)^D, bpd = (E_v[-log p(x)] - D log(2/256)) / (D ln 2); an upper bound on the discrete NLL",
    "noisy_data_nll": "NOT a discrete-data bits/dim: -log p(x + sigma*eps) of the held-out images with the training "
    "Gaussian noise (sigma = training data.noise_std on [-1,1]) added, a continuous density, reported in bits per "
    "dimension on the 8-bit pixel scale (the same -D log(2/256) shift as the dequantized value)",
}


# ----------------------------------------------------------------------------------------------------------
# Driver-side helpers


class Progress:
    """Periodic progress lines on the driver: done/total, rate and ETA."""

    def __init__(self, name: str, total: int, every_s: float, unit: str = "images", stream=None):
        self.name, self.total, self.every_s, self.unit = name, total, every_s, unit
        self.stream = stream or sys.stdout
        self.done = 0
        self.start = self.last = time.perf_counter()
        self._print(f"[{name}] started: {total} {unit}")

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every_s and self.done < self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            self._print(
                f"[{self.name}] {self.done}/{self.total} {self.unit} ({100 * self.done / self.total:.0f}%), "
                f"{rate:.1f} {self.unit}/s, ETA {eta:.0f}s"
            )

    def finish(self) -> dict[str, float]:
        seconds = time.perf_counter() - self.start
        rate = self.done / max(seconds, 1e-9)
        self._print(f"[{self.name}] done: {self.done} {self.unit} in {seconds:.1f}s ({rate:.1f} {self.unit}/s)")
        return {"seconds": seconds, f"{self.unit}_per_s": rate}


def init_ray(address: str | None) -> bool:
    """Join `address`, else RAY_ADDRESS, else start an embedded local cluster; True when this call started Ray."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    ray.init(address=address, log_to_driver=True)
    return True


def _chunks(total: int, size: int) -> list[list[int]]:
    """Sample indices 0..total-1 in fixed chunks: the same chunks whatever the number of workers."""
    return [list(range(start, min(start + size, total))) for start in range(0, total, size)]


def _data_fingerprint(manifest) -> str:
    """Identifies a split's content (its shards' checksums), wherever the copy lives."""
    return hashlib.sha256("\n".join(manifest.sha256).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Worker


class EvalWorker:
    """One evaluation worker (a Ray actor): the model and, on demand, the feature network, loaded once."""

    def __init__(self, payload: dict, config: dict, use_gpu: bool, threads: int):
        torch.set_num_threads(max(1, threads))
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.config: RunConfig = from_dict(RunConfig, config)
        model = TarFlow(from_dict(TarFlowConfig, payload["model_config"]))
        model.load_state_dict(payload["state"], strict=True)
        self.model = model.to(self.device).eval()
        self._extractor = None

    def ready(self) -> str:
        """Returns once the model is loaded (so job timings exclude start-up); names the device."""
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return f"{name}, {torch.get_num_threads()} threads"

    def _labels(self, labels: torch.Tensor, keys: list[str]) -> torch.Tensor | None:
        num_classes = self.model.config.num_classes
        if not num_classes:
            return None
        bad = ((labels < 0) | (labels >= num_classes)).nonzero().flatten().tolist()
        if bad:
            raise DataError(
                f"sample {keys[bad[0]]!r} has label {int(labels[bad[0]])}, outside the model's {num_classes} classes"
            )
        return labels

    def bpd_part(self, part: int, num_parts: int, kinds: list[tuple[str, str, float]]) -> dict[str, Any]:
        """Per-image bits/dim of the samples with global index in part `part` of `num_parts` of data.eval_split."""
        c = self.config
        loader = make_eval_loader(c.data, c.eval.batch_size, part, num_parts)
        keys: list[str] = []
        values: dict[str, list[np.ndarray]] = {name: [] for name, _, _ in kinds}
        for images, labels, batch_keys in loader:
            y = self._labels(labels, batch_keys)
            for name, kind, noise_std in kinds:
                bpd = batch_bits_per_dim(
                    self.model, images.to(self.device), y, batch_keys,
                    kind=kind, noise_std=noise_std, num_draws=c.eval.bpd_draws, seed=c.eval.seed,
                )  # fmt: skip
                values[name].append(bpd.cpu().numpy())
            keys += batch_keys
        return {"keys": keys, "values": {k: np.concatenate(v) if v else np.zeros(0) for k, v in values.items()}}

    def sample_chunk(
        self, indices: list[int], settings: SampleSettings, denoise_std: float | None, step: float
    ) -> dict[str, Any]:
        stats = DecodingStats()
        images, labels, redrawn = generate(self.model, indices, settings, stats)
        out = {"indices": indices, "images": images.float().cpu(), "redrawn": redrawn, **_passes_arrays(stats)}
        out["labels"] = None if labels is None else labels.cpu()
        if denoise_std is not None:
            batch = self.config.eval.denoise_batch_size
            out["denoised"] = tweedie_denoise(self.model, images, denoise_std, labels, step, batch).float().cpu()
        return out

    def _feature_network(self):
        if self._extractor is None:
            e = self.config.eval
            self._extractor = fidlib.build_extractor(e.fid_feature_extractor, self.device, e.inception_path)
        return self._extractor

    def fid_chunk(
        self,
        indices: list[int],
        settings: SampleSettings,
        denoise_std: float | None,
        step: float,
        png_dir: str | None,
    ) -> dict[str, Any]:
        """Generate, (denoise), quantise and featurise samples `indices`: their features, one unit of the FID job
        (about 8 KB per sample for Inception; the driver saves them and streams them into the statistics)."""
        stats = DecodingStats()
        images, labels, redrawn = generate(self.model, indices, settings, stats)
        if denoise_std is not None:
            images = tweedie_denoise(self.model, images, denoise_std, labels, step, self.config.eval.denoise_batch_size)
        pixels = to_uint8(images).cpu()  # (B, C, H, W): exactly what a PNG of the sample holds
        if png_dir:
            _write_pngs(pixels, indices, png_dir)
        feats = fidlib.extract_features(pixels, self._feature_network(), self.device)
        return {
            "indices": indices, "feats": np.asarray(feats), "redrawn": redrawn, "count": len(indices),
            **_passes_arrays(stats),
        }  # fmt: skip

    def reference_part(self, part: int, num_parts: int, split: str, num_reference: int) -> dict[str, Any]:
        """Feature statistics of the real images in part `part` of `num_parts` of `split` (one unit of fid_stats)."""
        c = self.config
        stats = fidlib.FeatureStats()
        count = 0
        for images, _, keys in make_eval_loader(c.data, c.eval.batch_size, part, num_parts, split=split):
            feats = fidlib.extract_features(images, self._feature_network(), self.device)
            keep = [fidlib.keep_reference_for_kid(k, num_reference, c.eval.kid_max_features) for k in keys]
            stats.add(feats, ids=keys, keep=keep)
            count += len(keys)
        return {"count": count, "stats": stats}


def _write_pngs(pixels: torch.Tensor, indices: list[int], folder: str) -> None:
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for image, index in zip(pixels, indices):
        array = image.permute(1, 2, 0).numpy()
        with atomic_path(os.path.join(folder, f"{index:06d}.png"), suffix=".png") as tmp:
            Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(tmp)


class WorkerPool:
    """N EvalWorker actors; work items go to whichever worker is free, and a lost worker is replaced.

    A worker that dies (its process or its node) loses only the item it was running: the item goes back to the
    queue and a new actor is started wherever the cluster has room. Errors raised by the work itself (DataError,
    FidError, ...) are not retried: they would repeat.
    """

    MAX_REPLACEMENTS_PER_WORKER = 3  # then the cluster is failing, not occasionally losing a node

    def __init__(self, model: TarFlow, config: RunConfig, num_workers: int):
        cluster = config.cluster
        need = {"CPU": num_workers * cluster.cpus_per_worker, "GPU": num_workers if cluster.use_gpu else 0}
        have = ray.cluster_resources()
        short = {k: (v, have.get(k, 0)) for k, v in need.items() if v > have.get(k, 0)}
        if short:
            detail = ", ".join(f"{v} {k} needed, {h:g} in the cluster" for k, (v, h) in short.items())
            raise ConfigError(
                f"{num_workers} evaluation workers do not fit the Ray cluster ({detail}); lower "
                "cluster.num_workers or cluster.cpus_per_worker"
            )
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        # One copy of the weights in the object store; every worker builds its model from it (no shared FS needed).
        self._payload = ray.put({"model_config": to_dict(model.config), "state": state})
        # SPREAD: one lost node takes as few workers as possible with it.
        self._actor = ray.remote(EvalWorker).options(
            num_cpus=cluster.cpus_per_worker, num_gpus=1 if cluster.use_gpu else 0, scheduling_strategy="SPREAD"
        )
        self._args = (to_dict(config), cluster.use_gpu, cluster.cpus_per_worker)
        self.actors = [self._new_actor() for _ in range(num_workers)]
        start = time.perf_counter()
        try:
            self.devices = ray.get([a.ready.remote() for a in self.actors])
        except ray.exceptions.RayActorError as e:
            raise RuntimeError(f"an evaluation worker failed to start: {e}") from e
        self.startup_s = time.perf_counter() - start
        self.size = num_workers
        self.replaced = 0  # workers lost and replaced during this evaluation

    def _new_actor(self):
        return self._actor.remote(self._payload, *self._args)

    def map(
        self,
        method: str,
        items: list[tuple],
        progress: Progress,
        count: Callable[[Any], int],
        on_result: Callable[[int, Any], None] | None = None,
    ) -> list[Any]:
        """Run `method(*item)` for every item; `on_result(i, result)` runs on the driver as each one finishes
        (it saves the unit). Returns the results in item order."""
        from collections import deque

        results: list[Any] = [None] * len(items)
        queue = deque(range(len(items)))
        idle = list(self.actors)
        running: dict[Any, tuple[Any, int]] = {}  # ref -> (actor, item index)
        starting: dict[Any, Any] = {}  # ready() ref -> replacement actor
        while queue or running:
            while idle and queue:
                actor, i = idle.pop(), queue.popleft()
                running[getattr(actor, method).remote(*items[i])] = (actor, i)
            if not running and not starting:
                raise RuntimeError(f"every evaluation worker was lost; {len(queue)} {method} items left")
            ready, _ = ray.wait([*running, *starting], num_returns=1)
            ref = ready[0]
            if ref in starting:
                actor = starting.pop(ref)
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError:
                    self._replace(actor, starting, reason="its replacement failed to start")
                    continue
                idle.append(actor)
                continue
            actor, i = running.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                raise e.as_instanceof_cause() from None  # the worker's own exception type (DataError, FidError, ...)
            except ray.exceptions.RayActorError as e:  # the process or its node is gone: redo its item elsewhere
                print(f"[{method}] an evaluation worker was lost ({type(e).__name__}); redoing its unit", flush=True)
                queue.appendleft(i)
                self._replace(actor, starting, reason=str(e))
                continue
            if on_result is not None:
                on_result(i, result)
            progress.update(count(result))
            results[i] = result
            idle.append(actor)
        return results

    def _replace(self, actor, starting: dict, reason: str) -> None:
        self.replaced += 1
        if self.replaced > self.MAX_REPLACEMENTS_PER_WORKER * self.size:
            raise RuntimeError(f"{self.replaced} evaluation workers lost; the last: {reason}")
        self.actors = [a for a in self.actors if a is not actor]
        with contextlib.suppress(Exception):
            ray.kill(actor)
        new = self._new_actor()
        self.actors.append(new)
        starting[new.ready.remote()] = new

    def close(self) -> None:
        for a in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(a)


# ----------------------------------------------------------------------------------------------------------
# Jobs


PASSES_KEYS = ("passes", "calls")


def _passes_arrays(stats: DecodingStats) -> dict[str, Any]:
    """A unit's decoding statistics as arrays: passes per block (index = block, forward order) and calls."""
    return {"passes": np.array([stats.passes[k] for k in range(len(stats.passes))]), "calls": stats.calls}


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
        {"data": _data_fingerprint(manifest), "split": split, "image_size": config.data.image_size, "kinds": kinds,
         "num_parts": num_parts, "draws": e.bpd_draws, "seed": e.seed, "batch_size": e.batch_size},
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


def _sample_plan(settings: SampleSettings, denoise_std: float | None, step: float, batch_size: int) -> dict:
    return {"settings": asdict(settings), "denoise_std": denoise_std, "step": step, "batch_size": batch_size}


def run_sampling(
    pool: WorkerPool,
    config: RunConfig,
    settings: SampleSettings,
    denoise_std: float | None,
    out_dir: Path,
    store_for: Callable[[str, dict], UnitStore],
) -> dict[str, Any]:
    """eval.num_samples samples (and their Tweedie-denoised versions when denoise_std is given): grids + npz."""
    e = config.eval
    store = store_for("sample", _sample_plan(settings, denoise_std, e.denoise_step, e.batch_size))
    progress = Progress("sample", e.num_samples, e.progress_every_s)
    chunks = _chunks(e.num_samples, e.batch_size)
    items = [(c, settings, denoise_std, e.denoise_step) for c in chunks]

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
        "settings": asdict(settings),
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
        "data_fingerprint": _data_fingerprint(manifest),
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
    settings: SampleSettings,
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
        {**_sample_plan(settings, denoise_std, e.denoise_step, e.batch_size), "extractor": e.fid_feature_extractor},
    )
    progress = Progress("fid", e.fid_num_samples, e.progress_every_s)
    chunks = _chunks(e.fid_num_samples, e.batch_size)
    items = [(c, settings, denoise_std, e.denoise_step, png_dir) for c in chunks]
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
        "settings": asdict(settings),
        "decoding_passes": _passes_summary(units, config.model.num_tokens),
        "protocol": fidlib.PROTOCOL,
        **timing,
    }
    if png_dir:
        result["png_dir"] = png_dir
    if e.fid_feature_extractor != "inception":
        result["warning"] = f"feature_extractor={e.fid_feature_extractor}: a pipeline test, these numbers are not FID"
    return result


# ----------------------------------------------------------------------------------------------------------
# Planning (all checks before Ray starts) and the whole evaluation


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
        expect["data_fingerprint"] = _data_fingerprint(manifest)
    return path, fidlib.load_reference(path, expect), False  # FidError: missing, stale or other settings


def _denoise_std(config: RunConfig, noise: TrainingNoise) -> float:
    return config.eval.denoise_noise_std or noise.noise_std


def evaluate(
    config: RunConfig,
    checkpoint: CheckpointInfo,
    out_dir: str | Path,
    address: str | None = None,
    argv: list[str] | None = None,
) -> dict[str, Any]:
    """Run config.eval.jobs on Ray workers and write OUT/metrics.json (+ PNG grids); returns the report."""
    start = time.perf_counter()
    e = config.eval
    jobs = [j for j in JOB_ORDER if j in e.jobs]
    out_dir = Path(out_dir)
    noise = training_noise(checkpoint)
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
    num_workers = config.cluster.num_workers  # the one knob (eval.num_workers was removed)
    settings = SampleSettings.from_eval_config(e)
    bad_blocks = [k for k in e.decoding_sequential_blocks if k >= model.config.num_blocks]
    if bad_blocks:
        raise ConfigError(
            f"eval.decoding_sequential_blocks {bad_blocks} out of range: the checkpoint has "
            f"model.num_blocks={model.config.num_blocks}"
        )
    if e.decoding_cuda_graph and not config.cluster.use_gpu:
        raise ConfigError("eval.decoding_cuda_graph=true needs GPU workers (cluster.use_gpu=true)")
    if e.decoding_cuda_graph and not model.blocks[0].transform.closed_form_inverse:
        raise ConfigError(
            f"eval.decoding_cuda_graph=true needs a closed-form token inverse; model.transform="
            f"{model.config.transform} inverts by iteration (use eval.decoding_compile=true instead)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)

    weights = model_fingerprint(model)

    def store_for(job: str, plan: dict) -> UnitStore:
        return UnitStore(out_dir, job, {"job": job, "weights": weights, **plan})

    started = init_ray(address or config.cluster.address)
    results: dict[str, Any] = {}
    try:
        pool = WorkerPool(model, config, num_workers)
        try:
            if "bpd" in jobs:
                results["bpd"], per_image = run_bpd(pool, config, noise, store_for)
                _write_per_image(per_image, out_dir / "bpd_per_image.csv")
                results["bpd"]["per_image_file"] = str(out_dir / "bpd_per_image.csv")
            if "sample" in jobs or "denoise" in jobs:
                denoise = denoise_std if "denoise" in jobs else None
                sampled = run_sampling(pool, config, settings, denoise, out_dir, store_for)
                results["sample"] = {k: v for k, v in sampled.items() if k != "denoise"}
                if "denoise" in jobs:
                    results["denoise"] = {**sampled["denoise"], "files": sampled["files"]}
            if build_reference:
                results["fid_stats"] = run_fid_stats(pool, config, reference_path, store_for)
            if "fid" in jobs:
                if reference is None:
                    reference = fidlib.load_reference(reference_path, {})
                results["fid"] = run_fid(
                    pool, config, settings, fid_denoise_std, reference, reference_path, out_dir, store_for
                )
        finally:
            pool.close()
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
    report = build_report(config, checkpoint, noise, results, cluster, time.perf_counter() - start, argv)
    report["metrics_file"] = str(out_dir / METRICS_FILE)
    write_report(report, out_dir / METRICS_FILE)
    write_tensorboard(report, out_dir)  # the same numbers and grids, viewable beside the training curves
    return report


def _write_per_image(per_image: dict[str, dict[str, float]], path: Path) -> None:
    """key,<metric>... one row per held-out image, sorted by key: paired comparisons between checkpoints."""
    names = sorted({n for row in per_image.values() for n in row})
    lines = ["key," + ",".join(names)]
    lines += [key + "," + ",".join(repr(per_image[key][n]) for n in names) for key in sorted(per_image)]
    atomic.write_text(path, "\n".join(lines) + "\n")
