"""Architecture configs of the model families: TarFlow (images), T-NAF and MAF (vectors). Each is stored with
what it describes (checkpoint, export, study result), so the model can be rebuilt without retyping flags."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .checks import ConfigError, check_at_least, check_no_nan


@dataclass
class TarFlowConfig:
    """Architecture of a TarFlow model (arXiv 2412.06329). Stored inside every checkpoint and export."""

    image_size: int = 64  # H = W of the input, pixels
    in_channels: int = 3
    patch_size: int = 4  # p: a token is a p x p patch, D = C * p^2 values
    channels: int = 128  # Transformer width
    num_blocks: int = 4  # flow blocks, each with its own causal Transformer
    layers_per_block: int = 2
    head_dim: int = 32
    mlp_ratio: float = 4.0
    num_classes: int = 0  # 0: unconditional
    # How an unconditional (or dropped) label is embedded: its own learned vector, or the classes' mean.
    null_label: Literal["learned", "mean"] = "learned"
    # Per-token transform: affine NVP, its volume-preserving variant, shift-only (the reference's nvp=False),
    # rational-quadratic spline, mixture CDF.
    transform: Literal["affine", "affine_vp", "shift", "spline", "mixture"] = "affine"
    num_bins: int = 8  # spline: K bins
    spline_bound: float = 4.0  # spline: bins cover [-B, B]; identity tails outside
    num_components: int = 4  # mixture: K logistics
    # Prior on z: standard normal, or a learned per-dimension variance (used with affine_vp).
    prior: Literal["standard", "learned"] = "standard"
    # Invertible linear layer on each token's D features between consecutive blocks (tarflow_scale/models/mixing.py):
    # none (the paper's architecture); a fixed random permutation (log-det 0); or CDFlow, W = D_0 C_0 ... C_{m-1} D_m
    # with circulant C_j applied by FFT, identity at init. The blocks' sequence flip is kept either way
    # (autoregressive order).
    mixer: Literal["none", "permute", "cdflow"] = "cdflow"
    mixer_factors: int = 2  # cdflow: m circulant factors (and m + 1 diagonals), (2m + 1) D parameters per mixer
    # A LayerNorm on each block's Transformer output before the head. false: the head reads the residual stream
    # directly and the block has no `norm_out` keys (the reference ml-tarflow structure; see docs/interop.md).
    final_norm: bool = True

    @property
    def token_dim(self) -> int:
        return self.in_channels * self.patch_size**2

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_dims(self) -> int:
        return self.in_channels * self.image_size**2

    def validate(self) -> None:
        check_no_nan(self, "model")
        check_at_least(self, "model", 1, "image_size", "patch_size")  # before the divisions below
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"model.image_size={self.image_size} is not divisible by model.patch_size={self.patch_size}"
            )
        if self.channels % self.head_dim:
            raise ConfigError(f"model.channels={self.channels} is not divisible by model.head_dim={self.head_dim}")
        if self.num_tokens < 2:
            raise ConfigError("model: an image must have at least 2 patches (lower model.patch_size)")
        for name in ("in_channels", "channels", "num_blocks", "layers_per_block", "head_dim", "num_bins"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1")
        if self.num_classes < 0:
            raise ConfigError("model.num_classes must be >= 0 (0 means unconditional)")
        if self.transform == "affine_vp" and self.prior != "learned":
            raise ConfigError("model.transform=affine_vp keeps volume, so it needs model.prior=learned")
        if self.mixer_factors < 1:
            raise ConfigError("model.mixer_factors must be >= 1")
        check_at_least(self, "model", 1, "num_components")
        if not self.mlp_ratio > 0 or not self.spline_bound > 0:
            raise ConfigError("model.mlp_ratio and model.spline_bound must be > 0")


@dataclass
class TNAFConfig:
    """Architecture of a T-NAF model for vectors x in R^D. Stored with every result, so a run can be rebuilt."""

    num_dims: int = 64  # D: one token per dimension
    channels: int = 64  # Transformer width
    num_flow_layers: int = 1  # stacked T-NAF layers, each with its own Transformer; the order flips between them
    layers_per_flow: int = 2  # Transformer layers in each flow layer
    head_dim: int = 16
    mlp_ratio: float = 4.0
    # Per-dimension monotonic transform: deep sigmoidal flow (NAF), rational-quadratic spline, mixture of
    # logistics CDF, or affine (then a layer is a Transformer MAF).
    transform: Literal["dsf", "spline", "mixture", "affine"] = "dsf"
    dsf_hidden: int = 8  # dsf: H sigmoid units per stage
    dsf_stages: int = 1  # dsf: stages composed per dimension (1: NAF's DSF)
    dsf_inverse_tol: float = 1e-10  # dsf: bisection stops at half-width <= tol (1 + |x|)
    num_bins: int = 8  # spline: K bins
    spline_bound: float = 4.0  # spline: bins cover [-B, B]; identity tails outside
    num_components: int = 4  # mixture: K logistics

    def validate(self) -> None:
        for name in ("num_flow_layers", "layers_per_flow", "head_dim", "channels", "dsf_hidden", "dsf_stages"):
            if getattr(self, name) < 1:
                raise ConfigError(f"tnaf.{name} must be >= 1")
        if self.num_dims < 2:
            raise ConfigError("tnaf.num_dims must be >= 2 (a single dimension needs no autoregressive flow)")
        if self.channels % self.head_dim:
            raise ConfigError(f"tnaf.channels={self.channels} is not divisible by tnaf.head_dim={self.head_dim}")
        if self.dsf_inverse_tol <= 0:
            raise ConfigError("tnaf.dsf_inverse_tol must be > 0")


@dataclass
class MAFConfig:
    """Architecture of a MAF over vectors x in R^D."""

    num_dims: int = 64  # D
    hidden_width: int = 256  # units in each MADE hidden layer
    num_hidden_layers: int = 2  # hidden layers per MADE
    num_flow_layers: int = 5  # stacked MADE-affine layers; the dimension order flips between them

    def validate(self) -> None:
        if self.num_dims < 2:
            raise ConfigError("maf.num_dims must be >= 2")
        for name in ("hidden_width", "num_hidden_layers", "num_flow_layers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"maf.{name} must be >= 1")
        if self.hidden_width < self.num_dims - 1:
            raise ConfigError(
                f"maf.hidden_width={self.hidden_width} must be >= num_dims - 1 = {self.num_dims - 1}, so that every "
                "hidden degree occurs and each dimension can see all earlier ones"
            )
