"""FID and KID through clean-fid: one protocol, streamed feature statistics, cached reference statistics.

Protocol (written into every metrics JSON as `PROTOCOL`):
- clean-fid's "clean" mode: each 8-bit image is resized to 299 x 299 by PIL bicubic in float32 with no
  re-quantisation (`cleanfid.resize.build_resizer("clean")`), then featurised by `cleanfid.fid.get_batch_features`
  with clean-fid's InceptionV3 (`inception-2015-12-05.pt`, pool3, 2048-d). Grey images are repeated to RGB.
  Features are computed in strict fp32 (TF32 off) whatever the evaluation's precision: they are the metric, not
  the model, so generated and reference features stay comparable across runs and settings.
- Reference: every image of the training split (data.train_split) as stored in the shards, at data.image_size,
  no flips; its mean and covariance are computed once and cached in an .npz next to the data
  (`<data root>/fid_stats/`), never inside the installed clean-fid package.
- Generated: eval.fid_num_samples images, sample k from seed (eval.seed, k), class k mod num_classes for a
  conditional model; after one Tweedie step when the model was trained on Gaussian-noised data; quantised to
  8 bits exactly as a PNG of the sample would be, so scoring in memory equals scoring the PNGs.
- FID = cleanfid.fid.frechet_distance of the two Gaussians; KID = cleanfid.fid.kernel_distance on at most
  eval.kid_max_features features per side (100 subsets of up to 1000), numpy seeded with eval.seed; its loop is
  replayed here (bit for bit) to keep each subset's estimate, whose standard deviation is reported with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from cleanfid import fid as cleanfid_fid
from cleanfid.downloads_helper import inception_url
from cleanfid.resize import build_resizer
from torch import Tensor

from ..models.precision import tf32_matmuls

FID_MODE = "clean"
INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_SIZE = 299  # clean mode resizes to this before the network
KID_NUM_SUBSETS = 100  # clean-fid's defaults for kernel_distance
KID_MAX_SUBSET_SIZE = 1000
STATS_FORMAT = "tarflow_scale/fid_stats/1"
PROTOCOL = {
    "library": "clean-fid",
    "mode": FID_MODE,
    "resize": "PIL bicubic to 299x299 in float32, no re-quantisation (cleanfid.resize.build_resizer('clean'))",
    "generated": "sample k from seed (eval.seed, k); class k mod num_classes; Tweedie-denoised if trained with "
    "gaussian noise and eval.fid_denoise; quantised to uint8 as a PNG",
    "reference": "every image of data.train_split as stored (no flip), cached .npz next to the data",
    "kid": f"cleanfid.fid.kernel_distance, {KID_NUM_SUBSETS} subsets of <= {KID_MAX_SUBSET_SIZE}, seeded; kid_std: "
    "the standard deviation of the subsets' estimates",
    "features_precision": "strict fp32 (TF32 off), whatever eval.decoding.precision",
}

Extractor = Callable[[Tensor], Tensor]  # float (B, 3, 299, 299) in [0, 255] -> (B, D) features


class FidError(RuntimeError):
    """FID cannot run as configured (weights, reference statistics); the message says what to do."""


# ----------------------------------------------------------------------------------------------------------
# Feature extractors


def default_inception_dir() -> Path:
    """Where clean-fid itself looks for (and would download) the weights (cleanfid/features.py)."""
    return Path("./" if platform.system() == "Windows" else "/tmp")


def resolve_inception_path(path: str) -> Path:
    """eval.inception_path -> the weights file: "" is clean-fid's location, a folder must hold INCEPTION_FILE."""
    location = Path(path).expanduser() if path else default_inception_dir()
    return location / INCEPTION_FILE if location.is_dir() or not path else location


def check_inception_weights(path: str) -> Path:
    """The weights file, or a FidError saying how to provide it (we never download: clusters may be offline)."""
    file = resolve_inception_path(path)
    if not file.is_file():
        raise FidError(
            f"Inception weights not found at {file}. Download {inception_url} on a machine with internet access "
            f"and copy it to {file} on every node, or put it anywhere and set eval.inception_path=/path/to/"
            f"{INCEPTION_FILE}. (For a pipeline test without weights: eval.fid_feature_extractor=pooled_pixels.)"
        )
    if file.name != INCEPTION_FILE:
        raise FidError(f"eval.inception_path={file}: clean-fid loads the weights under the name {INCEPTION_FILE}")
    return file


def pooled_pixels(x: Tensor) -> Tensor:
    """A weight-free deterministic extractor: 2x2 average-pooled pixels in [0, 1], (B, 3, 299, 299) -> (B, 12).

    For smoke tests of the FID pipeline on machines without the Inception weights; its distances are not FID.
    """
    return F.adaptive_avg_pool2d(x.float() / 255.0, 2).flatten(1)


def build_extractor(name: str, device: torch.device | str, inception_path: str = "") -> Extractor:
    """The feature network for clean-fid's `get_batch_features` (its custom-extractor hook)."""
    if name == "pooled_pixels":
        return pooled_pixels
    if name != "inception":
        raise FidError(f"unknown eval.fid_feature_extractor={name!r} (inception or pooled_pixels)")
    file = check_inception_weights(inception_path)
    from cleanfid.inception_torchscript import InceptionV3W

    try:
        model = InceptionV3W(str(file.parent), download=False, resize_inside=False)
    except Exception as e:  # torch.jit raises several types for a truncated or foreign file
        raise FidError(f"cannot load the Inception weights {file} ({type(e).__name__}: {e}); download it again") from e
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------------------------
# Features of uint8 images, the clean-fid way


def clean_resize(images_uint8: Tensor) -> Tensor:
    """(B, C, H, W) uint8 -> (B, 3, 299, 299) float32 in [0, 255] by clean-fid's clean-mode resizer."""
    if images_uint8.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images_uint8.dtype}")
    if images_uint8.shape[1] == 1:
        images_uint8 = images_uint8.expand(-1, 3, -1, -1)  # clean-fid converts files to RGB the same way
    resize = build_resizer(FID_MODE)
    arrays = images_uint8.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3), as clean-fid reads files
    # One image at a time, as clean-fid does (~3 ms per 64px image on one core; threads do not help: the
    # per-channel float conversions hold the GIL).
    return torch.stack([torch.from_numpy(resize(a).transpose(2, 0, 1).copy()) for a in arrays])


def extract_features(images_uint8: Tensor, extractor: Extractor, device: torch.device | str) -> np.ndarray:
    """(B, C, H, W) uint8 -> (B, D) float64 features: clean resize, then `cleanfid.fid.get_batch_features`, in
    strict fp32 (the protocol)."""
    with tf32_matmuls(False):
        feats = cleanfid_fid.get_batch_features(clean_resize(images_uint8), extractor, torch.device(device))
    return np.asarray(feats, dtype=np.float64)


# ----------------------------------------------------------------------------------------------------------
# Streaming statistics


@dataclass
class FeatureStats:
    """Mean and scatter of feature vectors accumulated batch by batch and merged across workers exactly (Chan et
    al.'s parallel update, in float64), plus the raw features of selected samples for KID."""

    num: int = 0
    mean: np.ndarray | None = None  # (D,)
    scatter: np.ndarray | None = None  # (D, D): sum over samples of (f - mean)(f - mean)^T
    kid_ids: list = field(default_factory=list)  # sample index (generated) or key (reference) of each KID row
    kid_features: list = field(default_factory=list)  # (D,) rows

    def add(self, feats: np.ndarray, ids: list | None = None, keep: list[bool] | None = None) -> FeatureStats:
        """Accumulate (B, D) features; rows with keep[i] also go to the KID set under ids[i]."""
        feats = np.asarray(feats, dtype=np.float64)
        batch = FeatureStats(len(feats), feats.mean(0), (feats - feats.mean(0)).T @ (feats - feats.mean(0)))
        if keep is not None:
            batch.kid_ids = [i for i, k in zip(ids, keep) if k]
            batch.kid_features = [f.astype(np.float32) for f, k in zip(feats, keep) if k]
        merged = self.merge(batch)
        self.__dict__.update(merged.__dict__)
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        if other.num == 0:
            return FeatureStats(self.num, self.mean, self.scatter, list(self.kid_ids), list(self.kid_features))
        if self.num == 0:
            return FeatureStats(other.num, other.mean, other.scatter, list(other.kid_ids), list(other.kid_features))
        n = self.num + other.num
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.num / n)
        scatter = self.scatter + other.scatter + np.outer(delta, delta) * (self.num * other.num / n)
        return FeatureStats(n, mean, scatter, self.kid_ids + other.kid_ids, self.kid_features + other.kid_features)

    @property
    def covariance(self) -> np.ndarray:
        """Unbiased (ddof=1) covariance, as np.cov(rowvar=False) in clean-fid."""
        if self.num < 2:
            raise FidError(f"a covariance needs at least 2 feature vectors, got {self.num}")
        return self.scatter / (self.num - 1)

    def kid_matrix(self) -> np.ndarray:
        """(k, D) KID features sorted by id, so the set does not depend on the order workers finished."""
        order = sorted(range(len(self.kid_ids)), key=lambda i: self.kid_ids[i])
        return np.stack([self.kid_features[i] for i in order]) if order else np.zeros((0, 0), np.float32)


def keep_reference_for_kid(key: str, num_reference: int, kid_max_features: int) -> bool:
    """About kid_max_features of num_reference reference images, chosen by a hash of their key (deterministic,
    independent of how the split is divided among workers)."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return h % max(num_reference, 1) < kid_max_features


# ----------------------------------------------------------------------------------------------------------
# Reference statistics cache


def default_reference_path(data_root: str, split: str, extractor: str, image_size: int) -> Path:
    """`<data root>/fid_stats/<split>-clean-<extractor>-<size>px.npz`; a remote data root is an error."""
    if data_root.startswith("pipe:") or "://" in data_root:
        raise FidError(
            f"data.path={data_root} is remote, so the FID reference statistics cannot be cached next to it: "
            "set eval.fid_reference=/local/or/shared/path.npz and add fid_stats to eval.jobs once to build it"
        )
    return Path(data_root) / "fid_stats" / f"{split}-{FID_MODE}-{extractor}-{image_size}px.npz"


def save_reference(path: str | Path, stats: FeatureStats, meta: dict) -> Path:
    """Write mean, covariance, KID features and `meta` (what they were computed from) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": STATS_FORMAT, "mode": FID_MODE, "num": stats.num, **meta}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, mu=stats.mean, sigma=stats.covariance, kid_features=stats.kid_matrix(), meta=json.dumps(meta))
    os.replace(tmp, path)
    return path


@dataclass
class ReferenceStats:
    mu: np.ndarray
    sigma: np.ndarray
    kid_features: np.ndarray
    meta: dict


def load_reference(path: str | Path, expect: dict) -> ReferenceStats:
    """Read cached statistics; a FidError when missing, unreadable, or computed with other settings (`expect`)."""
    path = Path(path)
    if not path.is_file():
        raise FidError(
            f"FID reference statistics {path} do not exist: build them from the training shards with "
            f"eval.jobs=[fid_stats,fid] (same eval.fid_reference), or leave eval.fid_reference empty to use the "
            f"cache next to the data"
        )
    try:
        with np.load(path, allow_pickle=False) as f:
            ref = ReferenceStats(f["mu"], f["sigma"], f["kid_features"], json.loads(str(f["meta"])))
    except Exception as e:
        raise FidError(f"{path} is not readable FID statistics ({type(e).__name__}: {e}); delete it to rebuild") from e
    if ref.meta.get("format") != STATS_FORMAT:
        raise FidError(f"{path} is not {STATS_FORMAT} statistics; delete it or point eval.fid_reference elsewhere")
    wrong = {k: (ref.meta.get(k), v) for k, v in expect.items() if ref.meta.get(k) != v}
    if wrong:
        detail = ", ".join(f"{k}: file {a!r}, now {b!r}" for k, (a, b) in wrong.items())
        raise FidError(f"{path} was computed with other settings ({detail}); delete it (or run fid_stats) to rebuild")
    return ref


# ----------------------------------------------------------------------------------------------------------
# Distances


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), by clean-fid's implementation."""
    return float(cleanfid_fid.frechet_distance(mu1, sigma1, mu2, sigma2))


def kernel_distance(feats1: np.ndarray, feats2: np.ndarray, seed: int) -> float | None:
    """clean-fid's KID (unbiased MMD^2, cubic polynomial kernel) with numpy's global RNG seeded, then restored.
    None when either side has fewer than 2 features."""
    kid, _ = kernel_distance_and_std(feats1, feats2, seed)
    return kid


def kernel_distance_and_std(feats1: np.ndarray, feats2: np.ndarray, seed: int) -> tuple[float | None, float | None]:
    """KID and its standard deviation over the subsets; (None, None) when either side has fewer than 2 features.

    `cleanfid.fid.kernel_distance`'s own loop (the same draws from numpy's global RNG, seeded here and restored,
    the same arithmetic and summation order, so the KID equals clean-fid's bit for bit), keeping each subset's
    unbiased MMD^2 estimate t_i / m, whose mean is the KID and whose spread is the reported ± std.
    """
    if min(len(feats1), len(feats2)) < 2:
        return None, None
    n = feats1.shape[1]
    m = min(min(feats1.shape[0], feats2.shape[0]), KID_MAX_SUBSET_SIZE)
    state = np.random.get_state()
    try:
        np.random.seed(seed % 2**32)
        t, estimates = 0, []
        for _ in range(KID_NUM_SUBSETS):
            x = feats2[np.random.choice(feats2.shape[0], m, replace=False)]
            y = feats1[np.random.choice(feats1.shape[0], m, replace=False)]
            a = (x @ x.T / n + 1) ** 3 + (y @ y.T / n + 1) ** 3
            b = (x @ y.T / n + 1) ** 3
            term = (a.sum() - np.diag(a).sum()) / (m - 1) - b.sum() * 2 / m
            t += term
            estimates.append(term / m)
    finally:
        np.random.set_state(state)
    return float(t / KID_NUM_SUBSETS / m), float(np.std(estimates))


def fid_and_kid(generated: FeatureStats, reference: ReferenceStats, seed: int) -> dict[str, float | int | None]:
    """FID of the generated statistics against the reference; KID ± its std over the subsets (None without KID
    features on either side)."""
    fid = frechet_distance(generated.mean, generated.covariance, reference.mu, reference.sigma)
    gen_kid = generated.kid_matrix()
    kid, kid_std = kernel_distance_and_std(gen_kid, reference.kid_features, seed)
    return {
        "fid": fid, "kid": kid, "kid_std": kid_std,
        "kid_num_generated": len(gen_kid), "kid_num_reference": len(reference.kid_features),
    }  # fmt: skip
