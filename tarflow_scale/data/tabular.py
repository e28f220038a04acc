"""Real tabular data for vector density models (scikit-learn's digits); the study's config is config/study.py.

The digits are 1797 images of 8 x 8 pixels with integer values 0..16, shipped inside scikit-learn (no
download). As vectors, D = 64. Dequantization: x = 2 (v + u) / 17 - 1 with u ~ U[0, 1) per pixel, so x lies in
[-1, 1] and each of the 17 levels owns a bin of width 2/17. Every model of a study sees exactly this data, so
nats/dim are reported in this preprocessed space: -log p(x) / D. The discrete likelihood of the integer levels
is bounded by it (variational dequantization bound): -log P(v) / D <= -log p(x) / D - LOG_BIN_WIDTH_DIGITS,
i.e. add log(17/2) = 2.140 nats/dim to convert. Three pixels are 0 in every image; each contributes
-log(17/2) nats to the optimum of -log p(x), so nats/dim can be negative.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

DIGITS_NUM_LEVELS = 17  # pixel values 0..16
# Width of one level's bin after x = 2 (v + u) / 17 - 1: -log P(v) <= -log p(x) - D LOG_BIN_WIDTH_DIGITS.
LOG_BIN_WIDTH_DIGITS = math.log(2.0 / DIGITS_NUM_LEVELS)


def digits_levels_split(seed: int, val_fraction: float) -> tuple[Tensor, Tensor]:
    """Integer pixel levels (float64, values 0..16), shape (N, 64), split by a permutation seeded by `seed`.

    The val split holds round(val_fraction N) images; train the rest. Rows keep sklearn's raster order.
    """
    from sklearn.datasets import load_digits  # heavy import, only when the data is asked for

    levels = torch.from_numpy(load_digits().data).to(torch.float64)  # (1797, 64)
    num_val = round(val_fraction * levels.shape[0])
    if not 0 < num_val < levels.shape[0]:
        raise ValueError(f"val_fraction={val_fraction} leaves an empty split of {levels.shape[0]} images")
    order = torch.randperm(levels.shape[0], generator=torch.Generator().manual_seed(seed))
    return levels[order[num_val:]], levels[order[:num_val]]


def dequantize_digits(levels: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Levels 0..16 (N, D) -> x = 2 (v + u) / 17 - 1 in [-1, 1], u ~ U[0, 1) from `generator`; float32."""
    noise = torch.rand(levels.shape, generator=generator, dtype=torch.float64)
    return (2.0 * (levels + noise) / DIGITS_NUM_LEVELS - 1.0).float()


def val_noise_seed(seed: int) -> int:
    """Seed of the held-out split's fixed dequantization noise; distinct from the split permutation's."""
    return 1_000_003 * (seed + 1)


def load_digits_split(seed: int, val_fraction: float) -> tuple[Tensor, Tensor]:
    """(train, val) dequantized vectors (N, 64) float32 in [-1, 1], each with fixed noise derived from `seed`.

    Training loops should rather redraw the noise every batch (`digits_levels_split` + `dequantize_digits`);
    the fixed val draw makes held-out nats/dim comparable across models and runs.
    """
    train, val = digits_levels_split(seed, val_fraction)
    train_noise = torch.Generator().manual_seed(val_noise_seed(seed) + 1)
    return dequantize_digits(train, train_noise), dequantize_digits(
        val, torch.Generator().manual_seed(val_noise_seed(seed))
    )
