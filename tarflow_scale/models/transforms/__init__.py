"""Per-token monotonic transforms for TarFlow blocks, and the factory that picks one from the config."""

from __future__ import annotations

from .affine import AffineTransform, ShiftTransform, VolumePreservingAffineTransform
from .base import TokenTransform, at_least_fp32

__all__ = [
    "AffineTransform",
    "ShiftTransform",
    "TokenTransform",
    "VolumePreservingAffineTransform",
    "at_least_fp32",
    "build_transform",
]


def build_transform(config) -> TokenTransform:
    """The transform named by `config.transform` (a TarFlowConfig or TNAFConfig: any object with the fields)."""
    if config.transform == "affine":
        return AffineTransform()
    if config.transform == "affine_vp":
        return VolumePreservingAffineTransform()
    if config.transform == "shift":
        return ShiftTransform()
    if config.transform == "spline":
        from .spline import RationalQuadraticSplineTransform

        return RationalQuadraticSplineTransform(num_bins=config.num_bins, bound=config.spline_bound)
    if config.transform == "mixture":
        from .mixture import MixtureCDFTransform

        return MixtureCDFTransform(num_components=config.num_components)
    if config.transform == "dsf":
        from .sigmoidal import DeepSigmoidalTransform

        return DeepSigmoidalTransform(config.dsf_hidden, config.dsf_stages, inverse_tol=config.dsf_inverse_tol)
    raise ValueError(f"transform={config.transform!r} is not one of affine, affine_vp, shift, spline, mixture, dsf")
