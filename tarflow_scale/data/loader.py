"""Training (endless, resampled, per-rank seeded) and evaluation (exactly once) loaders over the shards."""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
import webdataset as wds
from torch import Tensor

from ..config import DataConfig
from ..seeding import derive_seed
from .bundled import resolve_data_path
from .decode import SampleDecoder
from .manifest import DataError, Manifest, join, read_manifest

logger = logging.getLogger(__name__)


@dataclass
class DataStats:
    """Loader counters for the training metrics, kept in the main process: workers send their counts along
    with each batch, so nothing is lost across DataLoader processes."""

    batches: int = 0
    samples: int = 0
    skipped: int = 0  # skip events so far: corrupt samples, unreadable or missing shards
    last_error: str = ""  # what the latest skip was about

    def as_metrics(self) -> dict[str, float]:
        return {"data/skipped": float(self.skipped), "data/samples": float(self.samples)}


def _output_size(cfg: DataConfig, manifest: Manifest) -> int:
    if cfg.image_size == 0:
        return manifest.image_size
    if cfg.image_size > manifest.image_size:
        raise DataError(
            f"data.image_size={cfg.image_size} is larger than the {manifest.image_size}x{manifest.image_size} "
            f"images of {manifest.name}/{manifest.split}; the loader only downsamples"
        )
    return cfg.image_size


def _resize(images: Tensor, size: int) -> Tensor:
    """(B, C, S, S) uint8 -> (B, C, size, size) uint8 by area averaging (a box filter for integer factors,
    as the downsampled ImageNet releases were made)."""
    if images.shape[-1] == size:
        return images
    return F.interpolate(images.float(), size=(size, size), mode="area").round_().to(torch.uint8)


def _stack(samples: list[tuple[Tensor, int, str]]) -> tuple[Tensor, Tensor, list[str]]:
    # One torch.stack per batch: no Python work per pixel.
    images, labels, keys = zip(*samples)
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64), list(keys)


def _describe(exn: Exception) -> str:
    # webdataset appends the URL and stream to an exception's args, so str(exn) would repeat them.
    detail = getattr(exn, "strerror", None) or (exn.args[0] if exn.args else "")
    return f"{type(exn).__name__}: {detail}"


# ----------------------------------------------------------------------------------------------------------
# Training


class _SkipCounter:
    """webdataset handler for training: logs and counts a corrupt sample or shard, then carries on; raises once
    `limit` happen in a row (the data is unusable, and resampling would otherwise spin forever)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.skipped = 0
        self.in_a_row = 0
        self.last_error = ""

    def __call__(self, exn: Exception, count: int = 1) -> bool:
        if isinstance(exn, DataError):
            message = str(exn)
        else:  # webdataset appends the shard URL to the exception's args
            url = exn.args[-1] if len(exn.args) > 1 and isinstance(exn.args[-1], str) else None
            message = f"{url + ': ' if url else ''}unreadable shard data ({_describe(exn)})"
        self.skipped += count
        self.in_a_row += 1
        self.last_error = message
        logger.warning("skipping corrupt training data: %s", message)
        if self.in_a_row >= self.limit:
            raise DataError(
                f"{self.in_a_row} corrupt training samples/shards in a row (data.max_corrupt_in_a_row); "
                f"the last: {message}"
            ) from exn
        return True

    def decoded(self, item: Any) -> Any:
        self.in_a_row = 0
        return item


class _TrainStream(torch.utils.data.IterableDataset):
    """The per-worker training pipeline; every random choice comes from (seed parts, worker id).

    Each iteration is the next segment of the stream: segment e is seeded by `segment_seed(e)` (the seed parts'
    second entry; None keeps it for every segment). The object lives on in its worker process (persistent
    DataLoader workers), which counts the segments and fills segment e + 1's shuffle buffer in a background thread
    while segment e is read, so a new segment starts without a stall.
    """

    def __init__(
        self,
        cfg: DataConfig,
        urls: list[str],
        manifest: Manifest,
        batch_size: int,
        seed_parts: tuple,
        segment_seed: Callable[[int], int] | None = None,
    ):
        super().__init__()
        self.cfg, self.urls, self.batch_size, self.seed_parts = cfg, urls, batch_size, seed_parts
        self.segment_seed = segment_seed
        self.decode = SampleDecoder(manifest.channels, manifest.image_size, manifest.num_classes)
        self.out_size = _output_size(cfg, manifest)
        self.expected = dict(zip(urls, manifest.samples_per_shard))
        self._next_segment = 0  # per process: each worker (or the main process, without workers) counts its own
        self._prepared: tuple[int, Future] | None = None  # (segment, its batches with the first made), filled ahead
        self._filler: ThreadPoolExecutor | None = None  # made in the process that reads the stream

    def _seed_parts(self, segment: int) -> tuple:
        if self.segment_seed is None:
            return self.seed_parts
        return (self.seed_parts[0], self.segment_seed(segment), *self.seed_parts[2:])

    def _counted_samples(self, shards: Iterator[dict[str, str]], counter: _SkipCounter) -> Iterator[dict]:
        """Each shard's samples, counted against the manifest: garbage inside a tar ends Python's tar reader
        silently, so a shard that yields fewer samples than recorded has its shortfall counted as skipped."""
        for shard in shards:
            url, yielded = shard["url"], 0
            try:
                for sample in wds.tarfile_samples([shard]):
                    yielded += 1
                    yield sample
                error = None
            except Exception as e:  # unreadable shard data: counted below with the shortfall
                error = e
            missing = self.expected.get(url, yielded) - yielded
            if error is not None or missing > 0:
                detail = f" ({_describe(error)})" if error is not None else ""
                expected = self.expected.get(url, yielded)
                counter(
                    DataError(f"{url}: yielded {yielded} of its {expected} samples{detail}; the rest skipped"),
                    count=max(missing, 1),
                )

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, int, str]]:
        segment, self._next_segment = self._next_segment, self._next_segment + 1
        prepared, self._prepared = self._prepared, None
        batches = prepared[1].result() if prepared and prepared[0] == segment else self._segment(segment)
        if self.segment_seed is not None:  # the next segment's shuffle buffer fills while this one is read
            if self._filler is None:
                self._filler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shuffle-buffer")
            self._prepared = (segment + 1, self._filler.submit(self._primed, segment + 1))
        yield from batches

    def _primed(self, segment: int) -> Iterator[tuple[Tensor, Tensor, int, str]]:
        """A segment's batches with the first one already made (its shuffle buffer filled)."""
        batches = self._segment(segment)
        return itertools.chain([next(batches)], batches)

    def _segment(self, segment: int) -> Iterator[tuple[Tensor, Tensor, int, str]]:
        info = torch.utils.data.get_worker_info()
        base = derive_seed(*self._seed_parts(segment), info.id if info is not None else 0)
        counter = _SkipCounter(self.cfg.max_corrupt_in_a_row)
        stages = [
            # Shards drawn with replacement, endlessly: no epoch boundary at which ranks must agree.
            wds.ResampledShards(self.urls, seed=base % 2**31, worker_seed=lambda: 0, deterministic=True),
            partial(self._counted_samples, counter=counter),
        ]
        if self.cfg.shuffle_buffer > 1:
            # Shuffle the still-encoded samples: the buffer costs bytes, not decoded pixels.
            stages.append(
                wds.shuffle(self.cfg.shuffle_buffer, initial=self.cfg.shuffle_buffer, rng=random.Random(base + 1))
            )
        stages += [
            wds.map(lambda s: counter.decoded(self.decode(s)), handler=counter),
            wds.batched(self.batch_size, collation_fn=_stack, partial=False),
        ]
        generator = torch.Generator().manual_seed(base + 2)
        reported = 0
        for images, labels, _ in wds.DataPipeline(*stages):
            if self.cfg.hflip:
                flip = torch.rand(len(labels), generator=generator) < 0.5
                images = torch.where(flip[:, None, None, None], images.flip(-1), images)
            new = counter.skipped - reported
            reported = counter.skipped
            yield _resize(images, self.out_size), labels, new, counter.last_error if new else ""


class TrainLoader:
    """Endless (images uint8 (B, C, H, W), labels int64 (B,)) batches for one rank; see make_train_loader.

    Each `iter()` starts the next segment of the stream on the same DataLoader worker processes (persistent):
    nothing is rebuilt between segments.
    """

    def __init__(self, stream: _TrainStream, num_workers: int, stats: DataStats | None, manifest: Manifest):
        self.stream, self.num_workers, self.stats, self.manifest = stream, num_workers, stats, manifest
        self._loader: torch.utils.data.DataLoader | None = None

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self._loader is None:
            self._loader = torch.utils.data.DataLoader(
                self.stream, batch_size=None, num_workers=self.num_workers, persistent_workers=self.num_workers > 0
            )
        for images, labels, skipped, last_error in self._loader:
            if self.stats is not None:
                self.stats.batches += 1
                self.stats.samples += len(labels)
                self.stats.skipped += skipped
                if last_error:
                    self.stats.last_error = last_error
            yield images, labels


def make_train_loader(
    cfg: DataConfig,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int | Callable[[int], int],
    stats: DataStats | None = None,
) -> TrainLoader:
    """Endless training batches for `rank`: shards resampled with replacement, a shuffle buffer, random
    horizontal flips (cfg.hflip), downsampling to cfg.image_size; uint8, so noise is added on the device
    (see `augment`).

    Deterministic: the same (cfg, rank, world_size, seed) gives the same batch sequence each time it is
    iterated, with cfg.num_workers worker processes too (each worker builds whole batches and the DataLoader
    takes them round-robin); a different rank, seed or num_workers gives a different stream. With `seed` a
    function, the e-th iteration (segment e, counting from 0) is the stream seeded by seed(e), equal to a fresh
    loader's with that seed, and is prepared while segment e - 1 is read. A corrupt sample or shard is skipped
    with a warning and counted in `stats.skipped`.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    root = resolve_data_path(cfg)
    manifest = read_manifest(root, cfg.train_split)
    urls = [join(root, shard) for shard in manifest.shards]
    if callable(seed):
        stream = _TrainStream(cfg, urls, manifest, batch_size, (cfg.seed, seed(0), rank, world_size), seed)
    else:
        stream = _TrainStream(cfg, urls, manifest, batch_size, (cfg.seed, seed, rank, world_size))
    return TrainLoader(stream, cfg.num_workers, stats, manifest)


# ----------------------------------------------------------------------------------------------------------
# Evaluation


class _EvalStream(torch.utils.data.IterableDataset):
    """One rank's share of the held-out split: samples with global index in [lo, hi), read from the shards
    that hold them, divided among the DataLoader workers by shard (wds.split_by_worker)."""

    def __init__(self, urls: list[str], manifest: Manifest, lo: int, hi: int, batch_size: int, out_size: int):
        super().__init__()
        self.lo, self.hi, self.batch_size, self.out_size = lo, hi, batch_size, out_size
        self.decode = SampleDecoder(manifest.channels, manifest.image_size, manifest.num_classes)
        self.shards = {
            url: (offset, count)
            for url, offset, count in zip(urls, manifest.shard_offsets, manifest.samples_per_shard)
            if offset < hi and offset + count > lo
        }

    def _samples(self, shards: Iterator[dict[str, str]]) -> Iterator[tuple[Tensor, int, str]]:
        for shard in shards:
            url = shard["url"]
            offset, expected = self.shards[url]
            position, key = 0, None
            try:
                # The default handler re-raises: an evaluation must never drop data silently.
                for sample in wds.tarfile_samples([{"url": url}]):
                    key = sample["__key__"]
                    if self.lo <= offset + position < self.hi:
                        yield self.decode(sample)
                    position += 1
            except DataError:
                raise
            except Exception as e:
                where = f"after sample {key!r}" if key is not None else "before its first sample"
                raise DataError(f"{url}: unreadable shard ({where}): {_describe(e)}") from None
            if position != expected:
                raise DataError(f"{url}: holds {position} samples, the manifest says {expected}")

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, list[str]]]:
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(list(self.shards)),
            wds.split_by_worker,
            self._samples,
            wds.batched(self.batch_size, collation_fn=_stack, partial=True),
        )
        for images, labels, keys in pipeline:
            yield _resize(images, self.out_size), labels, keys


class EvalLoader:
    """One exact pass of (images uint8 (B, C, H, W), labels int64 (B,), keys) for one rank."""

    def __init__(self, stream: _EvalStream | None, num_workers: int, manifest: Manifest, num_samples: int):
        self.stream, self.num_workers, self.manifest = stream, num_workers, manifest
        self.num_samples = num_samples  # this rank's share

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, list[str]]]:
        if self.stream is None:
            return
        yield from wds.WebLoader(self.stream, batch_size=None, num_workers=self.num_workers)


def make_eval_loader(
    cfg: DataConfig,
    batch_size: int,
    rank: int,
    world_size: int,
    split: str | None = None,
) -> EvalLoader:
    """One pass over the held-out split (cfg.eval_split unless `split`) in which every sample is seen exactly
    once across all ranks and their cfg.num_workers workers.

    Rank r takes the samples with global index in [r*N//W, (r+1)*N//W), so ranks get N//W or N//W + 1 samples
    even when a split has fewer shards than ranks (the bundled val set has 2); its workers share the shards
    overlapping that range. Batches are per worker, so the last batch of each worker may be short and ranks
    may see different numbers of batches: reduce across ranks after the pass, not per batch. Corrupt data,
    a missing shard or a shard whose sample count differs from the manifest raises a DataError naming the
    shard (and the key).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    root = resolve_data_path(cfg)
    manifest = read_manifest(root, split or cfg.eval_split)
    n = manifest.num_samples
    return _range_loader(cfg, root, manifest, batch_size, rank * n // world_size, (rank + 1) * n // world_size)


def make_range_loader(cfg: DataConfig, batch_size: int, start: int, stop: int, split: str | None = None) -> EvalLoader:
    """One pass over the samples with global index in [start, stop) of the split (cfg.eval_split unless `split`),
    each exactly once; in index order when cfg.num_workers is 0. Errors as make_eval_loader's."""
    root = resolve_data_path(cfg)
    manifest = read_manifest(root, split or cfg.eval_split)
    if not 0 <= start <= stop <= manifest.num_samples:
        raise ValueError(f"[{start}, {stop}) is not a range of the {manifest.num_samples} samples of {manifest.split}")
    return _range_loader(cfg, root, manifest, batch_size, start, stop)


def _range_loader(cfg: DataConfig, root: str, manifest: Manifest, batch_size: int, lo: int, hi: int) -> EvalLoader:
    out_size = _output_size(cfg, manifest)
    if lo == hi:
        return EvalLoader(None, 0, manifest, 0)
    urls = [join(root, shard) for shard in manifest.shards]
    stream = _EvalStream(urls, manifest, lo, hi, batch_size, out_size)
    # More workers than shards would only idle.
    return EvalLoader(stream, min(cfg.num_workers, len(stream.shards)), manifest, hi - lo)
