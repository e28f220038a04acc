"""One evaluation worker (a Ray actor, one GPU on a cluster): loads the model once and runs units of work."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from ..artifacts.load import build_model
from ..config import Decoding, Guidance, RunConfig, from_dict, model_config_from_dict
from ..data import DataError, make_eval_loader
from ..models.decoding import DecodingStats
from ..sampling import to_uint8, tweedie_denoise
from . import fid as fidlib
from .bpd import batch_bits_per_dim
from .generate import generate
from .outputs import write_pngs
from .sample_sets import SampleRange, read_batches

GRID_SAMPLES = 16  # a FID unit keeps the pixels of sample indices below this: each sweep setting's grid


def passes_arrays(stats: DecodingStats) -> dict[str, Any]:
    """A unit's decoding statistics as arrays: passes per block (index = block, forward order) and calls."""
    return {"passes": np.array([stats.passes[k] for k in range(len(stats.passes))]), "calls": stats.calls}


class EvalWorker:
    """One evaluation worker (a Ray actor): the model and, on demand, the feature network, loaded once."""

    def __init__(self, payload: dict, config: dict, use_gpu: bool, threads: int):
        torch.set_num_threads(max(1, threads))
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.config: RunConfig = from_dict(RunConfig, config)
        model = build_model(model_config_from_dict(payload["model_config"]), payload["state"], payload["source"])
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
                    precision=c.eval.bpd_precision,
                )  # fmt: skip
                values[name].append(bpd.cpu().numpy())
            keys += batch_keys
        return {"keys": keys, "values": {k: np.concatenate(v) if v else np.zeros(0) for k, v in values.items()}}

    def _generate(self, indices: list[int], guidance: Guidance, decoding: Decoding, stats: DecodingStats):
        e = self.config.eval
        return generate(self.model, indices, guidance, decoding, seed=e.seed, max_redraws=e.max_redraws, stats=stats)

    def sample_chunk(
        self, indices: list[int], guidance: Guidance, decoding: Decoding, denoise_std: float | None, step: float
    ) -> dict[str, Any]:
        stats = DecodingStats()
        images, labels, redrawn = self._generate(indices, guidance, decoding, stats)
        out = {"indices": indices, "images": images.float().cpu(), "redrawn": redrawn, **passes_arrays(stats)}
        out["labels"] = None if labels is None else labels.cpu()
        if denoise_std is not None:
            batch = self.config.eval.denoise_batch_size
            denoised = tweedie_denoise(self.model, images, denoise_std, labels, step, batch, decoding.precision)
            out["denoised"] = denoised.float().cpu()
        return out

    def _feature_network(self):
        if self._extractor is None:
            e = self.config.eval
            self._extractor = fidlib.build_extractor(e.fid_feature_extractor, self.device, e.inception_path)
        return self._extractor

    def fid_chunk(
        self,
        indices: list[int],
        guidance: Guidance,
        decoding: Decoding,
        denoise_std: float | None,
        step: float,
        png_dir: str | None,
    ) -> dict[str, Any]:
        """Generate, (denoise), quantise and featurise samples `indices`: their features, one unit of the FID job
        (about 8 KB per sample for Inception; the driver saves them and streams them into the statistics), the
        pixels of those below GRID_SAMPLES and the seconds it took."""
        start = time.perf_counter()
        stats = DecodingStats()
        images, labels, redrawn = self._generate(indices, guidance, decoding, stats)
        if denoise_std is not None:
            batch = self.config.eval.denoise_batch_size
            images = tweedie_denoise(self.model, images, denoise_std, labels, step, batch, decoding.precision)
        pixels = to_uint8(images).cpu()  # (B, C, H, W): exactly what a PNG of the sample holds
        if png_dir:
            write_pngs(pixels, indices, png_dir)
        feats = fidlib.extract_features(pixels, self._feature_network(), self.device)
        grid = pixels[[j for j, i in enumerate(indices) if i < GRID_SAMPLES]].numpy()
        return {
            "indices": indices, "feats": np.asarray(feats), "redrawn": redrawn, "count": len(indices),
            "grid": grid, "seconds": time.perf_counter() - start, **passes_arrays(stats),
        }  # fmt: skip

    def fid_samples_chunk(self, images: SampleRange) -> dict[str, Any]:
        """Features of existing images (eval.fid_samples) start .. stop - 1, extracted eval.batch_size at a time
        from `start`, as fid_chunk featurises a chunk of generated samples."""
        feats = [
            fidlib.extract_features(batch, self._feature_network(), self.device)
            for batch in read_batches(images, self.config.eval.batch_size)
        ]
        indices = list(range(images.start, images.stop))
        return {"indices": indices, "feats": np.concatenate(feats), "count": len(indices)}

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
