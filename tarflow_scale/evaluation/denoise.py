"""Score-based denoising of samples from a model trained on Gaussian-noised data (TarFlow §2.4, Tweedie).

The maths lives in `tarflow_scale.sampling` (so `sample_images` and `tarflow-sample` denoise without the
evaluation stack); this module keeps the evaluation's import path.
"""

from __future__ import annotations

from ..sampling import score, tweedie_denoise

__all__ = ["score", "tweedie_denoise"]
