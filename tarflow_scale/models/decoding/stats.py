"""What a sampling call's decoding cost: the model passes of every block (for metrics.json and benchmarks)."""

from __future__ import annotations

from dataclasses import dataclass, field


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
