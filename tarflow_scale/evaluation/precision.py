"""The precision each evaluation job runs at, as recorded in metrics.json (results.<job>.precision).

Sampling (sample, denoise, fid) runs at eval.decoding.precision, and so does the Tweedie score of the denoised
samples (the same Transformer, under models/precision.py `precision_scope`); bits/dim at eval.bpd_precision
(strict fp32 unless overridden); FID features in strict fp32 always (fid.py's protocol).
"""

from __future__ import annotations

from ..config import EvalConfig

FEATURES_PRECISION = "fp32"  # strict: TF32 off (evaluation/fid.py extract_features)


def job_precision(job: str, e: EvalConfig, denoised: bool) -> dict[str, str]:
    """What ran at which precision in job `job` ("bpd", "sample", "denoise", "fid_stats", "fid"); `denoised`: its
    samples went through the Tweedie step."""
    if job == "bpd":
        record = {"likelihood": e.bpd_precision}
        if e.bpd_precision != "fp32":
            record["note"] = f"eval.bpd_precision={e.bpd_precision}: an approximation of the fp32 likelihood"
        return record
    if job == "fid_stats":
        return {"features": FEATURES_PRECISION}
    record = {"sampling": e.decoding.precision}
    if denoised:
        record["tweedie_score"] = e.decoding.precision
    if job == "fid":
        record["features"] = FEATURES_PRECISION
    return record
