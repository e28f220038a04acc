"""The run config: one dataclass per component (data, optimisation, DeepSpeed, cluster, training loop,
evaluation) composed into `RunConfig`, which is dumped as `config.yaml` into every run directory and checkpoint.
The defaults are the tiny CPU run the Quickstart launches, so an empty YAML file is a valid config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from .checks import ConfigError, check_at_least, check_no_nan
from .memory import (
    GIB,
    MemoryEstimate,
    count_parameters,
    derived_bucket_size,
    estimate_training_memory,
    usable_bytes,
)
from .models import TarFlowConfig


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
        check_no_nan(self, "data")
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
        check_no_nan(self, "optim")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"optim.lr={self.lr} must be a finite number > 0")
        check_at_least(self, "optim", 0, "min_lr", "weight_decay", "warmup_steps", "grad_clip")
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
    # Recompute each Transformer layer in backward. None: derived on GPU runs, on only where the memory estimate
    # needs it (docs/gpu.md, "Memory-aware micro-batch"); off on CPU. true/false: as set.
    activation_checkpointing: bool | None = None
    compile: bool = False
    # Communication (ZeRO 1/2): overlap gradient reduction with backward; None: on with GPUs, off on CPU/gloo.
    overlap_comm: bool | None = None
    contiguous_gradients: bool = True  # copy gradients into one buffer as they are produced (less fragmentation)
    # Elements per gradient-reduction collective, and per all-gather after the step (ZeRO 1/2). 0: derived from the
    # model size, 1/8 of the parameters within [5e7, 2e8] (docs/gpu.md), so reduction overlaps the backward pass.
    reduce_bucket_size: int = 0
    allgather_bucket_size: int = 0

    def validate(self) -> None:
        if self.zero_stage not in (1, 2, 3):
            raise ConfigError(f"deepspeed.zero_stage={self.zero_stage} must be 1, 2 or 3")
        for name in ("reduce_bucket_size", "allgather_bucket_size"):
            if getattr(self, name) < 0:
                raise ConfigError(f"deepspeed.{name} must be >= 0 (0: derived from the model size)")


@dataclass
class ClusterConfig:
    """Ray: where to run and how many workers."""

    address: str | None = None  # None: RAY_ADDRESS or an embedded local cluster
    num_workers: int = 2
    use_gpu: bool = False
    # Memory of each worker's GPU, GiB as the device reports it (H100 80GB: 79.6, H200: 140); with use_gpu, the
    # derived micro-batch is the largest whose estimated peak fits (docs/gpu.md). Unused on CPU.
    gpu_memory_gib: float = 80.0
    cpus_per_worker: int = 1
    max_failures: int = 2  # worker-group restarts from the last checkpoint before giving up

    def validate(self) -> None:
        if self.num_workers < 1:
            raise ConfigError("cluster.num_workers must be >= 1 (DeepSpeed needs a process group)")
        check_at_least(self, "cluster", 1, "cpus_per_worker", "gpu_memory_gib")
        check_at_least(self, "cluster", -1, "max_failures")  # -1: retry without limit (Ray's convention)


@dataclass
class TrainConfig:
    """The training loop. Durations count optimizer steps; the global batch is fixed across world sizes."""

    num_steps: int = 200
    global_batch_size: int = 32
    # Per rank per forward pass. 0: derived, global_batch_size / (cluster.num_workers x grad_accum_steps), so a
    # recipe runs at 8, 16 or 32 workers by changing only cluster.num_workers; on GPUs, the largest that fits
    # cluster.gpu_memory_gib by the memory estimate (docs/gpu.md).
    micro_batch_size: int = 0
    grad_accum_steps: int = 0  # 0: derived (the fewest that keep the micro-batch within memory and the cap)
    max_micro_batch_size: int = 0  # a cap on the derived micro-batch, beside the memory estimate (0: none)
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
        check_no_nan(self, "train")
        check_at_least(self, "train", 1, "num_steps", "global_batch_size", "log_every")
        check_at_least(self, "train", 1, "checkpoint_every", "keep_checkpoints", "num_samples")
        check_at_least(self, "train", 1, "max_nonfinite_in_a_row")
        check_at_least(self, "train", 0, "sample_every", "fault_at_step")
        # 0 means derived for these three (see RunConfig.micro_batch_size).
        check_at_least(self, "train", 0, "micro_batch_size", "grad_accum_steps", "max_micro_batch_size")
        if not 0 <= self.label_dropout < 1:
            raise ConfigError("train.label_dropout must be in [0, 1)")


@dataclass
class EvalConfig:
    """Which evaluation jobs `tarflow-eval` runs and how (tarflow_scale/evaluation/)."""

    # Keys that moved (config/loading.py names the new key when an old one is given).
    MOVED_KEYS: ClassVar[dict[str, str]] = {
        "num_workers": "cluster.num_workers (evaluation runs on the cluster's workers)",
    }

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
    # Images per forward+backward of the Tweedie step (its activations are kept for the backward pass: about
    # 3 GiB per 64x64 image for the paper's model in fp32); 0: eval.batch_size. The default fits an 80 GB GPU.
    denoise_batch_size: int = 16
    out_dir: str = ""  # metrics.json and PNGs; "": an `eval` folder beside the checkpoint
    progress_every_s: float = 10.0  # seconds between progress lines on the driver

    def validate(self) -> None:
        check_no_nan(self, "eval")
        if not self.jobs:
            raise ConfigError("eval.jobs is empty (choose from bpd, sample, denoise, fid_stats, fid)")
        for name in ("batch_size", "num_samples", "bpd_draws"):
            if getattr(self, name) < 1:
                raise ConfigError(f"eval.{name} must be >= 1")
        if self.fid_num_samples < 2:
            raise ConfigError("eval.fid_num_samples must be >= 2 (a covariance needs two samples)")
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
        resolve_batching(self)
        return self

    @property
    def micro_batch_size(self) -> int:
        """Images per rank per forward pass (train.micro_batch_size, or derived when 0)."""
        return resolve_batching(self).micro_batch_size

    @property
    def grad_accum_steps(self) -> int:
        """Micro-batches per optimizer step on each rank (train.grad_accum_steps, or derived when 0)."""
        return resolve_batching(self).grad_accum_steps

    @property
    def activation_checkpointing(self) -> bool:
        """deepspeed.activation_checkpointing, or derived from the memory estimate when unset."""
        return resolve_batching(self).activation_checkpointing

    @property
    def memory_estimate(self) -> MemoryEstimate:
        """Estimated per-GPU peak of a training step at the resolved batching (config/memory.py)."""
        return resolve_batching(self).memory


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


# A derived micro-batch of fewer tokens than this leaves a GPU's matmuls short of rows (and per-step overheads
# grow): below it, activation checkpointing is turned on where that allows a larger micro-batch (docs/gpu.md).
MIN_EFFICIENT_TOKENS = 4096


@dataclass(frozen=True)
class Batching:
    """How each rank makes up its share of the global batch, and the per-GPU memory that takes."""

    micro_batch_size: int
    grad_accum_steps: int
    activation_checkpointing: bool
    memory: MemoryEstimate


def resolve_precision(config: RunConfig) -> str:
    """'auto' means fp32 on CPU and for uniform dequantization (a bits/dim bound needs the input's resolution),
    bf16 otherwise. fp32 on GPU runs TF32 matmuls unless deepspeed.tf32=false."""
    if config.deepspeed.precision == "auto":
        if not config.cluster.use_gpu or config.data.noise == "uniform":
            return "fp32"
        return "bf16"
    return config.deepspeed.precision


def resolve_overlap_comm(config: RunConfig) -> bool:
    """deepspeed.overlap_comm, or on with GPUs and off on CPU/gloo when unset."""
    ds = config.deepspeed
    return config.cluster.use_gpu if ds.overlap_comm is None else ds.overlap_comm


def resolve_bucket_sizes(config: RunConfig) -> tuple[int, int]:
    """(reduce, all-gather) bucket elements: the explicit values, or derived from the model size when 0."""
    ds = config.deepspeed
    derived = derived_bucket_size(count_parameters(config.model))
    return ds.reduce_bucket_size or derived, ds.allgather_bucket_size or derived


def estimate_memory(config: RunConfig, micro_batch_size: int, activation_checkpointing: bool) -> MemoryEstimate:
    """The per-GPU training peak of this run at a given micro-batch and checkpointing setting."""
    return estimate_training_memory(
        config.model,
        micro_batch_size=micro_batch_size,
        precision=resolve_precision(config),
        activation_checkpointing=activation_checkpointing,
        zero_stage=config.deepspeed.zero_stage,
        world_size=config.cluster.num_workers,
        reduce_bucket_size=resolve_bucket_sizes(config)[0],
        overlap_comm=resolve_overlap_comm(config),
        ema=config.optim.ema_decay > 0,
        num_samples=config.train.num_samples,
    )


def resolve_batching(config: RunConfig) -> Batching:
    """The micro-batch per rank, accumulation steps (micro x workers x accumulation = global batch) and activation
    checkpointing of a run.

    Values left at 0 (None for checkpointing) are derived; an explicit value is an error only when no derived
    partner makes the product exact, or, on GPUs, when it cannot fit cluster.gpu_memory_gib. Derived on GPUs:
    the largest micro-batch whose estimated peak fits, without checkpointing (it costs one more forward pass) as
    long as that micro-batch has MIN_EFFICIENT_TOKENS tokens (or is the whole per-rank batch); below that, with
    checkpointing if it allows a larger micro-batch, and with it whenever nothing fits without. The messages name
    the keys to change.
    """
    key = repr((config.model, config.train, config.deepspeed, config.cluster, config.data.noise, config.optim))
    if key not in _BATCHING_CACHE:  # the trainer asks at every micro-step; a few configs per process
        if len(_BATCHING_CACHE) >= 256:
            _BATCHING_CACHE.clear()
        _BATCHING_CACHE[key] = _derive_batching(config)
    return _BATCHING_CACHE[key]


_BATCHING_CACHE: dict[str, Batching] = {}


def _derive_batching(config: RunConfig) -> Batching:
    train, num_workers = config.train, config.cluster.num_workers
    candidates = _micro_batch_candidates(train, num_workers)  # largest first
    per_rank = train.global_batch_size // num_workers
    explicit = config.deepspeed.activation_checkpointing

    def plan(micro: int, checkpointing: bool) -> Batching:
        return Batching(micro, per_rank // micro, checkpointing, estimate_memory(config, micro, checkpointing))

    if not config.cluster.use_gpu:  # no GPU memory to fit: the largest micro-batch, checkpointing as set
        return plan(candidates[0], bool(explicit))
    budget = usable_bytes(config.cluster.gpu_memory_gib)

    def largest_fitting(checkpointing: bool) -> Batching | None:
        for micro in candidates:
            option = plan(micro, checkpointing)
            if option.memory.peak <= budget:
                return option
        return None

    plain = largest_fitting(False) if explicit is not True else None
    if plain is not None:
        efficient = plain.micro_batch_size * config.model.num_tokens >= MIN_EFFICIENT_TOKENS
        if explicit is False or efficient or plain.micro_batch_size == candidates[0]:
            return plain
    recomputed = largest_fitting(True) if explicit is not False else None
    if recomputed is not None and (plain is None or recomputed.micro_batch_size > plain.micro_batch_size):
        return recomputed
    if plain is not None:
        return plain
    smallest = plan(candidates[-1], explicit is not False)
    raise ConfigError(_does_not_fit(config, smallest, budget))


def _does_not_fit(config: RunConfig, smallest: Batching, budget: int) -> str:
    """The error for a run with no micro-batch that fits: the estimate of the leanest plan and the keys to change."""
    train, memory = config.train, smallest.memory
    tried = f"micro-batch {smallest.micro_batch_size}"
    if train.micro_batch_size or train.grad_accum_steps:
        tried += f" (train.micro_batch_size={train.micro_batch_size}, train.grad_accum_steps={train.grad_accum_steps})"
    tried += f" {'with' if smallest.activation_checkpointing else 'without'} activation checkpointing"
    step = memory.activations + memory.backward_workspace
    parts = f"model states {memory.model_states / GIB:.1f} GiB, training step {step / GIB:.1f} GiB"
    knobs = ""
    if memory.sampling_cache > step:
        parts += f", end-of-run sample grid {memory.sampling_cache / GIB:.1f} GiB"
        knobs = "train.num_samples (the sample grid's KV cache), "
    return (
        f"the training step does not fit cluster.gpu_memory_gib={config.cluster.gpu_memory_gib:g} (usable "
        f"{budget / GIB:.1f} GiB): {tried} needs an estimated {memory.peak / GIB:.1f} GiB per GPU ({parts}; "
        "`tarflow-train --dry-run` prints the breakdown). Change train.micro_batch_size or train.grad_accum_steps "
        "(0 derives them), deepspeed.activation_checkpointing (true), deepspeed.zero_stage (3 shards the weights), "
        f"{knobs}cluster.num_workers (more GPUs share the optimizer state and the batch) or cluster.gpu_memory_gib "
        "(if the GPUs have more)"
    )


def _micro_batch_candidates(train: TrainConfig, num_workers: int) -> list[int]:
    """Micro-batches that make up the global batch exactly with the explicit values, largest first."""
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
        return [micro]
    if micro:
        if per_rank % micro:
            raise ConfigError(
                f"train.micro_batch_size={micro} cannot work with cluster.num_workers={num_workers}: "
                f"train.global_batch_size={total} gives {per_rank} images per rank, not a multiple of {micro} "
                "(set train.micro_batch_size=0 to derive it)"
            )
        return [micro]
    if accum:
        if per_rank % accum:
            raise ConfigError(
                f"train.grad_accum_steps={accum} does not divide the {per_rank} images per rank "
                f"(train.global_batch_size={total} / cluster.num_workers={num_workers})"
            )
        return [per_rank // accum]
    # Both derived: every exact split within the cap, the fewest accumulation steps first (steps = per_rank gives
    # a micro-batch of 1, always within any cap).
    return [
        per_rank // steps
        for steps in range(1, per_rank + 1)
        if per_rank % steps == 0 and (not cap or per_rank // steps <= cap)
    ]
