"""Sequential decoding through a static-shape per-token step: compiled (torch.compile) or replayed as CUDA graphs.

The eager sequential decoder (FlowBlock.decode_sequential) reads the KV cache up to the current position, so each
position has its own shapes. `static_step` gives the positions of one bucket the same shapes: the position is a 0-d
tensor, and the step reads a fixed-length prefix of the cache under a mask (CausalSelfAttention.cached). The
prefix lengths are `read_buckets(T)`, T/8 .. T by doublings, and position t reads the shortest one covering t + 1
slots, so a step past the first T/8 positions reads less than twice the slots the eager step reads (over a block
about 4/3 of them, against 2x when every step read all T: docs/sampling.md). torch.compile builds one graph per
bucket, and a GPU captures one CUDA graph per bucket and block and replays it at that bucket's positions (one
launch per token).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..transformer import KVCache

if TYPE_CHECKING:
    from ..tarflow import Conditioning, FlowBlock

# Cache-read lengths per block: T, T/2, T/4, T/8 (rounded up). Halving once more saves at most T^2/128 slot reads
# of a block's ~2T^2/3 but adds a graph to capture per block and sampling call (docs/sampling.md).
NUM_READ_BUCKETS = 4


def read_buckets(num_tokens: int) -> tuple[int, ...]:
    """The cache lengths the static step reads, ascending: ceil(T / 2^k) for k < NUM_READ_BUCKETS.

    >>> read_buckets(1024), read_buckets(100), read_buckets(2)
    ((128, 256, 512, 1024), (13, 25, 50, 100), (1, 2))
    """
    return tuple(sorted({math.ceil(num_tokens / 2**k) for k in range(NUM_READ_BUCKETS)}))


def read_length(pos: int, buckets: tuple[int, ...]) -> int:
    """The shortest bucket covering slots [0, pos] (the step at `pos` writes slot pos and reads every one before)."""
    return buckets[bisect.bisect_left(buckets, pos + 1)]


def static_step(
    block: FlowBlock, token: Tensor, z_next: Tensor, pos: Tensor, cond: Conditioning, cache: KVCache
) -> Tensor:
    """x_{pos+1} (B, D) from x_pos (token, (B, 1, D)) and z_{pos+1} (B, D); `pos` is a 0-d int64 tensor and `cache`
    a prefix covering slot pos (every slot of it is read)."""
    return block.transform.inverse(z_next, block.predict(token, pos, cond, cache)[:, 0])


def static_sequential(
    block: FlowBlock, z: Tensor, cond: Conditioning, cache: KVCache, step: Callable[..., Tensor] = static_step
) -> tuple[Tensor, int]:
    """Sequential decoding through `step` (static_step, or its compiled version), position t reading the bucket
    `read_length(t)`: the same arithmetic as the eager sequential decoder over longer, masked cache reads."""
    T = z.shape[1]
    x = z.clone()
    positions = torch.arange(T, device=z.device)
    buckets = read_buckets(T)
    prefixes = {length: cache.prefix(length) for length in buckets}
    for t in range(T - 1):
        x[:, t + 1] = step(block, x[:, t : t + 1], z[:, t + 1], positions[t], cond, prefixes[read_length(t, buckets)])
    return x, T - 1


def compiled_sequential(block: FlowBlock, z: Tensor, cond: Conditioning, cache: KVCache) -> tuple[Tensor, int]:
    """Sequential decoding through the compiled static-shape step (Decoding.compile): one graph per bucket (and per
    batch shape). Dynamo keeps 8 graphs per function by default and runs the rest eagerly; the limit is raised so
    that 8 batch shapes still get graphs for every bucket."""
    limit = max(torch._dynamo.config.recompile_limit, 8 * NUM_READ_BUCKETS)
    with torch._dynamo.config.patch(recompile_limit=limit):
        return static_sequential(block, z, cond, cache, torch.compile(static_step, dynamic=False))


def capture_cuda_graph(step: Callable[[], Tensor], device: torch.device) -> Callable[[], Tensor]:
    """Capture `step` (no arguments: it reads fixed input buffers) as a CUDA graph; returns the replay, which runs
    the graph and returns its output buffer. The warm-up runs `step` once, off the capturing stream as capture
    requires."""
    # Under bf16 sampling, autocast's cache of cast weights must be off while capturing: cached copies made
    # during capture are freed when the cache clears, and replays would read freed memory.
    bf16 = torch.is_autocast_enabled("cuda")
    autocast = torch.autocast("cuda", torch.get_autocast_dtype("cuda"), cache_enabled=False) if bf16 else None
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), autocast or nullcontext():
        step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), autocast or nullcontext():
        out = step()

    def replay() -> Tensor:
        graph.replay()
        return out

    return replay


def graphed_sequential(
    block: FlowBlock,
    z: Tensor,
    cond: Conditioning,
    cache: KVCache,
    capture: Callable[[Callable[[], Tensor], torch.device], Callable[[], Tensor]] = capture_cuda_graph,
) -> tuple[Tensor, int]:
    """Sequential decoding with `static_step` captured as one CUDA graph per bucket (Decoding.cuda_graph), each
    replayed at its bucket's positions: the inputs are copied into fixed buffers, and the cache, weights, labels and
    temperatures keep their addresses for the whole block, which is what replay requires. Decoding.check refuses
    what cannot be captured (a token inverse that iterates with a host-side stopping test, a CPU). `capture` turns
    a step into its replay (tests pass one that runs the step eagerly)."""
    T = z.shape[1]
    x = z.clone()
    if T < 2:
        return x, 0
    token, z_next = x[:, :1].clone(), z[:, 1].clone()
    pos = torch.zeros((), dtype=torch.int64, device=z.device)
    buckets = read_buckets(T)
    lengths = [read_length(t, buckets) for t in range(T - 1)]
    replays = {}
    for length in sorted(set(lengths)):
        # Capturing runs the step once at position 0 (each length may pick other kernels): it writes the cache
        # slot that the first replay writes again.
        prefix = cache.prefix(length)
        replays[length] = capture(lambda prefix=prefix: static_step(block, token, z_next, pos, cond, prefix), z.device)
    for t in range(T - 1):
        token.copy_(x[:, t : t + 1])
        z_next.copy_(z[:, t + 1])
        pos.fill_(t)
        x[:, t + 1] = replays[lengths[t]]()
    return x, T - 1
