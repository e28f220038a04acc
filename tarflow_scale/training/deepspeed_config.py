"""Generate the DeepSpeed JSON config from the typed run config (never keep a hand-written second copy), and
describe the precision policy (docs/gpu.md; resolved by config.batching.resolve_precision)."""

from __future__ import annotations

from typing import Any

from ..config import RunConfig
from ..config.batching import resolve_bucket_sizes, resolve_overlap_comm, resolve_precision

__all__ = ["build_deepspeed_config", "describe_precision", "precision_warning", "resolve_precision"]

UNIFORM_BF16_WARNING = (
    "deepspeed.precision=bf16 with data.noise=uniform: the Transformer sees the dequantized input rounded to bf16 "
    "(about 3 distinct values per 8-bit bin), so the logged bits/dim is not a valid bound; use "
    "deepspeed.precision=fp32 (or auto) for density estimation"
)


def precision_warning(config: RunConfig) -> str | None:
    """A warning for a precision that makes the logged bits/dim invalid, else None."""
    if resolve_precision(config) == "bf16" and config.data.noise == "uniform":
        return UNIFORM_BF16_WARNING
    return None


def describe_precision(config: RunConfig) -> str:
    """One line for --dry-run and the run log: the resolved precision and why."""
    precision = resolve_precision(config)
    where = "GPU" if config.cluster.use_gpu else "CPU"
    why = f"auto, data.noise={config.data.noise} on {where}" if config.deepspeed.precision == "auto" else "set"
    if precision == "bf16":
        detail = "Transformer matmuls/attention in bf16 autocast; weights, flow state, transforms, log-dets fp32"
    elif config.cluster.use_gpu and config.deepspeed.tf32:
        detail = "fp32 with TF32 matmuls (deepspeed.tf32=false for strict fp32)"
    else:
        detail = "strict fp32"
    return f"precision: {precision} ({why}): {detail}"


def build_deepspeed_config(config: RunConfig) -> dict[str, Any]:
    """The dict passed as `deepspeed.initialize(config=...)` for this run and world size.

    The learning-rate schedule is ours (`schedule.make_scheduler`), handed to DeepSpeed as a client scheduler so
    its state is saved in every checkpoint and a resumed run continues the same curve.

    Precision: DeepSpeed's `bf16` section stays off even under the bf16 policy, because it turns the module's
    parameters (and so the flow's transforms, log-dets and prior) into bf16. The model instead runs only its
    Transformer trunk under torch.autocast (TarFlow.set_trunk_dtype): parameters, gradients, their reduction
    and the optimizer state are fp32, so the module's weights are the fp32 master weights.
    """
    opt, train, ds = config.optim, config.train, config.deepspeed
    reduce_bucket, allgather_bucket = resolve_bucket_sizes(config)  # derived from the model size unless set
    zero: dict[str, Any] = {
        "stage": ds.zero_stage,
        "overlap_comm": resolve_overlap_comm(config),
        "contiguous_gradients": ds.contiguous_gradients,
        "reduce_bucket_size": reduce_bucket,
    }
    if ds.zero_stage < 3:
        zero["allgather_bucket_size"] = allgather_bucket
    return {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": config.micro_batch_size,
        "gradient_accumulation_steps": config.grad_accum_steps,
        # Explicit: DeepSpeed 0.19 clips at 1.0 when this key is absent.
        "gradient_clipping": opt.grad_clip,
        "optimizer": {
            "type": "AdamW",
            # torch_adam: use torch.optim.AdamW instead of FusedAdam, which JIT-compiles for ~1 min on first use.
            "params": {"lr": opt.lr, "betas": list(opt.betas), "weight_decay": opt.weight_decay, "torch_adam": True},
        },
        "bf16": {"enabled": False},  # see the docstring: bf16 is the model's trunk autocast, not DeepSpeed's
        "zero_optimization": zero,
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
