"""Sampling to WebDataset shards on a Ray worker pool (`tarflow-sample --format shards`), exactly once and resumable.

Indices 0..N-1 are cut into fixed shards (shard i holds [i S, (i+1) S)); each worker draws and packs whole shards
(shard_worker.py) and the driver writes each one atomically (temp name, fsync, rename), so a shard file exists only
complete. The folder records its settings and the model's fingerprint in `.sampling.json` on the first run: a
re-run with the same ones writes only the missing shards (after a crash, Ctrl-C or a lost node), one with other
settings is refused naming them. Once every shard exists, each is checked to hold exactly its indices and the
manifest (`train.json`, tarflow-data's format: `tarflow-data verify DIR`, training and FID read it) is written.

It lives beside the evaluation because it is the evaluation's sampling with another sink: the same worker pool
(which replaces lost workers), the same per-index generation with counted redraws, the same model fingerprint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import tarfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import atomic_path, write_text
from ..config import ClusterConfig, ConfigError, RunConfig, flatten, to_dict
from ..data.manifest import DataError, Manifest, manifest_name, tar_keys, write_manifest
from ..data.shards import brace_pattern, shard_names
from ..models.decoding import DecodingStats
from ..models.tarflow import TarFlow
from .shard_worker import SHARD_NAME, SHARD_SPLIT, ShardSampling, ShardWorker, sample_key
from .units import model_fingerprint

SETTINGS_FILE = ".sampling.json"  # hidden: `tarflow-data verify` reads every *.json as a manifest
SETTINGS_VERSION = 1


class SettingsMismatch(ConfigError):
    """The output folder holds shards drawn with other settings (or another model); the message names each."""


@dataclass
class ShardReport:
    """What a call of `sample_to_shards` did: for the closing line and the benchmark."""

    out_dir: Path
    manifest: Path
    pattern: str  # the shards, brace-expandable
    num_samples: int
    num_shards: int
    shards_reused: int  # complete before this call
    images_sampled: int  # by this call
    seconds: float  # the sampling itself: from the first shard handed out to the last one written
    startup_s: float  # joining Ray and starting the workers
    num_workers: int
    worker_devices: list[str] = field(default_factory=list)
    workers_replaced: int = 0
    redrawn: int = 0  # non-finite samples redrawn by this call
    decoding_passes: dict[str, Any] | None = None

    @property
    def images_per_s(self) -> float:
        return self.images_sampled / max(self.seconds, 1e-9)


def settings_record(spec: ShardSampling, model: TarFlow, model_sha256: str) -> dict[str, Any]:
    """What `.sampling.json` stores and a re-run must repeat: the settings, the model's config and weights."""
    return json.loads(
        json.dumps({"model_sha256": model_sha256, "model": to_dict(model.config), **spec.record()}, default=str)
    )


def _differences(stored: dict[str, Any], wanted: dict[str, Any], names: Mapping[str, str]) -> list[str]:
    """`--guidance: 1.0 there, 2.0 now`, one per differing setting (model keys collapse into one line)."""
    old, new = flatten(stored), flatten(wanted)
    lines, model_differs = [], False
    for key in sorted(set(old) | set(new)):
        if old.get(key, "(unset)") == new.get(key, "(unset)"):
            continue
        if key == "model_sha256" or key.startswith("model."):
            model_differs = True
            continue
        name = names.get(key, key)
        lines.append(f"{name}: {json.dumps(old.get(key, '(unset)'))} there, {json.dumps(new.get(key, '(unset)'))} now")
    if model_differs:
        lines.insert(0, f"{names.get('model', 'the model')}: other weights or architecture")
    return lines


def claim_folder(
    out_dir: Path, record: dict[str, Any], checkpoint: str, names: Mapping[str, str] | None = None
) -> bool:
    """Make `out_dir` the home of shards with these settings: record them on the first run; on a re-run refuse
    other settings (SettingsMismatch naming each, through `names`: dotted key -> how the user sets it) and
    shards or a manifest that no tarflow-sample run recorded. Returns whether the folder was claimed before.
    The caller holds the folder's lock (run_lock), so no other process writes into it."""
    names = names or {}
    path = out_dir / SETTINGS_FILE
    label = names.get("out", str(out_dir))
    if path.is_file():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            settings = stored["settings"]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(
                f"{path}: unreadable settings record ({e}); delete {out_dir} or choose another folder"
            ) from None
        differences = _differences(settings, record, names)
        if differences:
            raise SettingsMismatch(
                f"{label} holds samples drawn with other settings (recorded in {path}): {'; '.join(differences)}. "
                "Re-run with the recorded settings to resume, or choose another folder"
            )
        return True
    foreign = sorted(out_dir.glob(f"{SHARD_NAME}-{SHARD_SPLIT}-*.tar"))
    if foreign or (out_dir / manifest_name(SHARD_SPLIT)).exists():
        found = foreign[0] if foreign else out_dir / manifest_name(SHARD_SPLIT)
        raise DataError(
            f"{label} already holds {found.name} but no {SETTINGS_FILE}: these are not shards of a tarflow-sample "
            "run; choose another folder"
        )
    write_text(path, json.dumps({"version": SETTINGS_VERSION, "checkpoint": checkpoint, "settings": record},
                                indent=1, sort_keys=True) + "\n")  # fmt: skip
    return False


def _remove_orphan_temps(out_dir: Path) -> None:
    """Temp files of a killed run (`.samples-train-000003.tar.PID.tmp`, a half-written manifest): the caller holds
    the folder's lock and only the driver writes, so none of them belongs to a live writer."""
    for pattern in (f".{SHARD_NAME}-{SHARD_SPLIT}-*.tmp", f".{manifest_name(SHARD_SPLIT)}.*.tmp"):
        for path in out_dir.glob(pattern):
            path.unlink(missing_ok=True)


def _keys_of(path: Path, data: bytes) -> list[str]:
    """The distinct sample keys of tar shard `path` (its bytes `data`), sorted."""
    try:
        return sorted(tar_keys(str(path), data))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{path}: unreadable shard ({type(e).__name__}: {e}); delete it and re-run") from None


def _check_keys(path: Path, keys: list[str], spec: ShardSampling, shard: int) -> None:
    expected = [sample_key(k) for k in spec.shard_indices(shard)]
    if keys != expected:
        extra, missing = sorted(set(keys) - set(expected)), sorted(set(expected) - set(keys))
        raise DataError(
            f"{path}: holds other samples than indices {expected[0]}..{expected[-1]} (missing {missing[:5]}, "
            f"unexpected {extra[:5]}); delete it and re-run"
        )


def _decide_gpu(use_gpu: bool | None) -> bool:
    """None: one GPU per worker when the Ray cluster has GPUs (the embedded local Ray sees this machine's)."""
    import ray

    if use_gpu is not None:
        return use_gpu
    return ray.cluster_resources().get("GPU", 0) >= 1


def sample_to_shards(
    model: TarFlow,
    out_dir: str | Path,
    spec: ShardSampling,
    *,
    source: str = "the sampled model",
    num_workers: int = 1,
    address: str | None = None,
    verbose: bool = False,
    use_gpu: bool | None = None,
    cpus_per_worker: int = 1,
    batch_size: int = 32,
    progress_every_s: float = 10.0,
    names: Mapping[str, str] | None = None,
    stream=None,
) -> ShardReport:
    """Write `spec.num` samples of `model` as `out_dir/samples-train-NNNNNN.tar` + `out_dir/train.json`.

    The caller holds `out_dir`'s lock (run_lock.lock_output_dir). `num_workers` Ray workers (`address`, else
    RAY_ADDRESS, else an embedded local cluster) with one GPU each when `use_gpu` (None: when the cluster has
    GPUs) draw `batch_size` samples at a time; complete shards of an earlier run with the same settings are kept.
    `names` maps setting keys ("guidance.weight", "seed", ...) to how the user gives them, for the errors;
    `source` names the checkpoint in a worker's error. Progress lines (rate, ETA) go to `stream` (stdout).
    """
    import ray

    from .pool import Progress, WorkerPool, init_ray

    stream = stream or sys.stdout
    out_dir = Path(out_dir)
    say = lambda line: print(line, file=stream, flush=True)  # noqa: E731
    model_sha256 = model_fingerprint(model)
    record = settings_record(spec, model, model_sha256)
    claim_folder(out_dir, record, source, names)
    _remove_orphan_temps(out_dir)
    names_of = shard_names(SHARD_NAME, SHARD_SPLIT, spec.num_shards)
    done: dict[int, tuple[str, int]] = {}  # shard -> (sha256, bytes)
    for shard, name in enumerate(names_of):
        path = out_dir / name
        if path.is_file():  # complete by construction (renamed only once whole); its content is still checked
            data = path.read_bytes()
            _check_keys(path, _keys_of(path, data), spec, shard)
            done[shard] = (hashlib.sha256(data).hexdigest(), len(data))
    reused = len(done)
    todo = [s for s in range(spec.num_shards) if s not in done]
    if reused:
        say(f"[sample shards] {reused} of {spec.num_shards} shards already complete in {out_dir}")
    report = ShardReport(
        out_dir=out_dir, manifest=out_dir / manifest_name(SHARD_SPLIT),
        pattern=brace_pattern(SHARD_NAME, SHARD_SPLIT, spec.num_shards), num_samples=spec.num,
        num_shards=spec.num_shards, shards_reused=reused, images_sampled=0, seconds=0.0, startup_s=0.0,
        num_workers=num_workers,
    )  # fmt: skip
    if todo:
        start = time.perf_counter()
        started = init_ray(address, verbose)
        try:
            gpu = _decide_gpu(use_gpu)
            spec.decoding.check(model, "cuda" if gpu else "cpu")  # SettingError before any worker starts
            cluster = ClusterConfig(address=address, num_workers=num_workers, use_gpu=gpu,
                                    cpus_per_worker=cpus_per_worker)  # fmt: skip
            pool = WorkerPool(
                model, RunConfig(model=model.config, cluster=cluster), num_workers, source,
                worker=ShardWorker, worker_args=(spec, model_sha256, gpu, cpus_per_worker), what="sampling",
            )  # fmt: skip
            report.startup_s = time.perf_counter() - start
            report.worker_devices = list(pool.devices)
            stats = DecodingStats(num_tokens=model.config.num_tokens)
            total = sum(len(spec.shard_indices(s)) for s in todo)
            progress = Progress("sample shards", total, progress_every_s, stream=stream)

            def write(i: int, result: dict[str, Any]) -> None:
                shard = todo[i]
                path = out_dir / names_of[shard]
                data = result["tar"]
                _check_keys(path, _keys_of(path, data), spec, shard)
                with atomic_path(path) as tmp:
                    tmp.write_bytes(data)
                done[shard] = (result["sha256"], len(data))  # the worker hashed these bytes
                report.images_sampled += result["count"]
                report.redrawn += result["redrawn"]
                stats.merge(DecodingStats(dict(result["passes"]), calls=result["calls"]))

            try:
                pool.map("shard", [(s, batch_size) for s in todo], progress, lambda r: r["count"], write,
                         keep_results=False)  # fmt: skip
            finally:
                report.workers_replaced = pool.replaced
                pool.close()
            report.seconds = progress.finish()["seconds"]
            report.decoding_passes = stats.summary()
        finally:
            if started:
                with contextlib.suppress(Exception):
                    ray.shutdown()
    manifest = _manifest(out_dir, spec, model, done, record)
    write_manifest(str(out_dir), manifest)
    return report


def _manifest(
    out_dir: Path, spec: ShardSampling, model: TarFlow, done: dict[int, tuple[str, int]], record: dict[str, Any]
) -> Manifest:
    """The manifest once every shard exists. Each index 0..N-1 is in exactly one shard: every shard in `done` was
    checked to hold exactly its own range of indices (`_check_keys`, on resume or as written), and the ranges
    partition 0..N-1."""
    names = shard_names(SHARD_NAME, SHARD_SPLIT, spec.num_shards)
    for shard, name in enumerate(names):
        if shard not in done:
            raise DataError(f"{out_dir / name}: missing after sampling")
    c = model.config
    return Manifest(
        name=SHARD_NAME,
        split=SHARD_SPLIT,
        shards=names,
        samples_per_shard=[len(spec.shard_indices(s)) for s in range(spec.num_shards)],
        num_samples=spec.num,
        image_size=c.image_size,
        channels=c.in_channels,
        num_classes=c.num_classes if spec.labels is not None else 0,  # unlabelled samples carry no .cls
        sha256=[done[s][0] for s in range(spec.num_shards)],
        pattern=brace_pattern(SHARD_NAME, SHARD_SPLIT, spec.num_shards),
        source={"kind": "tarflow-sample", **record},
        shard_bytes=[done[s][1] for s in range(spec.num_shards)],
    )
