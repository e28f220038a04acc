"""What sampled shards hold (`ShardSampling`: every setting sample k depends on, and how indices are cut into
shards) and the Ray actor that draws one shard and packs it into tar bytes (`ShardWorker`).

Sample k of the shards is the image `tarflow-sample --num N` writes as k.png in one process: the same noise
(`per_sample_noise(seed, k)`), label, guidance, decoding and Tweedie step, in batches whose size does not matter.
The one difference: a sample that comes out non-finite is redrawn from a derived seed and counted (`generate`),
where the one-process sampler writes it as it is (NaN pixels become mid-grey).
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from ..artifacts.load import build_model
from ..config import Decoding, Guidance, model_config_from_dict
from ..data.shards import DEFAULT_SAMPLES_PER_SHARD, SHARD_MTIME
from ..data.sources import encode_png
from ..models.decoding import DecodingStats
from ..sampling import DENOISE_BATCH_SIZE, to_uint8, tweedie_denoise
from .generate import generate

SHARD_NAME, SHARD_SPLIT = "samples", "train"  # shards samples-train-NNNNNN.tar, manifest train.json
# Tar members get tarflow-data's fixed time (SHARD_MTIME), so a shard's bytes depend only on its samples: the
# shards of two runs with the same settings are identical files.


def sample_key(index: int) -> str:
    """The webdataset key of sample `index`: zero-padded, so keys sort in index order."""
    return f"{index:09d}"


@dataclass(frozen=True)
class ShardSampling:
    """Every setting the shards' images depend on, and their layout: a re-run into the same folder must repeat
    them (worker count, batch size and device are free: they change no image)."""

    num: int  # samples 0 .. num-1
    seed: int = 0
    # None: no class (an unconditional model, or a conditional one's null label); "balanced": sample k gets class
    # k mod num_classes; a tuple C: sample k gets C[k mod len(C)].
    labels: tuple[int, ...] | Literal["balanced"] | None = None
    guidance: Guidance = field(default_factory=Guidance)
    decoding: Decoding = field(default_factory=Decoding)
    denoise_noise_std: float = 0.0  # > 0: one Tweedie step with this std (the training noise); 0: not denoised
    shard_size: int = DEFAULT_SAMPLES_PER_SHARD  # samples per shard; shard i holds indices [i S, (i+1) S)
    max_redraws: int = 10  # a non-finite sample is redrawn at most this many times, then an error

    def __post_init__(self) -> None:
        if self.num < 1:
            raise ValueError(f"num={self.num} must be >= 1")
        if self.shard_size < 1:
            raise ValueError(f"shard_size={self.shard_size} must be >= 1")
        if self.denoise_noise_std < 0:
            raise ValueError(f"denoise_noise_std={self.denoise_noise_std} must be >= 0")
        if isinstance(self.labels, str) and self.labels != "balanced":
            raise ValueError(f"labels={self.labels!r}: None, 'balanced' or a tuple of classes")
        if isinstance(self.labels, (list, tuple)):
            if not self.labels:
                raise ValueError("labels=(): give at least one class")
            object.__setattr__(self, "labels", tuple(int(c) for c in self.labels))

    @property
    def num_shards(self) -> int:
        return -(-self.num // self.shard_size)

    def shard_indices(self, shard: int) -> range:
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.num))

    def labels_of(self, indices: list[int], num_classes: int) -> Tensor | None:
        """Labels (B,) int64 of these sample indices, or None: the labels `tarflow-sample` gives them."""
        if self.labels is None:
            return None
        index = torch.as_tensor(indices, dtype=torch.int64)
        if self.labels == "balanced":
            return index % num_classes
        return torch.as_tensor(self.labels, dtype=torch.int64)[index % len(self.labels)]

    def record(self) -> dict[str, Any]:
        """The settings as JSON-able values (tuples as lists), as stored beside the shards and in each sample."""
        return json.loads(json.dumps(asdict(self)))


def pack_shard(samples: list[dict[str, Any]]) -> bytes:
    """Webdataset samples (`__key__` and bytes per field) -> the bytes of a tar shard, reproducibly."""
    import webdataset as wds

    buffer = io.BytesIO()
    writer = wds.TarWriter(buffer, mtime=SHARD_MTIME)
    try:
        for sample in samples:
            writer.write(sample)
    finally:
        writer.close()
    return buffer.getvalue()


class ShardWorker:
    """One sampling worker (a Ray actor, one GPU on a cluster): builds the model once, then draws whole shards."""

    def __init__(self, payload: dict, spec: ShardSampling, model_sha256: str, use_gpu: bool, threads: int):
        torch.set_num_threads(max(1, threads))
        self.device = torch.device("cuda" if use_gpu else "cpu")
        model = build_model(model_config_from_dict(payload["model_config"]), payload["state"], payload["source"])
        self.model = model.to(self.device).eval()
        self.spec = spec
        # Each sample's .json: its index and label, then every setting and the weights it was drawn with.
        self.settings = {**spec.record(), "model_sha256": model_sha256}
        for layout_only in ("num", "shard_size"):  # a sample's image does not depend on these
            self.settings.pop(layout_only)

    def ready(self) -> str:
        """Returns once the model is built (so timings exclude start-up); names the device."""
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return f"{name}, {torch.get_num_threads()} threads"

    @torch.no_grad()
    def shard(self, shard: int, batch_size: int) -> dict[str, Any]:
        """Draw the samples of shard `shard` in batches of `batch_size` and pack them: the tar bytes, their sha256,
        the number of samples, the non-finite samples redrawn and the model passes."""
        start = time.perf_counter()
        spec, model = self.spec, self.model
        indices = list(spec.shard_indices(shard))
        stats = DecodingStats()
        samples, redrawn = [], 0
        for first in range(0, len(indices), batch_size):
            batch = indices[first : first + batch_size]
            labels = spec.labels_of(batch, model.config.num_classes)
            labels = None if labels is None else labels.to(self.device)
            x, _, count = generate(
                model, batch, spec.guidance, spec.decoding, seed=spec.seed, max_redraws=spec.max_redraws,
                stats=stats, labels=labels,
            )  # fmt: skip
            redrawn += count
            if spec.denoise_noise_std > 0:
                x = tweedie_denoise(
                    model, x, spec.denoise_noise_std, labels, batch_size=DENOISE_BATCH_SIZE,
                    precision=spec.decoding.precision,
                )  # fmt: skip
            pixels = to_uint8(x).cpu()
            for k, (index, image) in enumerate(zip(batch, pixels)):
                label = None if labels is None else int(labels[k])
                sample = {"__key__": sample_key(index), "png": encode_png(image.permute(1, 2, 0).numpy())}
                if label is not None:
                    sample["cls"] = str(label).encode("ascii")
                meta = {"index": index, "label": label, **self.settings}
                sample["json"] = json.dumps(meta, sort_keys=True).encode("utf-8")
                samples.append(sample)
        data = pack_shard(samples)
        return {
            "shard": shard, "tar": data, "sha256": hashlib.sha256(data).hexdigest(), "count": len(samples),
            "redrawn": redrawn, "passes": dict(stats.passes), "calls": stats.calls,
            "seconds": time.perf_counter() - start,
        }  # fmt: skip
