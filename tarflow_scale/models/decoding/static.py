"""Sequential decoding through a static-shape per-token step: compiled (torch.compile) or replayed as a CUDA graph.

The eager sequential decoder (FlowBlock.decode_sequential) reads the KV cache up to the current position, so each
position has its own shapes. `static_step` gives every position the same shapes (the position is a 0-d tensor,
the cache is read whole under a mask: CausalSelfAttention.cached), so torch.compile builds one graph for every
position of every block, and a GPU can capture it once per block and replay it (one launch per token).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..transformer import KVCache

if TYPE_CHECKING:
    from ..tarflow import Conditioning, FlowBlock


def static_step(
    block: FlowBlock, token: Tensor, z_next: Tensor, pos: Tensor, cond: Conditioning, cache: KVCache
) -> Tensor:
    """x_{pos+1} (B, D) from x_pos (token, (B, 1, D)) and z_{pos+1} (B, D); `pos` is a 0-d int64 tensor."""
    return block.transform.inverse(z_next, block.predict(token, pos, cond, cache)[:, 0])


def compiled_sequential(block: FlowBlock, z: Tensor, cond: Conditioning, cache: KVCache) -> tuple[Tensor, int]:
    """Sequential decoding through the compiled static-shape step (Decoding.compile)."""
    step = torch.compile(static_step, dynamic=False)
    T = z.shape[1]
    x = z.clone()
    positions = torch.arange(T, device=z.device)
    for t in range(T - 1):
        x[:, t + 1] = step(block, x[:, t : t + 1], z[:, t + 1], positions[t], cond, cache)
    return x, T - 1


def graphed_sequential(block: FlowBlock, z: Tensor, cond: Conditioning, cache: KVCache) -> tuple[Tensor, int]:
    """Sequential decoding with `static_step` captured once as a CUDA graph (Decoding.cuda_graph) and replayed at
    every position: its inputs are copied into fixed buffers, and the cache, weights, labels and temperatures keep
    their addresses for the whole block, which is what replay requires. Decoding.check refuses what cannot be
    captured (a token inverse that iterates with a host-side stopping test, a CPU)."""
    T = z.shape[1]
    x = z.clone()
    token, z_next = x[:, :1].clone(), z[:, 1].clone()
    pos = torch.zeros((), dtype=torch.int64, device=z.device)

    def step() -> Tensor:
        return static_step(block, token, z_next, pos, cond, cache)

    # Under bf16 sampling, autocast's cache of cast weights must be off while capturing: cached copies made
    # during capture are freed when the cache clears, and replays would read freed memory.
    bf16 = torch.is_autocast_enabled("cuda")
    autocast = torch.autocast("cuda", torch.get_autocast_dtype("cuda"), cache_enabled=False) if bf16 else None
    side = torch.cuda.Stream(z.device)  # warm-up off the capturing stream, as CUDA graph capture requires
    side.wait_stream(torch.cuda.current_stream(z.device))
    with torch.cuda.stream(side), autocast or nullcontext():
        step()  # position 0: writes the cache slot that the first replay writes again
    torch.cuda.current_stream(z.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), autocast or nullcontext():
        out = step()
    for t in range(T - 1):
        token.copy_(x[:, t : t + 1])
        z_next.copy_(z[:, t + 1])
        pos.fill_(t)
        graph.replay()
        x[:, t + 1] = out
    return x, T - 1
