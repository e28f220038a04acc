"""Writing a source into tar shards and a manifest: parallel over processes, resumable, atomic per file."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import glob
import json
import multiprocessing
import os
import socket
from typing import Any, Literal

import webdataset as wds
from tqdm import tqdm

from .manifest import (
    DataError,
    Manifest,
    count_tar_samples,
    file_sha256,
    manifest_name,
    read_manifest,
    tar_keys,
    write_json_atomic,
    write_manifest,
)
from .sources import Chunk, Source
from .verify import verify

DEFAULT_SAMPLES_PER_SHARD = 1000
# Tar members get a fixed time (and webdataset's fixed owner), so a shard's bytes depend only on its
# samples: checksums are reproducible and two processes building the same shard write identical files.
SHARD_MTIME = 0  # an int: a float mtime makes tarfile add a PAX header to every member (slower reads)


def shard_names(name: str, split: str, num_shards: int) -> list[str]:
    return [f"{name}-{split}-{i:06d}.tar" for i in range(num_shards)]


def brace_pattern(name: str, split: str, num_shards: int) -> str:
    """`imagenet64-train-{000000..000127}.tar`, the form webdataset expands."""
    if num_shards == 1:
        return shard_names(name, split, 1)[0]
    return f"{name}-{split}-{{000000..{num_shards - 1:06d}}}.tar"


def _temp_path(path: str) -> str:
    # Hidden, and tagged with host and pid so a later run can tell an orphan from a live writer's file.
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{socket.gethostname()}.{os.getpid()}.tmp")


def write_shard(path: str, chunk: Chunk) -> tuple[int, str]:
    """Write `chunk` as the tar shard `path`: under a temp name, renamed only once complete and synced.
    Returns (number of samples, sha256 of the file). Runs in worker processes."""
    tmp = _temp_path(path)
    try:
        count = 0
        with open(tmp, "wb") as f:
            writer = wds.TarWriter(f, mtime=SHARD_MTIME)
            try:
                for sample in chunk.samples():
                    writer.write(sample)
                    count += 1
            finally:  # also on error, so the tar stream is not flushed later into a closed file
                writer.close()
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return count, file_sha256(path)


def _remove_orphan_temps(out_dir: str, name: str, split: str) -> None:
    """Temp files of killed runs on this host (their pid is gone); live writers' files are left alone."""
    host = socket.gethostname()
    for path in glob.glob(os.path.join(out_dir, f".{name}-{split}-*.tmp")):
        parts = os.path.basename(path).split(".")
        if len(parts) < 4 or parts[-3] != host or not parts[-2].isdigit():
            continue
        try:
            os.kill(int(parts[-2]), 0)
        except ProcessLookupError:
            os.remove(path)
        except PermissionError:  # alive, owned by someone else
            pass


def _normalise(data: Any) -> Any:
    """JSON round trip (tuples -> lists), so a plan compares equal to the one read back from disk."""
    return json.loads(json.dumps(data))


def _remove_split(out_dir: str, shards: list[str], split: str) -> None:
    for path in [os.path.join(out_dir, manifest_name(split)), _plan_path(out_dir, split)]:
        if os.path.exists(path):
            os.remove(path)
    for shard in shards:
        path = os.path.join(out_dir, shard)
        if os.path.exists(path):
            os.remove(path)


def _plan_path(out_dir: str, split: str) -> str:
    return os.path.join(out_dir, f".{split}.plan.json")


def write_split(
    out_dir: str,
    source: Source,
    *,
    name: str,
    split: str,
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
    num_procs: int = 1,
    progress: bool = True,
    on_mismatch: Literal["error", "rebuild"] = "error",
) -> Manifest:
    """Convert `source` into `<out_dir>/<name>-<split>-NNNNNN.tar` shards and `<out_dir>/<split>.json`.

    Sample i goes to shard i // samples_per_shard, so the shards are fixed by the plan (input, split, shard
    size) and a re-run only writes the shards that are missing (resuming). A finished split (its manifest
    exists) is verified against its checksums instead of being redone. An existing split or a half-done
    one with a different plan is an error, or with `on_mismatch="rebuild"` is deleted and rebuilt.
    `num_procs > 1` encodes shards in that many spawned processes.
    """
    if samples_per_shard < 1:
        raise ValueError("samples_per_shard must be >= 1")
    if source.num_samples < 1:
        raise DataError(f"{name}/{split}: the input holds no samples")
    os.makedirs(out_dir, exist_ok=True)
    num_samples = source.num_samples
    num_shards = -(-num_samples // samples_per_shard)
    names = shard_names(name, split, num_shards)
    counts = [min(samples_per_shard, num_samples - i * samples_per_shard) for i in range(num_shards)]
    plan = _normalise(
        {
            "name": name,
            "split": split,
            "samples_per_shard": samples_per_shard,
            "num_samples": num_samples,
            "image_size": source.image_size,
            "channels": source.channels,
            "num_classes": source.num_classes,
            "input": source.describe(),
        }
    )
    manifest_path = os.path.join(out_dir, manifest_name(split))

    if os.path.exists(manifest_path):
        existing = read_manifest(out_dir, split)
        if existing.source == plan:
            problems = verify(out_dir, existing)
            if problems:
                raise DataError(
                    f"{manifest_path}: the finished split fails verification (delete the bad shards and "
                    "the manifest, then re-run to rebuild them):\n  " + "\n  ".join(problems)
                )
            return existing
        if on_mismatch == "error":
            raise DataError(
                f"{manifest_path}: split {split!r} already exists, converted with different settings or input; "
                f"use another --out or delete it.\n  existing: {existing.source}\n  requested: {plan}"
            )
        _remove_split(out_dir, existing.shards, split)

    plan_path = _plan_path(out_dir, split)
    if os.path.exists(plan_path):
        with open(plan_path, encoding="utf-8") as f:
            old_plan = json.load(f)
        if old_plan != plan:
            if on_mismatch == "error":
                raise DataError(
                    f"{plan_path}: a half-done conversion of split {split!r} with different settings is in "
                    f"{out_dir}; re-run it with the same arguments, or delete {out_dir}"
                )
            old_names = shard_names(
                old_plan["name"], split, -(-old_plan["num_samples"] // old_plan["samples_per_shard"])
            )
            _remove_split(out_dir, old_names, split)
    write_json_atomic(plan_path, plan)
    _remove_orphan_temps(out_dir, name, split)

    results: dict[int, tuple[int, str]] = {}
    todo = []
    for i, shard in enumerate(names):
        path = os.path.join(out_dir, shard)
        if os.path.exists(path):
            # Complete by construction (atomic rename under the same plan); its count is still checked.
            results[i] = (count_tar_samples(path), file_sha256(path))
        else:
            todo.append(i)

    bar = tqdm(total=num_shards, initial=len(results), unit="shard", desc=f"{name}/{split}", disable=not progress)
    try:
        if num_procs <= 1 or len(todo) <= 1:
            for i in todo:
                results[i] = write_shard(os.path.join(out_dir, names[i]), _read(source, i, samples_per_shard))
                bar.update()
        else:
            _write_parallel(out_dir, source, names, todo, samples_per_shard, num_procs, results, bar)
    finally:
        bar.close()

    skipped: list[str] = []
    if getattr(source, "skip_bad", False):  # --skip-bad: the shards hold fewer samples; say which are missing
        for i in range(num_shards):
            if results[i][0] < counts[i]:
                start = i * samples_per_shard
                present = tar_keys(os.path.join(out_dir, names[i]))
                missing = [k for k in source.keys[start : start + counts[i]] if k not in present]
                skipped += [source.skipped_reason(k) for k in missing]
                counts[i] = results[i][0]
        num_samples = sum(counts)
        if num_samples == 0:
            raise DataError(f"{name}/{split}: every input image was unreadable")
    for i in range(num_shards):
        if results[i][0] != counts[i]:
            raise DataError(f"{os.path.join(out_dir, names[i])}: holds {results[i][0]} samples, expected {counts[i]}")
    manifest = Manifest(
        name=name,
        split=split,
        shards=names,
        samples_per_shard=counts,
        num_samples=num_samples,
        image_size=source.image_size,
        channels=source.channels,
        num_classes=source.num_classes,
        sha256=[results[i][1] for i in range(num_shards)],
        class_names=list(source.class_names),
        pattern=brace_pattern(name, split, num_shards),
        source=plan,
        shard_bytes=[os.path.getsize(os.path.join(out_dir, n)) for n in names],
        skipped_inputs=skipped,
    )
    write_manifest(out_dir, manifest)
    with contextlib.suppress(FileNotFoundError):  # a concurrent builder of the same split may have removed it
        os.remove(plan_path)
    return manifest


def _read(source: Source, index: int, samples_per_shard: int) -> Chunk:
    start = index * samples_per_shard
    return source.read(start, min(start + samples_per_shard, source.num_samples))


def _write_parallel(
    out_dir: str,
    source: Source,
    names: list[str],
    todo: list[int],
    samples_per_shard: int,
    num_procs: int,
    results: dict[int, tuple[int, str]],
    bar: tqdm,
) -> None:
    # The main process reads (each .npz is loaded once, in order) and workers encode PNGs, the slow part.
    # At most 2 chunks per worker wait in flight, so memory stays bounded whatever the split's size.
    # spawn, not fork: the caller may hold threads (Ray, torch) that a forked child would deadlock on.
    context = multiprocessing.get_context("spawn")
    pending: dict[cf.Future, int] = {}
    queue = iter(todo)
    with cf.ProcessPoolExecutor(max_workers=num_procs, mp_context=context) as pool:
        try:
            while True:
                while len(pending) < 2 * num_procs:
                    i = next(queue, None)
                    if i is None:
                        break
                    chunk = _read(source, i, samples_per_shard)
                    pending[pool.submit(write_shard, os.path.join(out_dir, names[i]), chunk)] = i
                if not pending:
                    break
                finished, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                for future in finished:
                    i = pending.pop(future)
                    results[i] = future.result()  # re-raises a worker's DataError (naming the bad file)
                    bar.update()
        except BaseException:
            # Shards already renamed are complete and kept for the resume; queued ones are dropped.
            pool.shutdown(wait=True, cancel_futures=True)
            raise
