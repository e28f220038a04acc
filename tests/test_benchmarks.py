"""The benchmarks' own arithmetic: the FLOP count behind `tarflow-bench gpu`'s model FLOP utilisation."""

from __future__ import annotations

import pytest
import torch

from tarflow_scale.benchmarks.model import count_train_flops
from tarflow_scale.config import TarFlowConfig
from tarflow_scale.models.tarflow import TarFlow


def analytic_train_flops(c: TarFlowConfig, num_params: int) -> int:
    """Matmul FLOPs (2 per multiply-add) of one image's forward + backward, written out from the architecture.

    Per block: proj_in (D -> C), per layer qkv (C -> 3C), the attention output projection (C -> C), the MLP
    (C -> H -> C), the full T x T attention (QK^T and AV, as the fused GPU kernels are counted), and the head
    (C -> D P). The backward costs twice the forward (gradients of the input and of the weights), except that the
    first block in forward order needs no input gradient for proj_in: its input is the data.
    """
    T, C, D, L = c.num_tokens, c.channels, c.token_dim, c.layers_per_block
    H = int(C * c.mlp_ratio)
    trunk = L * (2 * T * (3 * C * C + C * C + 2 * C * H) + 2 * (2 * T * T * C)) + 2 * T * C * D * num_params
    proj_in = 2 * T * D * C
    return c.num_blocks * 3 * (trunk + proj_in) - proj_in


@pytest.mark.parametrize(
    "overrides",
    [
        dict(image_size=16, patch_size=4, channels=32, num_blocks=2, layers_per_block=2, head_dim=16),
        dict(image_size=16, patch_size=2, channels=48, num_blocks=3, layers_per_block=1, head_dim=24, mlp_ratio=2.0),
        dict(image_size=8, patch_size=2, channels=32, num_blocks=2, layers_per_block=2, head_dim=16, num_classes=5),
    ],
    ids=["tiny", "patch2", "conditional"],
)
def test_counted_training_flops_equal_the_architecture_count(overrides):
    """Counted on any device (SDPA's math backend), scaled exactly by the batch: on CPU the fused attention kernel
    is invisible to torch's counter, which would understate MFU."""
    config = TarFlowConfig(**overrides)
    torch.manual_seed(0)
    model = TarFlow(config)
    batch = 3
    x = torch.randn(batch, config.in_channels, config.image_size, config.image_size)
    y = torch.arange(batch) % config.num_classes if config.num_classes else None
    expected = analytic_train_flops(config, model.blocks[0].transform.num_params)
    assert count_train_flops(model, x, y) == batch * expected
    assert all(p.grad is None for p in model.parameters())  # counting leaves no gradients behind
