"""Decoders of a flow block's inverse: which one solves each block of a sampling call (config.Decoding), the
precision it runs at, and the model passes it took.

Inverting an autoregressive block means solving x_t = f^-1(z_t; theta(x_<t)) for t = 0 .. T-1. The sequential
decoder (FlowBlock.decode_sequential, in the model file) does it token by token with a KV cache: T - 1
single-token passes. `static` runs the same per-token step with static shapes, under torch.compile or replayed as
a CUDA graph. `parallel` treats the system as a fixed point (Song et al. 2021, "Accelerating feedforward
computation via parallel nonlinear equation solving"; GS-Jacobi for TarFlow, arXiv 2505.12849): from a guess x
(initially x = z), one causal pass computes every token's parameters from the guess, and all tokens are updated
at once, x <- f^-1(z; theta(x)). Token t + 1 depends only on tokens <= t, so after k iterations tokens 0 .. k are
exact: T - 1 iterations reproduce the sequential result (to float precision), and iterations stop early once the
largest change is at most `tol`.

`gs_jacobi` splits the sequence into segments of `segment_size` tokens and solves them in order (Gauss-Seidel over
segments), Jacobi inside each; finished segments stay in the KV cache, so an iteration costs one pass over a
segment rather than the whole sequence. `jacobi` is the one-segment case. Blocks listed in `sequential_blocks`
(the GS-Jacobi paper's per-block choice: blocks whose fixed point converges slowly, usually the one decoded first
from noise) always run sequentially.

A decoder is a function `(block, z, cond, cache) -> (x, passes)` over one FlowBlock, in the block's token order,
built from the block's own `predict` (embed -> cached Transformer -> head -> guidance) and token transform.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from ...config import Decoding
from .parallel import jacobi
from .precision import cache_dtype, matmul_precision
from .static import compiled_sequential, graphed_sequential
from .stats import DecodingStats

__all__ = ["DecodingStats", "block_decoder", "cache_dtype", "matmul_precision"]


def block_decoder(decoding: Decoding, index: int) -> Callable | None:
    """The decoder of block `index` (model.blocks order) under `decoding`; None: the block's eager sequential one."""
    mode = decoding.mode_for_block(index)
    if mode == "sequential":
        if decoding.cuda_graph:
            return graphed_sequential
        return compiled_sequential if decoding.compile else None
    segment_size = 0 if mode == "jacobi" else decoding.segment_size  # 0: one segment, the whole sequence
    return partial(jacobi, segment_size=segment_size, tol=decoding.tol, max_iters=decoding.max_iters)
