"""The run config: one dataclass per component (data, optimisation, DeepSpeed, cluster, training loop,
evaluation) composed into `RunConfig`, which is dumped as `config.yaml` into every run directory and checkpoint.
The defaults are the tiny CPU run the Quickstart launches, so an empty YAML file is a valid config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from .batching import resolve_batching
from .checks import ConfigError, check_at_least, check_no_nan
from .memory import MemoryEstimate
from .models import TarFlowConfig
from .sampling import Decoding, Guidance, Precision
from .sweep import SweepConfig


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
    # Whether the joined cluster may still grow: a Ray autoscaler adds nodes on request, or nodes are still joining
    # (launch/slurm.sbatch). false: workers that do not fit its nodes now are refused at once, with the numbers.
    # true: their resources are requested from the autoscaler and the start waits up to startup_timeout_s for
    # them. An embedded local cluster never grows.
    autoscale: bool = False
    startup_timeout_s: float = 600.0

    def validate(self) -> None:
        if self.num_workers < 1:
            raise ConfigError("cluster.num_workers must be >= 1 (DeepSpeed needs a process group)")
        check_at_least(self, "cluster", 1, "cpus_per_worker", "gpu_memory_gib")
        check_at_least(self, "cluster", -1, "max_failures")  # -1: retry without limit (Ray's convention)
        check_at_least(self, "cluster", 0, "startup_timeout_s")


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

    def validate(self) -> None:
        check_no_nan(self, "train")
        check_at_least(self, "train", 1, "num_steps", "global_batch_size", "log_every")
        check_at_least(self, "train", 1, "checkpoint_every", "keep_checkpoints", "num_samples")
        check_at_least(self, "train", 1, "max_nonfinite_in_a_row")
        check_at_least(self, "train", 0, "sample_every")
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
        "guidance": "eval.guidance.weight",
        "guidance_annealed": "eval.guidance.annealed",
        "attn_temp": "eval.guidance.attn_temp",
        "decoding": "eval.decoding.mode",
        "decoding_tol": "eval.decoding.tol",
        "decoding_max_iters": "eval.decoding.max_iters",
        "decoding_segment_size": "eval.decoding.segment_size",
        "decoding_sequential_blocks": "eval.decoding.sequential_blocks",
        "decoding_compile": "eval.decoding.compile",
        "decoding_cuda_graph": "eval.decoding.cuda_graph",
        "precision": "eval.decoding.precision",
    }

    # bpd: exact bits/dim on data.eval_split; sample: a PNG grid of num_samples; denoise: the same samples after
    # one Tweedie step; fid_stats: (re)compute the FID reference statistics of data.train_split; fid: FID + KID.
    jobs: list[Literal["bpd", "sample", "denoise", "fid_stats", "fid"]] = field(
        default_factory=lambda: ["bpd", "sample"]
    )
    batch_size: int = 64  # per worker per forward pass: images sampled, scored or featurised at once
    num_samples: int = 64  # sample/denoise: images in the grid (sample indices 0 .. num_samples - 1)
    seed: int = 0  # sample k uses noise seeded by (seed, k); dequantization noise by (seed, image key, draw)
    # Sampling (sample, denoise, fid): eval.guidance.weight / .annealed / .attn_temp and eval.decoding.mode / .tol /
    # .max_iters / .segment_size / .sequential_blocks / .precision / .compile / .cuda_graph (config/sampling.py,
    # docs/sampling.md). eval.decoding.precision is also the Tweedie score's. Bits/dim uses neither (no guidance).
    guidance: Guidance = field(default_factory=Guidance)
    decoding: Decoding = field(default_factory=Decoding)
    # Bits/dim's precision: fp32 (strict fp32, the exact likelihood); tf32 (TF32 CUDA matmuls) or bf16 (the
    # Transformer trunk under bf16 autocast, the flow state fp32) trade exactness for speed (docs/gpu.md).
    bpd_precision: Precision = "fp32"
    max_redraws: int = 10  # a non-finite sample is redrawn with a derived seed at most this many times, then error
    bpd_draws: int = 1  # K: dequantization draws per image; the per-image BPD is their mean
    # Gaussian noise std (on [-1, 1]) the Tweedie step removes; 0: the checkpoint's training data.noise_std.
    denoise_noise_std: float = 0.0
    denoise_step: float = 1.0  # multiplier on the Tweedie step sigma^2 * score (1: the posterior mean)
    fid_num_samples: int = 50_000  # generated images; class-balanced (label = index % num_classes) if conditional
    # Score samples after the Tweedie step when the model was trained with Gaussian noise (as TarFlow does).
    fid_denoise: bool = True
    fid_save_png: bool = False  # also write every FID sample to OUT/fid_samples/<index>.png (shared storage)
    # Score existing images instead of generating them: a folder holding a tarflow-data split (shards and their
    # manifest, e.g. `tarflow-sample --format shards` output) or a folder of 8-bit PNGs. The first
    # eval.fid_num_samples images (in the split's order, or by file name) are scored; the checkpoint is still
    # required and recorded, but nothing is sampled, so the sampling settings are not used.
    fid_samples: str = ""
    fid_samples_split: str = ""  # the split of a folder holding several manifests ("": its only one)
    # FID per sampling setting in one fid job: eval.sweep.guidance / .attn_temp / .denoise_step / .decoding_mode,
    # lists of values (several: their grid). Writes sweep.csv, sweep.png and sweep_grid.png (config/sweep.py).
    sweep: SweepConfig = field(default_factory=SweepConfig)
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
    # 1.9 GiB per 64x64 image for the paper's model in fp32); 0: eval.batch_size. The default fits an 80 GB GPU.
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
        if self.progress_every_s <= 0:
            raise ConfigError("eval.progress_every_s must be > 0")
        if self.fid_samples_split and not self.fid_samples:
            raise ConfigError("eval.fid_samples_split is set but eval.fid_samples is empty")
        if self.sweep.active:
            if "fid" not in self.jobs:
                raise ConfigError(
                    f"eval.sweep ({', '.join(self.sweep.swept())}) scores FID per setting, but eval.jobs={self.jobs} "
                    "has no fid: add fid to eval.jobs (the sample and denoise jobs use eval.guidance / eval.decoding)"
                )
            if self.fid_samples:
                raise ConfigError(
                    "eval.sweep and eval.fid_samples exclude each other: a sweep generates its samples per setting, "
                    "eval.fid_samples scores images that exist"
                )
        self.sweep.points(self.guidance, self.decoding, self.denoise_step)  # each setting's own checks


@dataclass
class RunConfig:
    """Everything one run needs; dumped as `config.yaml` into the run directory."""

    run_dir: str = "runs/tiny"
    model: TarFlowConfig = field(default_factory=TarFlowConfig)
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

    An empty run_dir (an unset shell variable) is refused: it would train into the current folder.
    Object-store URIs (s3://, gs://, ...) are refused: besides Ray's checkpoints, rank 0 writes metrics, sample
    grids and the export into run_dir with ordinary file I/O, and evaluation reads it the same way. Mount the
    bucket (or use NFS/FSx/Filestore) on every node and pass the mount point.
    """
    if not run_dir.strip():
        raise ConfigError(
            f"run_dir={run_dir!r} is empty (an unset shell variable?); name the run's folder, e.g. run_dir=runs/my_run"
        )
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
