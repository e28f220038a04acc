"""Pieces every benchmark suite shares: a device sync for honest timings and a model whose heads do real work."""

from __future__ import annotations

import torch

from tarflow_scale.config import TarFlowConfig
from tarflow_scale.models.tarflow import TarFlow


def sync(device: torch.device) -> None:
    """Wait for queued GPU work before reading the clock (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def perturb_heads(model: TarFlow, std: float = 1e-3, seed: int = 0) -> TarFlow:
    """Non-zero output heads (a fresh TarFlow is the identity map), so sampling and decoding do real work."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for block in model.blocks:
            block.proj_out.weight.normal_(0, std)
    return model


def model_with_live_heads(config: TarFlowConfig, device: torch.device, std: float = 1e-3) -> TarFlow:
    """A seeded TarFlow(config) with perturbed heads, on `device`."""
    torch.manual_seed(0)
    return perturb_heads(TarFlow(config), std).to(device)
