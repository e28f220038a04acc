"""Pieces every benchmark suite shares: the --device option, config loading that reports errors, timings that wait
for the device's queued work, and a model whose heads do real work."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch

from tarflow_scale.config import ConfigError, RunConfig, TarFlowConfig, load_config
from tarflow_scale.models.tarflow import TarFlow


def add_device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device (default: cuda if any)"
    )


def load_suite_config(prog: str, config: str | None, overrides: list[str]) -> RunConfig | None:
    """The run config, or None after printing the error (the suite then exits with 2)."""
    try:
        return load_config(config, overrides)
    except ConfigError as e:
        print(f"{prog}: config error: {e}", file=sys.stderr)
        return None


def sync(device: torch.device) -> None:
    """Wait for queued GPU work before reading the clock (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def seconds_per_call(fn: Callable[[], object], device: torch.device, calls: int = 1) -> float:
    """Wall-clock seconds per call of `calls` back-to-back calls of `fn`, the device's queued work included (warm
    `fn` up first: the first call pays for allocation and kernel selection)."""
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - start) / calls


def fastest_call(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Seconds of the fastest of `repeats` timed calls (the minimum is the least disturbed by other load on a shared
    machine); warm `fn` up first."""
    return min((seconds_per_call(fn, device) for _ in range(repeats)), default=float("inf"))


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
