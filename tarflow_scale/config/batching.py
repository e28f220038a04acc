"""How each rank makes up its share of the global batch: micro-batch, accumulation steps and activation
checkpointing, derived on GPUs from the per-GPU memory estimate (config/memory.py), and the settings that estimate
resolves (precision, communication buckets)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .checks import ConfigError
from .memory import (
    GIB,
    MemoryEstimate,
    count_parameters,
    derived_bucket_size,
    estimate_training_memory,
    usable_bytes,
)

if TYPE_CHECKING:
    from .run import RunConfig, TrainConfig

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
