"""Jacobi and Gauss-Seidel-Jacobi decoding of a block's inverse (the fixed point explained in models/decoding)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from ..transformer import KVCache

if TYPE_CHECKING:
    from ..tarflow import Conditioning, FlowBlock


def jacobi(
    block: FlowBlock, z: Tensor, cond: Conditioning, cache: KVCache, *, segment_size: int, tol: float, max_iters: int
) -> tuple[Tensor, int]:
    """Gauss-Seidel over segments of input positions, Jacobi inside each; z (B, T, D) in block order -> x, passes.

    segment_size 0 (or >= T - 1) is plain Jacobi, one segment. Input positions [a, b) produce the parameters of
    tokens [a + 1, b + 1) (the one-token shift). x[a] is final when the segment starts (token 0, or solved by the
    previous segment); iteration k makes token a + k final, so b - a iterations are exact and the keys/values left
    in the cache for [a, b) come from final (or, after an early stop, within-tol) inputs. Iteration k re-runs only
    positions [a + k, b). `max_iters` > 0 caps the iterations per segment (inexact below b - a).
    """
    T = z.shape[1]
    segment_size = segment_size or max(1, T - 1)
    x = z.clone()  # initial guess x = z; token 0 is already exact
    passes = 0
    for a in range(0, T - 1, segment_size):
        b = min(a + segment_size, T - 1)
        limit = b - a if max_iters == 0 else min(b - a, max_iters)
        for iteration in range(limit):
            # Positions [a, s) hold keys/values computed from final inputs (written by earlier iterations when
            # tokens <= s - 1 were already exact), so each iteration re-runs only [s, b): less work, same fixed point.
            s = a + iteration
            new = block.transform.inverse(z[:, s + 1 : b + 1], block.predict(x[:, s:b], s, cond, cache))
            passes += 1
            last = iteration == limit - 1
            change = None if last else (new - x[:, s + 1 : b + 1]).abs().max()
            x[:, s + 1 : b + 1] = new
            if not last and bool(change <= tol):  # one host sync per iteration
                break
    return x, passes
