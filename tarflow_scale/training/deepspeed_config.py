"""Generate the DeepSpeed JSON config from the typed run config (never keep a hand-written second copy)."""

from __future__ import annotations

from typing import Any

from ..config import RunConfig


def resolve_precision(config: RunConfig) -> str:
    """'auto' means bf16 on GPUs and fp32 on CPUs (DeepSpeed refuses fp16/bf16 speedups on CPU anyway)."""
    if config.deepspeed.precision == "auto":
        return "bf16" if config.cluster.use_gpu else "fp32"
    return config.deepspeed.precision


def build_deepspeed_config(config: RunConfig) -> dict[str, Any]:
    """The dict passed as `deepspeed.initialize(config=...)` for this run and world size.

    The learning-rate schedule is ours (`schedule.warmup_cosine`), handed to DeepSpeed as a client scheduler so
    its state is saved in every checkpoint and a resumed run continues the same curve.
    """
    opt, train = config.optim, config.train
    return {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": config.grad_accum_steps,
        # Explicit: DeepSpeed 0.19 clips at 1.0 when this key is absent.
        "gradient_clipping": opt.grad_clip,
        "optimizer": {
            "type": "AdamW",
            # torch_adam: use torch.optim.AdamW instead of FusedAdam, which JIT-compiles for ~1 min on first use.
            "params": {"lr": opt.lr, "betas": list(opt.betas), "weight_decay": opt.weight_decay, "torch_adam": True},
        },
        "bf16": {"enabled": resolve_precision(config) == "bf16"},
        "zero_optimization": {"stage": config.deepspeed.zero_stage},
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
