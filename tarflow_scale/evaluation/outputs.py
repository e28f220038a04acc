"""What an evaluation writes: metrics.json (results, every setting used, the checkpoint's checksum, software
versions), the per-image bits/dim CSV, sample PNGs and TensorBoard scalars and grids."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from torch import Tensor

from .. import atomic
from ..artifacts.provenance import Provenance, TrainingNoise
from ..artifacts.weights import file_sha256
from ..atomic import atomic_path
from ..config import RunConfig, to_dict

METRICS_FILE = "metrics.json"
# Distribution names (as pip knows them) whose versions every report records.
PACKAGES = ("torch", "torchvision", "numpy", "deepspeed", "ray", "webdataset", "clean-fid", "tarflow-scale")


def software_versions() -> dict[str, str | None]:
    """Installed versions, read from package metadata (importing deepspeed just for this would be slow)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    import torch

    versions["cuda"] = torch.version.cuda
    return versions


def _jsonable(value: Any) -> Any:
    """NaN/inf become null (strict JSON has neither); numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class NonFiniteResultError(ArithmeticError):
    """A headline result is NaN or infinite: no metrics.json is written (strict JSON would turn it into null)."""


def check_finite_results(results: dict[str, Any], out_dir: str | Path) -> None:
    """Refuse to publish a NaN/infinite headline number (bits/dim means, FID, KID, denoising change), naming it."""
    headline = {f"bpd.{k}.mean": v.get("mean") for k, v in results.get("bpd", {}).items() if isinstance(v, dict)}
    headline.update({f"fid.{k}": results["fid"].get(k) for k in ("fid", "kid") if "fid" in results})
    headline["denoise.rms_change"] = results.get("denoise", {}).get("rms_change")
    bad = [f"results.{k} = {float(v)}" for k, v in headline.items() if v is not None and not math.isfinite(float(v))]
    # A sweep lists a diverging setting as non-finite and never picks it as best; only a sweep with no finite
    # setting at all has nothing to publish.
    rows = (results.get("fid") or {}).get("sweep", {}).get("rows", [])
    if rows and not any(row.get("fid") is not None and math.isfinite(float(row["fid"])) for row in rows):
        bad.append(f"results.fid.sweep: every one of the {len(rows)} settings' FID is non-finite")
    if bad:
        raise NonFiniteResultError(
            f"{', '.join(bad)}: the model gives non-finite values (damaged or diverged weights?), so no metrics.json "
            f"is written; the finished units are kept in {Path(out_dir) / 'units'}"
        )


def build_report(
    config: RunConfig,
    checkpoint: Provenance,
    noise: TrainingNoise,
    results: dict[str, Any],
    cluster: dict[str, Any],
    seconds: float,
    argv: list[str] | None = None,
) -> dict[str, Any]:
    return _jsonable(
        {
            "checkpoint": {
                "path": str(checkpoint.path.resolve()),
                "kind": checkpoint.kind,
                "resolved": str(checkpoint.resolved.resolve()),
                "sha256": file_sha256(checkpoint.resolved),
                "metadata": checkpoint.metadata,
            },
            "training_noise": {"noise": noise.noise, "noise_std": noise.noise_std, "source": noise.source},
            "results": results,
            "config": to_dict(config),
            "cluster": cluster,
            "versions": software_versions(),
            "host": platform.node(),
            "command": list(sys.argv if argv is None else argv),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "seconds": seconds,
        }
    )


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    """Strict JSON, written under a temporary name and renamed, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


def _training_step(report: dict[str, Any]) -> int:
    """The checkpoint's training step from its tag ("step_00000200" -> 200); 0 when unknown."""
    tag = str(report.get("checkpoint", {}).get("metadata", {}).get("tag", ""))
    digits = tag.rsplit("_", 1)[-1]
    return int(digits) if digits.isdigit() else 0


def _fid_prefix(fid: dict[str, Any]) -> str:
    return "eval" if fid.get("feature_extractor") == "inception" else "eval/pipeline_check"


def sweep_hparams(report: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, float]]]:
    """A FID sweep's rows as TensorBoard hparams: (the four settings, {metric tag: value}) per setting."""
    fid = report.get("results", {}).get("fid") or {}
    if "sweep" not in fid:
        return []
    prefix = _fid_prefix(fid)
    out = []
    for row in fid["sweep"]["rows"]:
        metrics = {f"{prefix}/sweep_{k}": row[k] for k in ("fid", "kid", "kid_std") if row.get(k) is not None}
        out.append((dict(row["setting"]), metrics))
    return out


def tensorboard_scalars(report: dict[str, Any]) -> dict[str, float]:
    """The headline numbers under TensorBoard tags; a pooled-pixel "FID" is tagged as the pipeline check it is."""
    results, scalars = report.get("results", {}), {}
    for name, value in results.get("bpd", {}).items():
        if isinstance(value, dict) and "mean" in value:
            scalars[f"eval/bpd_{name}"] = value["mean"]
    fid = results.get("fid")
    if fid and "sweep" not in fid:  # a sweep's rows go to TensorBoard as hparams (write_tensorboard)
        prefix = _fid_prefix(fid)
        scalars[f"{prefix}/fid"] = fid["fid"]
        if fid.get("kid") is not None:
            scalars[f"{prefix}/kid"] = fid["kid"]
    if "denoise" in results:
        scalars["eval/denoise_rms_change"] = results["denoise"]["rms_change"]
    return scalars


def write_tensorboard(report: dict[str, Any], out_dir: str | Path) -> Path | None:
    """Mirror the report into `out_dir/tensorboard`: scalars at the checkpoint's step and the sample grids."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    import numpy as np
    from PIL import Image

    folder = Path(out_dir) / "tensorboard"
    step = _training_step(report)
    writer = SummaryWriter(str(folder))
    try:
        for tag, value in tensorboard_scalars(report).items():
            writer.add_scalar(tag, value, step)
        results = report.get("results", {})
        grids = {"eval/samples": results.get("sample", {}).get("files", {}).get("grid")}
        grids["eval/samples_denoised"] = results.get("denoise", {}).get("files", {}).get("denoised_grid")
        grids["eval/sweep_grid"] = (results.get("fid") or {}).get("sweep", {}).get("files", {}).get("grid")
        for tag, path in grids.items():
            if path and Path(path).is_file():
                writer.add_image(tag, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
        for i, (hparams, metrics) in enumerate(sweep_hparams(report)):  # each in its own run: tensorboard/sweep_NNN
            writer.add_hparams(hparams, metrics, run_name=f"sweep_{i:03d}", global_step=step)
    finally:
        writer.close()
    return folder


def write_per_image(per_image: dict[str, dict[str, float]], path: Path) -> None:
    """key,<metric>... one row per held-out image, sorted by key: paired comparisons between checkpoints."""
    names = sorted({n for row in per_image.values() for n in row})
    lines = ["key," + ",".join(names)]
    lines += [key + "," + ",".join(repr(per_image[key][n]) for n in names) for key in sorted(per_image)]
    atomic.write_text(path, "\n".join(lines) + "\n")


def write_pngs(pixels: Tensor, indices: list[int], folder: str) -> None:
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for image, index in zip(pixels, indices):
        array = image.permute(1, 2, 0).numpy()
        with atomic_path(os.path.join(folder, f"{index:06d}.png"), suffix=".png") as tmp:
            Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(tmp)
