"""Learning-rate schedule: linear warmup then cosine decay, as a function of the optimizer step."""

from __future__ import annotations

import math

import torch

from ..config import OptimConfig


def warmup_cosine_factor(step: int, num_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Multiplier on the peak lr for optimizer step `step` (0-based): (step+1)/warmup, then cosine to min_ratio.

    Past `num_steps` it stays at `min_ratio` (the reference code restarts the curve on resume; we never do).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, num_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, num_steps: int):
    """A LambdaLR whose state (the step count) DeepSpeed checkpoints with the engine."""
    min_ratio = optim.min_lr / optim.lr
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine_factor(step, num_steps, optim.warmup_steps, min_ratio)
    )
