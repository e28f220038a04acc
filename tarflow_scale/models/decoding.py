"""How a flow block's inverse is decoded (sequential, Jacobi, Gauss-Seidel-Jacobi) and at which precision.

Inverting an autoregressive block means solving x_t = f^-1(z_t; theta(x_<t)) for t = 0 .. T-1. `sequential`
does it token by token with a KV cache (T - 1 single-token passes). The parallel modes treat it as a fixed point
(Song et al. 2021, "Accelerating feedforward computation via parallel nonlinear equation solving"; GS-Jacobi for
TarFlow, arXiv 2505.12849): from a guess x (initially x = z), one causal pass computes every token's parameters
from the guess, and all tokens are updated at once, x <- f^-1(z; theta(x)). Token t + 1 depends only on tokens
<= t, so after k iterations tokens 0 .. k are exact: T - 1 iterations reproduce the sequential result (to
float precision), and iterations stop early once the largest change is at most `tol`.

`gs_jacobi` splits the sequence into segments of `segment_size` tokens and solves them in order (Gauss-Seidel over
segments), Jacobi inside each; finished segments stay in the KV cache, so an iteration costs one pass over a
segment rather than the whole sequence. `jacobi` is the one-segment case. Blocks listed in `sequential_blocks`
(the GS-Jacobi paper's per-block choice: blocks whose fixed point converges slowly, usually the one decoded first
from noise) always run sequentially.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch

DecodingMode = Literal["sequential", "jacobi", "gs_jacobi"]
Precision = Literal["fp32", "bf16", "tf32"]
DECODING_MODES: tuple[str, ...] = ("sequential", "jacobi", "gs_jacobi")
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "tf32")


@dataclass(frozen=True)
class Decoding:
    """Options of a block inverse. Every mode gives the sequential result up to `tol` (exactly when max_iters=0)."""

    mode: DecodingMode = "sequential"
    # jacobi / gs_jacobi: stop a segment once max |x_new - x| <= tol (in model units; 8-bit pixels are 2/255 apart).
    tol: float = 1e-4
    # Cap on iterations per segment; 0: the segment's length, which is always exact (so never more passes than
    # the sequential sampler). A positive cap below it trades exactness for a bounded cost.
    max_iters: int = 0
    segment_size: int = 64  # gs_jacobi: tokens per segment (>= T - 1: plain jacobi)
    # Indices into model.blocks (forward order; sampling inverts the last block first) always decoded sequentially.
    sequential_blocks: tuple[int, ...] = ()
    # sequential: run the static-shape per-token step under torch.compile (one graph for every position).
    compile: bool = False
    # sequential, CUDA only: capture the static-shape per-token step once per block as a CUDA graph and replay it
    # at every position (one launch per token instead of one per kernel). Needs a closed-form token inverse
    # (affine, shift, spline).
    cuda_graph: bool = False

    def __post_init__(self) -> None:
        if self.mode not in DECODING_MODES:
            raise ValueError(f"decoding mode {self.mode!r} is not one of {', '.join(DECODING_MODES)}")
        if not self.tol >= 0:
            raise ValueError(f"decoding tol must be >= 0, got {self.tol}")
        if self.max_iters < 0:
            raise ValueError(f"decoding max_iters must be >= 0 (0: segment length), got {self.max_iters}")
        if self.segment_size < 1:
            raise ValueError(f"decoding segment_size must be >= 1, got {self.segment_size}")
        if self.compile and self.cuda_graph:
            raise ValueError("decoding compile and cuda_graph are alternatives for the sequential step: pick one")
        object.__setattr__(self, "sequential_blocks", tuple(int(k) for k in self.sequential_blocks))

    @classmethod
    def of(cls, decoding: str | Decoding | None) -> Decoding:
        """A mode name (default options) or a Decoding as is; None is sequential."""
        if decoding is None:
            return cls()
        return decoding if isinstance(decoding, Decoding) else cls(mode=decoding)

    def mode_for_block(self, index: int) -> str:
        return "sequential" if index in self.sequential_blocks else self.mode


@dataclass
class DecodingStats:
    """Model passes each block's inverse took (a pass = one Transformer evaluation over a token or a segment):
    T - 1 single-token passes for sequential, the summed Jacobi iterations over segments for the parallel modes.

    Summed over every inverse it is handed to (`calls` of them), so one object can follow a whole evaluation.
    """

    passes: dict[int, int] = field(default_factory=dict)  # block index (forward order) -> passes, summed
    num_tokens: int = 0
    calls: int = 0

    def add(self, block: int, passes: int) -> None:
        self.passes[block] = self.passes.get(block, 0) + passes

    def merge(self, other: DecodingStats) -> None:
        for block, passes in other.passes.items():
            self.add(block, passes)
        self.calls += other.calls
        self.num_tokens = other.num_tokens or self.num_tokens

    def summary(self) -> dict[str, object]:
        """Mean passes per sampling call of each block, listed in sampling order (the last block is inverted
        first), and the pass ratio against the sequential sampler's T - 1 per block: for metrics.json."""
        blocks = sorted(self.passes, reverse=True)
        mean = [self.passes[k] / max(self.calls, 1) for k in blocks]
        sequential = (self.num_tokens - 1) * len(blocks)
        return {
            "blocks_in_sampling_order": blocks,
            "mean_passes_per_block": [round(m, 2) for m in mean],
            "sequential_passes_per_block": self.num_tokens - 1,
            "pass_ratio": round(sequential / sum(mean), 3) if sum(mean) else None,
            "sampling_calls": self.calls,
        }


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")


def cache_dtype(precision: str, state_dtype: torch.dtype) -> torch.dtype:
    """The KV cache holds bf16 under bf16 sampling (half the memory of fp32), else the flow state's dtype."""
    return torch.bfloat16 if precision == "bf16" else state_dtype


@contextlib.contextmanager
def matmul_precision(precision: str, device_type: str) -> Iterator[None]:
    """The Transformer's matmuls at `precision`: bf16 autocast, TF32 matmuls (CUDA only), or plain fp32.

    Only the network runs inside: the flow state, the token transforms and their inverses stay fp32 (or fp64),
    and head outputs are cast back to the state's dtype before guidance combines them.
    """
    check_precision(precision)
    if precision == "bf16":
        with torch.autocast(device_type, dtype=torch.bfloat16):
            yield
    elif precision == "tf32":
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    else:
        yield
