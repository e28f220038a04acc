"""Per-GPU training memory of a TarFlow run, counted from the architecture: the estimate that sizes the micro-batch.

peak = model states + max(micro-batch x (saved activations + backward workspace) + autocast weight copies,
                          optimizer-step workspace, end-of-run sampling cache)

Model states (P parameters, N data-parallel ranks; DeepSpeed's bf16 section stays off, so the
module's parameters, their gradients and the optimizer state are fp32 under every precision policy, docs/gpu.md):

| term | ZeRO-1 | ZeRO-2 | ZeRO-3 |
| --- | --- | --- | --- |
| weights (the module's flat fp32 buffer) | 4P | 4P | 4P/N + two gathered blocks |
| fp32 master partition (DeepSpeed clones it even from fp32 weights) | 4P/N | 4P/N | 4P/N |
| AdamW moments | 8P/N | 8P/N | 8P/N |
| gradients | 4P (kept whole until the step) | 4P/N (this rank's partition) | 4P/N |
| reduce buckets | (1 + overlap_comm) x 4 x reduce_bucket_size | same | same |
| EMA shadow (optim.ema_decay > 0) | 4P | 4P | refused |

Activations are the tensors autograd saves for backward, per image, counted layer by layer (T tokens, width C,
MLP hidden H, nh heads; bytes in brackets are fp32 / bf16-trunk):
  per Transformer layer: residual h [4/4] TC, LayerNorm-1 output [4/2] TC, q k v (one qkv output) [4/2] 3TC,
  attention output (also proj's input: the fused kernels write it token-major) [4/2] TC, LayerNorm-2 input [4/4] TC
  and output [4/2] TC, MLP hidden before and after GELU [4/2] 2TH, plus fp32 statistics: 2 LayerNorms x (mean,
  rstd) 4T and the attention's log-sum-exp nh T;
  per flow block: proj_in's input [4/2] TD, the final LayerNorm's input [4/4] TC and output [4/2] TC with its
  statistics 2T, and the token transform's saved values (fp32, per token value: transform_saved_values);
  per mixer and per image: the mixer's and the prior's saved values.
Activation checkpointing (each Transformer layer recomputed in backward) keeps only each layer's input h (4 TC) and
the block terms; the layer being recomputed adds one layer's activations to the workspace.
The backward workspace holds the gradients in flight through one layer (dh in and out and the MLP hidden's:
4 (2TC + TH), an upper bound). Under the bf16 trunk, autocast's bf16 copies of the trunk's weights are kept from
the forward to the backward (2 bytes per trunk parameter).

On a GPU, `torch.cuda.max_memory_allocated` measures exactly this kind of sum (live tensors); the CUDA context,
cuBLAS/NCCL workspaces and the caching allocator's fragmentation are outside it, hence `usable_bytes`' headroom.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .models import TarFlowConfig

GIB = 2**30
FP32, BF16 = 4, 2  # bytes per value
# Of cluster.gpu_memory_gib, what the estimated peak may use: the rest is the CUDA context (~0.5-1 GiB), cuBLAS and
# NCCL workspaces, and the caching allocator's fragmentation (reserved - allocated, typically 5-10% of the peak).
USABLE_FRACTION = 0.9
RESERVED_GIB = 2.0
# Reduce buckets (ZeRO 1/2): a fraction of the model so that gradient reduction overlaps backward, with a floor that
# keeps each collective large enough for full link bandwidth and a ceiling on the buffers' memory (docs/gpu.md).
BUCKETS_PER_MODEL = 8
BUCKET_FLOOR = 50_000_000
BUCKET_CEILING = 200_000_000
# ZeRO-3 keeps whole blocks gathered while they run: the block in use and the one being prefetched.
ZERO3_GATHERED_BLOCKS = 2


def transform_num_params(model: TarFlowConfig) -> int:
    """Head outputs per token value: the token transform's parameter count (models/transforms)."""
    return {
        "affine": 2,
        "affine_vp": 2,
        "shift": 1,
        "spline": 3 * model.num_bins - 1,
        "mixture": 3 * model.num_components + 2,
    }[model.transform]


def transform_saved_values(model: TarFlowConfig) -> float:
    """Fp32 values the token transform's forward saves for backward per token value (D per token): affine exp(-s)
    and x - shift; the spline's knots, bin gathers and quadratic terms and the mixture's per-component terms grow
    with K (bins, components). Counted with saved-tensor hooks (tests/test_memory.py pins them)."""
    if model.transform == "spline":
        return 8.5 * model.num_bins + 26.0
    if model.transform == "mixture":
        return 19.25 * model.num_components + 10.0
    return {"affine": 2.0, "affine_vp": 2.0, "shift": 0.0}[model.transform]


def mixer_saved_values(model: TarFlowConfig) -> float:
    """Fp32 values one mixer saves per token value: CDFlow's FFTs and diagonals (m factors); likewise counted."""
    return 3.0 * model.mixer_factors + 1.5 if model.mixer == "cdflow" else 0.0


def mlp_hidden(model: TarFlowConfig) -> int:
    return int(model.channels * model.mlp_ratio)


def layer_parameters(model: TarFlowConfig) -> int:
    """One Transformer layer: two LayerNorms, qkv and output projections, the MLP (weights and biases)."""
    C, H = model.channels, mlp_hidden(model)
    return 2 * 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + (C * H + H) + (H * C + C)


def block_parameters(model: TarFlowConfig) -> int:
    """One flow block: proj_in, position and class embeddings, its layers, the final LayerNorm, the head."""
    C, D, T = model.channels, model.token_dim, model.num_tokens
    classes = model.num_classes + (1 if model.null_label == "learned" else 0) if model.num_classes else 0
    head = D * transform_num_params(model)
    norm = 2 * C if model.final_norm else 0
    return (
        (D * C + C) + T * C + classes * C + model.layers_per_block * layer_parameters(model) + norm + (C * head + head)
    )


def count_parameters(model: TarFlowConfig) -> int:
    """Every trainable parameter of TarFlow(model), by arithmetic (equals sum(p.numel()) of the built model)."""
    mixers = (model.num_blocks - 1) * (2 * model.mixer_factors + 1) * model.token_dim if model.mixer == "cdflow" else 0
    prior = model.num_dims if model.prior == "learned" else 0
    return model.num_blocks * block_parameters(model) + mixers + prior


def trunk_parameters(model: TarFlowConfig) -> int:
    """Parameters of the Linear layers that run under the bf16 trunk's autocast (whose bf16 copies it keeps)."""
    C, D, H = model.channels, model.token_dim, mlp_hidden(model)
    head = D * transform_num_params(model)
    linears = (C * 3 * C + 3 * C) + (C * C + C) + (C * H + H) + (H * C + C)
    return model.num_blocks * ((D * C + C) + model.layers_per_block * linears + (C * head + head))


def layer_activation_bytes(model: TarFlowConfig, precision: str) -> int:
    """Bytes one Transformer layer saves for backward per image, without activation checkpointing."""
    T, C, H = model.num_tokens, model.channels, mlp_hidden(model)
    low = BF16 if precision == "bf16" else FP32  # what the trunk's matmuls read
    stats = FP32 * (4 * T + (C // model.head_dim) * T)  # LayerNorm mean/rstd, attention log-sum-exp: fp32 always
    # h and LayerNorm-2's input stay fp32 (the residual stream); LayerNorm outputs, q k v and the attention output
    # are the matmuls' (autocast) inputs; the MLP hidden is saved before and after GELU.
    return FP32 * 2 * T * C + low * (6 * T * C + 2 * T * H) + stats


def activation_bytes_per_image(model: TarFlowConfig, precision: str, checkpointing: bool) -> int:
    """Bytes autograd saves for backward per training image (the module docstring lists every term)."""
    T, C, D = model.num_tokens, model.channels, model.token_dim
    low = BF16 if precision == "bf16" else FP32
    layer = FP32 * T * C if checkpointing else layer_activation_bytes(model, precision)
    final_norm = (FP32 * T * C + FP32 * 2 * T + low * T * C) if model.final_norm else low * T * C
    transform = FP32 * transform_saved_values(model) * T * D
    block = model.layers_per_block * layer + low * T * D + final_norm + transform
    mixers = (model.num_blocks - 1) * FP32 * mixer_saved_values(model) * T * D
    prior = FP32 * model.num_dims * (2 if model.prior == "learned" else 1)
    return int(model.num_blocks * block + mixers + prior)


def workspace_bytes_per_image(model: TarFlowConfig, precision: str, checkpointing: bool) -> int:
    """Transient bytes per image at the backward peak: the gradients in flight through one layer's MLP (its hidden
    and the residual stream in and out), and under activation checkpointing the recomputed layer's activations."""
    T, C, H = model.num_tokens, model.channels, mlp_hidden(model)
    gradients = FP32 * (T * H + 2 * T * C)
    if not checkpointing:
        return gradients
    return gradients + layer_activation_bytes(model, precision) - FP32 * T * C  # its input is kept anyway


def derived_bucket_size(num_params: int) -> int:
    """Elements per ZeRO reduce (and all-gather) bucket: 1/BUCKETS_PER_MODEL of the model within [BUCKET_FLOOR,
    BUCKET_CEILING], never more than the model itself; even, as DeepSpeed aligns all-gather buckets to 4 bytes."""
    size = min(max(math.ceil(num_params / BUCKETS_PER_MODEL), BUCKET_FLOOR), BUCKET_CEILING, num_params)
    return size + size % 2


def usable_bytes(gpu_memory_gib: float) -> int:
    """Of a GPU's memory, what the estimated peak may take (USABLE_FRACTION, less RESERVED_GIB)."""
    return int((USABLE_FRACTION * gpu_memory_gib - RESERVED_GIB) * GIB)


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak memory of one training rank, bytes per term (module docstring)."""

    micro_batch_size: int
    precision: str
    activation_checkpointing: bool
    weights: int
    master_weights: int
    optimizer_moments: int
    gradients: int
    reduce_buckets: int
    ema: int
    activations: int  # micro-batch x saved activations per image
    backward_workspace: int  # micro-batch x one layer's transient, plus autocast's bf16 weight copies
    step_workspace: int  # the optimizer step's temporaries (activations are freed by then)
    sampling_cache: int  # the end-of-run sample grid's KV cache (train.num_samples images, fp32)

    @property
    def model_states(self) -> int:
        return (
            self.weights
            + self.master_weights
            + self.optimizer_moments
            + self.gradients
            + self.reduce_buckets
            + self.ema
        )

    @property
    def peak(self) -> int:
        step = self.activations + self.backward_workspace
        return self.model_states + max(step, self.step_workspace, self.sampling_cache)

    def lines(self, gpu_memory_gib: float | None = None) -> list[str]:
        """A per-term breakdown in GiB, for --dry-run."""

        def gib(value: int) -> str:
            return f"{value / GIB:7.2f} GiB"

        how = "activation checkpointing" if self.activation_checkpointing else "no activation checkpointing"
        head = f"memory per GPU (estimate): micro-batch {self.micro_batch_size}, {self.precision}, {how}"
        if gpu_memory_gib is not None:
            head += f"; usable {usable_bytes(gpu_memory_gib) / GIB:.1f} of cluster.gpu_memory_gib={gpu_memory_gib:g}"
        terms = [
            ("weights (fp32)", self.weights),
            ("fp32 master partition", self.master_weights),
            ("AdamW moments", self.optimizer_moments),
            ("gradients", self.gradients),
            ("reduce buckets", self.reduce_buckets),
            ("EMA shadow", self.ema),
            ("activations", self.activations),
            ("backward workspace", self.backward_workspace),
            ("optimizer-step workspace (after the backward)", self.step_workspace),
            ("end-of-run sample grid's KV cache (likewise)", self.sampling_cache),
        ]
        rows = [f"  {name:<46} {gib(value)}" for name, value in terms if value]
        return [head, *rows, f"  {'peak':<46} {gib(self.peak)}"]


def estimate_training_memory(
    model: TarFlowConfig,
    *,
    micro_batch_size: int,
    precision: str,
    activation_checkpointing: bool,
    zero_stage: int,
    world_size: int,
    reduce_bucket_size: int,
    overlap_comm: bool,
    ema: bool = False,
    num_samples: int = 0,
) -> MemoryEstimate:
    """The per-rank peak of one training step (and of the end-of-run sample grid) for this configuration."""
    P, N = count_parameters(model), world_size
    shard = math.ceil(P / N)
    block = block_parameters(model)
    weights = FP32 * (shard + min(P, ZERO3_GATHERED_BLOCKS * block)) if zero_stage == 3 else FP32 * P
    gradients = FP32 * (P if zero_stage == 1 else shard)
    buckets = (2 if overlap_comm else 1) * FP32 * reduce_bucket_size
    per_image = activation_bytes_per_image(model, precision, activation_checkpointing)
    workspace = workspace_bytes_per_image(model, precision, activation_checkpointing)
    casts = BF16 * trunk_parameters(model) if precision == "bf16" else 0
    c = model
    cache = FP32 * 2 * c.layers_per_block * num_samples * c.num_tokens * c.channels
    return MemoryEstimate(
        micro_batch_size=micro_batch_size,
        precision=precision,
        activation_checkpointing=activation_checkpointing,
        weights=weights,
        master_weights=FP32 * shard,
        optimizer_moments=2 * FP32 * shard,
        gradients=gradients,
        reduce_buckets=buckets,
        ema=FP32 * P if ema else 0,
        activations=micro_batch_size * per_image,
        backward_workspace=micro_batch_size * workspace + casts,
        step_workspace=2 * FP32 * shard,  # AdamW's foreach temporaries over this rank's flat partition
        sampling_cache=cache,
    )
