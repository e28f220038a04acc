"""Log-likelihood bookkeeping: nats to bits per dimension and the 8-bit bin-width constant."""

from __future__ import annotations

import math

from torch import Tensor

LOG_2 = math.log(2.0)
# 8-bit pixels mapped to [-1, 1] fall in bins of width 2/256: P(bin) = p(x) * (2/256)^D for dequantized x.
LOG_BIN_WIDTH_8BIT = math.log(2.0 / 256.0)


def bits_per_dim(log_prob: Tensor, num_dims: int, log_bin_width: float | None = None) -> Tensor:
    """-log p / (D ln 2) per sample.

    log_prob: (B,) continuous log-density in nats. With `log_bin_width` (e.g. LOG_BIN_WIDTH_8BIT) the density
    of dequantized data becomes the discrete probability of its bin: -log P = -log p - D log(bin width).
    """
    nll = -log_prob
    if log_bin_width is not None:
        nll = nll - num_dims * log_bin_width
    return nll / (num_dims * LOG_2)
