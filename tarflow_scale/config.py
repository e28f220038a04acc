"""Typed run configuration: dataclass defaults -> YAML file -> dotted command-line overrides.

Every component (model, data, optimisation, ZeRO, cluster, evaluation) owns one dataclass; `RunConfig`
composes them. Unknown keys and values of the wrong type are errors that name the dotted key at fault.
The defaults are the tiny CPU run the Quickstart launches, so an empty YAML file is a valid config.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message names the file and/or dotted key."""


def _check_at_least(section: Any, prefix: str, minimum: float, *names: str) -> None:
    """Each named field is a finite number >= minimum; else a ConfigError naming `prefix.name`."""
    for name in names:
        value = getattr(section, name)
        if not math.isfinite(value) or value < minimum:
            raise ConfigError(f"{prefix}.{name}={value} must be >= {minimum:g}")


def _check_no_nan(section: Any, prefix: str) -> None:
    """NaN passes every `<`/`>` comparison as False, so range checks alone let it through: refuse it here."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        values = value if isinstance(value, (tuple, list)) else [value]
        if any(isinstance(v, float) and math.isnan(v) for v in values):
            raise ConfigError(f"{prefix}.{f.name}={value} is not a number")


# ----------------------------------------------------------------------------------------------------------
# Component configs


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
    # Invertible linear layer on each token's D features between consecutive blocks (tarflow_scale/mixing.py):
    # none; a fixed random permutation (log-det 0); or CDFlow, W = D_0 C_0 ... C_{m-1} D_m with circulant C_j
    # applied by FFT, identity at init. The blocks' sequence flip is kept either way (autoregressive order).
    # The default stays "none" so model configs written before mixers existed load as what they were; the
    # quickstart run sets cdflow (RunConfig's default model, `quickstart_model`).
    mixer: Literal["none", "permute", "cdflow"] = "none"
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
        _check_no_nan(self, "model")
        _check_at_least(self, "model", 1, "image_size", "patch_size")  # before the divisions below
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
        _check_at_least(self, "model", 1, "num_components")
        if not self.mlp_ratio > 0 or not self.spline_bound > 0:
            raise ConfigError("model.mlp_ratio and model.spline_bound must be > 0")


@dataclass
class DataConfig:
    """Where the shards are and how training samples are augmented."""

    # Folder holding `<name>-<split>-NNNNNN.tar` shards and their `<split>.json` manifest, or "bundled" for the
    # small real dataset built from the photographs inside scikit-image / scikit-learn. Also a URL prefix
    # webdataset opens ("https://host/dir"), or a template with {file} where the file name goes, e.g.
    # "pipe:aws s3 cp s3://bucket/imagenet64/{file} -".
    path: str = "bundled"
    train_split: str = "train"
    eval_split: str = "val"
    # Side of the images the loaders yield, pixels; must equal model.image_size. 0 keeps the shards' own size
    # (64 for ImageNet64 and the bundled set); a smaller value area-downsamples in the loader workers (e.g.
    # ImageNet64 shards -> 32x32 for a small model).
    image_size: int = 0
    # Noise augmentation in the [-1, 1] pixel scale: "gaussian" (std noise_std) or "uniform" dequantization.
    # The quickstart trains a density model (uniform, so its held-out bits/dim bounds the discrete NLL); the
    # paper's generation recipes (configs/imagenet64_cond.yaml) use gaussian with noise_std 0.05.
    noise: Literal["gaussian", "uniform", "none"] = "uniform"
    noise_std: float = 0.05
    hflip: bool = True
    shuffle_buffer: int = 1000  # samples per loader worker; 0 or 1: no shuffling beyond shard resampling
    num_workers: int = 1  # DataLoader processes per rank
    seed: int = 0
    # Training skips corrupt samples and shards (counted, with a warning) but stops with an error after this
    # many in a row: then the data is unreadable, not occasionally damaged.
    max_corrupt_in_a_row: int = 100

    def validate(self) -> None:
        _check_no_nan(self, "data")
        if self.noise == "gaussian" and self.noise_std <= 0:
            raise ConfigError("data.noise_std must be > 0 with data.noise=gaussian")
        if self.num_workers < 0:
            raise ConfigError("data.num_workers must be >= 0")
        if self.image_size < 0:
            raise ConfigError("data.image_size must be >= 0 (0 keeps the shards' size)")
        if self.shuffle_buffer < 0:
            raise ConfigError("data.shuffle_buffer must be >= 0")
        if self.max_corrupt_in_a_row < 1:
            raise ConfigError("data.max_corrupt_in_a_row must be >= 1")


@dataclass
class OptimConfig:
    """AdamW with cosine decay after a linear warmup."""

    lr: float = 2e-3
    min_lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    grad_clip: float = 1.0  # explicit: DeepSpeed clips at 1.0 unless told otherwise; 0 disables
    ema_decay: float = 0.0  # 0: no EMA (as in the paper)

    def validate(self) -> None:
        _check_no_nan(self, "optim")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"optim.lr={self.lr} must be a finite number > 0")
        _check_at_least(self, "optim", 0, "min_lr", "weight_decay", "warmup_steps", "grad_clip")
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas={list(self.betas)} must each be in [0, 1)")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError("optim.ema_decay must be in [0, 1)")


@dataclass
class DeepSpeedConfig:
    """The DeepSpeed engine; its JSON config is generated from this, never written by hand."""

    zero_stage: int = 2
    # auto: fp32 for data.noise=uniform (bf16 would round the dequantization away: bits/dim stops being a bound)
    # and on CPU; bf16 otherwise. bf16 runs only the Transformer trunk under autocast: weights, flow state,
    # transforms, log-dets and prior stay fp32 (docs/gpu.md).
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    tf32: bool = True  # fp32 on GPU: TF32 matmuls (about 7x faster on H100); false: strict fp32
    activation_checkpointing: bool = False
    compile: bool = False
    # Communication (ZeRO 1/2): overlap gradient reduction with backward; None: on with GPUs, off on CPU/gloo.
    overlap_comm: bool | None = None
    contiguous_gradients: bool = True  # copy gradients into one buffer as they are produced (less fragmentation)
    reduce_bucket_size: int = 500_000_000  # elements reduced per collective (DeepSpeed's default)
    allgather_bucket_size: int = 500_000_000  # elements gathered per collective after the step (ZeRO 1/2)

    def validate(self) -> None:
        if self.zero_stage not in (1, 2, 3):
            raise ConfigError(f"deepspeed.zero_stage={self.zero_stage} must be 1, 2 or 3")
        for name in ("reduce_bucket_size", "allgather_bucket_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"deepspeed.{name} must be >= 1")


@dataclass
class ClusterConfig:
    """Ray: where to run and how many workers."""

    address: str | None = None  # None: RAY_ADDRESS or an embedded local cluster
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: int = 1
    max_failures: int = 2  # worker-group restarts from the last checkpoint before giving up

    def validate(self) -> None:
        if self.num_workers < 1:
            raise ConfigError("cluster.num_workers must be >= 1 (DeepSpeed needs a process group)")
        _check_at_least(self, "cluster", 1, "cpus_per_worker")
        _check_at_least(self, "cluster", -1, "max_failures")  # -1: retry without limit (Ray's convention)


@dataclass
class TrainConfig:
    """The training loop. Durations count optimizer steps; the global batch is fixed across world sizes."""

    num_steps: int = 200
    global_batch_size: int = 32
    # Per rank per forward pass. 0: derived, global_batch_size / (cluster.num_workers x grad_accum_steps), so a
    # recipe runs at 8, 16 or 32 workers by changing only cluster.num_workers.
    micro_batch_size: int = 0
    grad_accum_steps: int = 0  # 0: derived (1, or as many as max_micro_batch_size / micro_batch_size need)
    max_micro_batch_size: int = 0  # memory cap per GPU when the micro-batch is derived (0: none)
    label_dropout: float = 0.1  # class-conditional only: drop to the null label for guidance
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    sample_every: int = 100  # sample grid PNG (and TensorBoard image) every K steps (0: only at the end)
    num_samples: int = 16
    max_nonfinite_in_a_row: int = 5
    seed: int = 0
    resume_from: str = ""  # a checkpoint folder to start from when the run has none of its own yet
    # Fine-tuning: initial weights from an export, a model directory or a training checkpoint (fresh optimizer and
    # schedule). Its model config must equal this run's model section. A resumed run ignores it.
    init_from: str = ""
    fault_at_step: int = 0  # chaos testing: the last rank kills its own process once at this step (0: never)

    def validate(self) -> None:
        _check_no_nan(self, "train")
        _check_at_least(self, "train", 1, "num_steps", "global_batch_size", "log_every")
        _check_at_least(self, "train", 1, "checkpoint_every", "keep_checkpoints", "num_samples")
        _check_at_least(self, "train", 1, "max_nonfinite_in_a_row")
        _check_at_least(self, "train", 0, "sample_every", "fault_at_step")
        # 0 means derived for these three (see RunConfig.micro_batch_size).
        _check_at_least(self, "train", 0, "micro_batch_size", "grad_accum_steps", "max_micro_batch_size")
        if not 0 <= self.label_dropout < 1:
            raise ConfigError("train.label_dropout must be in [0, 1)")


@dataclass
class EvalConfig:
    """Which evaluation jobs `tarflow-eval` runs and how (tarflow_scale/evaluation/)."""

    # bpd: exact bits/dim on data.eval_split; sample: a PNG grid of num_samples; denoise: the same samples after
    # one Tweedie step; fid_stats: (re)compute the FID reference statistics of data.train_split; fid: FID + KID.
    jobs: list[Literal["bpd", "sample", "denoise", "fid_stats", "fid"]] = field(
        default_factory=lambda: ["bpd", "sample"]
    )
    batch_size: int = 64  # per worker per forward pass: images sampled, scored or featurised at once
    num_samples: int = 64  # sample/denoise: images in the grid (sample indices 0 .. num_samples - 1)
    seed: int = 0  # sample k uses noise seeded by (seed, k); dequantization noise by (seed, image key, draw)
    guidance: float = 0.0  # w: params p_c + w (p_c - p_u); 0 is plain (conditional) sampling
    guidance_annealed: bool = False  # w_t = w t / (T - 1) over the tokens of each block
    attn_temp: float = 1.0  # attention temperature of the guiding pass (unconditional guidance, TarFlow §2.5)
    max_redraws: int = 10  # a non-finite sample is redrawn with a derived seed at most this many times, then error
    # How each flow block's inverse is decoded when sampling (docs/sampling.md): sequential (token by token, the
    # reference), jacobi (parallel fixed-point iterations) or gs_jacobi (Jacobi inside segments, in order).
    decoding: Literal["sequential", "jacobi", "gs_jacobi"] = "sequential"
    decoding_tol: float = 1e-4  # jacobi/gs_jacobi: stop once max |x_new - x| <= tol (model units; 8-bit step 2/255)
    decoding_max_iters: int = 0  # iterations per segment; 0: the segment length (always exact)
    decoding_segment_size: int = 64  # gs_jacobi: tokens per segment
    decoding_sequential_blocks: list[int] = field(default_factory=list)  # model.blocks indices decoded sequentially
    decoding_compile: bool = False  # sequential: torch.compile the static-shape per-token step
    decoding_cuda_graph: bool = False  # sequential, GPU: replay the per-token step as one CUDA graph per block
    # Sampling precision: the Transformer's matmuls and KV cache (bf16 halves the cache); the flow state, token
    # transforms and guidance stay fp32. tf32 only changes CUDA matmuls. Bits/dim is not affected (always fp32).
    precision: Literal["fp32", "bf16", "tf32"] = "fp32"
    bpd_draws: int = 1  # K: dequantization draws per image; the per-image BPD is their mean
    # Gaussian noise std (on [-1, 1]) the Tweedie step removes; 0: the checkpoint's training data.noise_std.
    denoise_noise_std: float = 0.0
    denoise_step: float = 1.0  # multiplier on the Tweedie step sigma^2 * score (1: the posterior mean)
    fid_num_samples: int = 50_000  # generated images; class-balanced (label = index % num_classes) if conditional
    # Score samples after the Tweedie step when the model was trained with Gaussian noise (as TarFlow does).
    fid_denoise: bool = True
    fid_save_png: bool = False  # also write every FID sample to OUT/fid_samples/<index>.png (shared storage)
    # Cached reference statistics (.npz). "": <data root>/fid_stats/<split>-clean-<extractor>-<size>px.npz, built
    # from data.train_split on first use. A path given here must exist, or be built by the fid_stats job.
    fid_reference: str = ""
    # Features: "inception" (clean-fid's InceptionV3, real FID) or "pooled_pixels" (2x2 average-pooled pixels:
    # a pipeline smoke test that needs no weights; its numbers are not FID).
    fid_feature_extractor: Literal["inception", "pooled_pixels"] = "inception"
    kid_max_features: int = 10_000  # features kept per side for KID (generated: indices below this); 0: no KID
    # inception-2015-12-05.pt, or a folder holding it; "": clean-fid's own location (/tmp). Never downloaded.
    inception_path: str = ""
    # Removed: evaluation runs on cluster.num_workers workers (the one knob). Kept only so configs stored in
    # older checkpoints (num_workers: 0) still load; any other value is an error.
    num_workers: int = 0
    # Images per forward+backward of the Tweedie step (its activations are kept for the backward pass: about
    # 3 GiB per 64x64 image for the paper's model in fp32); 0: eval.batch_size. The default fits an 80 GB GPU.
    denoise_batch_size: int = 16
    out_dir: str = ""  # metrics.json and PNGs; "": an `eval` folder beside the checkpoint
    progress_every_s: float = 10.0  # seconds between progress lines on the driver

    def validate(self) -> None:
        _check_no_nan(self, "eval")
        if not self.jobs:
            raise ConfigError("eval.jobs is empty (choose from bpd, sample, denoise, fid_stats, fid)")
        for name in ("batch_size", "num_samples", "bpd_draws"):
            if getattr(self, name) < 1:
                raise ConfigError(f"eval.{name} must be >= 1")
        if self.fid_num_samples < 2:
            raise ConfigError("eval.fid_num_samples must be >= 2 (a covariance needs two samples)")
        if self.num_workers:
            raise ConfigError(
                f"eval.num_workers={self.num_workers}: this key was removed; evaluation runs on cluster.num_workers "
                "workers (set cluster.num_workers=N instead)"
            )
        for name in ("max_redraws", "denoise_batch_size", "kid_max_features", "denoise_noise_std"):
            if getattr(self, name) < 0:
                raise ConfigError(f"eval.{name} must be >= 0")
        if self.attn_temp <= 0:
            raise ConfigError("eval.attn_temp must be > 0")
        if not self.decoding_tol >= 0:
            raise ConfigError(f"eval.decoding_tol must be >= 0, got {self.decoding_tol}")
        if self.decoding_max_iters < 0:
            raise ConfigError("eval.decoding_max_iters must be >= 0 (0: the segment length)")
        if self.decoding_segment_size < 1:
            raise ConfigError("eval.decoding_segment_size must be >= 1")
        if self.decoding_compile and self.decoding_cuda_graph:
            raise ConfigError("eval.decoding_compile and eval.decoding_cuda_graph are alternatives: set one")
        if any(k < 0 for k in self.decoding_sequential_blocks):
            raise ConfigError(
                f"eval.decoding_sequential_blocks must be block indices >= 0, got {self.decoding_sequential_blocks}"
            )
        if self.progress_every_s <= 0:
            raise ConfigError("eval.progress_every_s must be > 0")


def quickstart_model() -> TarFlowConfig:
    """The model of the built-in run (configs/tiny.yaml): TarFlowConfig's defaults plus CDFlow mixing."""
    return TarFlowConfig(mixer="cdflow")


@dataclass
class RunConfig:
    """Everything one run needs; dumped as `config.yaml` into the run directory."""

    run_dir: str = "runs/tiny"
    model: TarFlowConfig = field(default_factory=quickstart_model)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> RunConfig:
        for part in (self.model, self.data, self.optim, self.deepspeed, self.cluster, self.train):
            part.validate()
        local_run_dir(self.run_dir)
        if self.data.image_size not in (0, self.model.image_size):
            raise ConfigError(
                f"data.image_size={self.data.image_size} must be 0 (the shards' size) or model.image_size="
                f"{self.model.image_size}"
            )
        if self.optim.ema_decay > 0 and self.deepspeed.zero_stage == 3:
            raise ConfigError("optim.ema_decay>0 needs deepspeed.zero_stage<=2 (ZeRO-3 partitions the weights)")
        resolve_batching(self.train, self.cluster.num_workers)
        return self

    @property
    def micro_batch_size(self) -> int:
        """Images per rank per forward pass (train.micro_batch_size, or derived when 0)."""
        return resolve_batching(self.train, self.cluster.num_workers)[0]

    @property
    def grad_accum_steps(self) -> int:
        """Micro-batches per optimizer step on each rank (train.grad_accum_steps, or derived when 0)."""
        return resolve_batching(self.train, self.cluster.num_workers)[1]


def local_run_dir(run_dir: str) -> Path:
    """The run directory as a local (or mounted shared) path; `file://` URIs are accepted.

    Object-store URIs (s3://, gs://, ...) are refused: besides Ray's checkpoints, rank 0 writes metrics, sample
    grids and the export into run_dir with ordinary file I/O, and evaluation reads it the same way. Mount the
    bucket (or use NFS/FSx/Filestore) on every node and pass the mount point.
    """
    if "://" not in run_dir:
        return Path(run_dir)
    scheme, rest = run_dir.split("://", 1)
    if scheme == "file":
        if not rest.startswith("/"):
            raise ConfigError(f"run_dir={run_dir}: a file:// URI needs an absolute path (file:///shared/runs/x)")
        return Path(rest)
    raise ConfigError(
        f"run_dir={run_dir}: {scheme}:// storage is not supported (metrics, samples and the export are written with "
        "file I/O); mount shared storage on every node and give its path, or a file:// URI"
    )


def resolve_batching(train: TrainConfig, num_workers: int) -> tuple[int, int]:
    """(micro-batch per rank, accumulation steps) with micro x workers x accumulation = global batch.

    Values left at 0 are derived; an explicit value is an error only when no derived partner makes the
    product exact, and the message names the keys at fault.
    """
    total, micro, accum = train.global_batch_size, train.micro_batch_size, train.grad_accum_steps
    cap = train.max_micro_batch_size
    per_rank, remainder = divmod(total, num_workers)
    if remainder:
        raise ConfigError(
            f"train.global_batch_size={total} is not divisible by cluster.num_workers={num_workers}: every rank "
            "must see the same number of images per step"
        )
    if micro and accum:
        if micro * accum != per_rank:
            raise ConfigError(
                f"train.micro_batch_size={micro} x train.grad_accum_steps={accum} x cluster.num_workers="
                f"{num_workers} = {micro * accum * num_workers} != train.global_batch_size={total} (set one of "
                "them to 0 to derive it)"
            )
        return micro, accum
    if micro:
        if per_rank % micro:
            raise ConfigError(
                f"train.micro_batch_size={micro} cannot work with cluster.num_workers={num_workers}: "
                f"train.global_batch_size={total} gives {per_rank} images per rank, not a multiple of {micro} "
                "(set train.micro_batch_size=0 to derive it)"
            )
        return micro, per_rank // micro
    if accum:
        if per_rank % accum:
            raise ConfigError(
                f"train.grad_accum_steps={accum} does not divide the {per_rank} images per rank "
                f"(train.global_batch_size={total} / cluster.num_workers={num_workers})"
            )
        return per_rank // accum, accum
    # Both derived: the fewest accumulation steps that keep the micro-batch within the memory cap.
    for steps in range(1, per_rank + 1):
        if per_rank % steps == 0 and (not cap or per_rank // steps <= cap):
            return per_rank // steps, steps
    raise AssertionError("unreachable: steps = per_rank gives a micro-batch of 1")


# ----------------------------------------------------------------------------------------------------------
# Loading: dict -> dataclass with type checks, YAML files, dotted overrides


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where lossless (int -> float, list -> tuple)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is typing.Union or origin is types.UnionType:
        errors = []
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} is not a {_type_name(tp)}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(tp))}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported config type {tp}")


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a (partial) dict; missing keys keep their defaults."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]!s} (valid keys: {', '.join(sorted(names))})")
    kwargs = {name: _coerce(value, hints[name], f"{prefix}{name}") for name, value in data.items()}
    return cls(**kwargs)


def to_dict(config: Any) -> dict:
    """Plain nested dict (tuples become lists) suitable for YAML and JSON."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for name in parents:
        node = node.setdefault(name, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {name} is not a section")
    node[leaf] = value


def parse_overrides(overrides: list[str]) -> dict:
    """`["model.channels=256", "run_dir=/tmp/x"]` -> nested dict; values are parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. model.channels=256)")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return tree


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


# The recipes shipped inside the package (in a checkout, a symlink to the repository's `configs/`).
SHIPPED_CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def shipped_config_names() -> list[str]:
    """Names accepted by `--config NAME`: the shipped YAML files relative to the configs folder, no suffix."""
    if not SHIPPED_CONFIG_DIR.is_dir():
        return []
    return sorted(
        p.relative_to(SHIPPED_CONFIG_DIR).with_suffix("").as_posix() for p in SHIPPED_CONFIG_DIR.rglob("*.yaml")
    )


def resolve_config_path(ref: str | Path) -> Path:
    """A config file path, or the name of a shipped recipe (`imagenet64_cond`, `tabular/tnaf_digits`).

    An existing file wins; otherwise the name is looked up among the shipped configs, with or without `.yaml`
    and with or without a leading `configs/`, so the README's `--config configs/X.yaml` works from any folder.
    """
    path = Path(ref)
    if path.is_file():
        return path
    name = path.as_posix().removesuffix(".yaml").removesuffix(".yml")
    name = name.removeprefix("./").removeprefix("configs/")
    shipped = SHIPPED_CONFIG_DIR / f"{name}.yaml"
    if not path.is_absolute() and shipped.is_file():
        return shipped
    names = ", ".join(shipped_config_names()) or "(none found)"
    raise ConfigError(f"config file {ref} does not exist, and it is not a shipped config; shipped names: {names}")


def read_yaml_mapping(path: str | Path) -> dict:
    """The top-level mapping of a YAML config file (a path or a shipped config's name); errors name the file."""
    path = resolve_config_path(path)
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return loaded


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, cls: type = RunConfig) -> Any:
    """Defaults, then the YAML file at `path`, then dotted `overrides`; validated.

    The defaults are `cls()` as a tree, so a partial section keeps the run's defaults for the keys it does not
    name (RunConfig's default model differs from a bare TarFlowConfig in its mixer).
    """
    file_tree = read_yaml_mapping(path) if path is not None else {}
    override_tree = parse_overrides(overrides or [])
    # Check each source on its own first, so an error names where the bad key came from.
    try:
        from_dict(cls, override_tree)
    except ConfigError as e:
        raise ConfigError(f"command-line override: {e}") from None
    try:
        from_dict(cls, file_tree)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    config = from_dict(cls, _merge(to_dict(cls()), _merge(file_tree, override_tree)))
    if hasattr(config, "validate"):
        config.validate()
    return config


def dump_config(config: Any, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically (a reader never sees half a config)."""
    from . import atomic

    atomic.write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))


def model_config_from_dict(data: dict) -> TarFlowConfig:
    config = from_dict(TarFlowConfig, data, prefix="model.")
    config.validate()
    return config
