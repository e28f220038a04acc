"""The sampling vocabulary: how a sample is guided (`Guidance`) and how each flow block's inverse is decoded
(`Decoding`). They are the only types that carry these settings, from the command line (`tarflow-sample`'s flags
are generated from their fields) and the run config (`eval.guidance.*`, `eval.decoding.*`) to the model.

Both check themselves when built, so an object that exists is valid; `Decoding.check(model)` is the one place
that refuses what a given model cannot run. Errors are `SettingError`s naming the key where the setting was given.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from .checks import SettingError

DecodingMode = Literal["sequential", "jacobi", "gs_jacobi"]
Precision = Literal["fp32", "bf16", "tf32"]
DECODING_MODES: tuple[str, ...] = typing.get_args(DecodingMode)
PRECISIONS: tuple[str, ...] = typing.get_args(Precision)


def _help(text: str, **default: Any) -> Any:
    """A field with its help text, read by `tarflow-sample` (cli/sample.py) to generate the field's flag."""
    return field(metadata={"help": text}, **default)


def _shown(value: Any) -> str:
    """A value inside a SettingError template (braces would read as a key)."""
    return str(value).replace("{", "{{").replace("}", "}}")


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance (TarFlow §2.5): the transform's parameters become p_c + w_t (p_c - p_u).

    The conditional pass (the sample's labels, attention temperature 1) and the guiding pass (the null label, and
    attention temperature `attn_temp`) run as one batch of 2B. An unconditional model guides against itself at
    another temperature. weight=0 is plain sampling: one pass of B, and `attn_temp` is unused.
    """

    weight: float = _help("guidance weight w: params p_c + w (p_c - p_u); 0: no guidance", default=0.0)
    annealed: bool = _help("anneal the weight linearly over each block's tokens: w_t = w t / (T - 1)", default=False)
    attn_temp: float = _help("attention temperature of the guiding pass (unconditional guidance)", default=1.0)

    def __post_init__(self) -> None:
        if not math.isfinite(self.weight):
            raise SettingError(f"{{weight}}={_shown(self.weight)} is not a finite number", "guidance.")
        if not (math.isfinite(self.attn_temp) and self.attn_temp > 0):
            raise SettingError(f"{{attn_temp}}={_shown(self.attn_temp)} must be a finite number > 0", "guidance.")

    @property
    def active(self) -> bool:
        """Whether sampling runs the guiding pass (a batch of 2B)."""
        return self.weight != 0.0

    def weight_at(self, token: Any, num_tokens: int) -> Any:
        """w_t for the token t being produced (t in 1 .. T - 1; token 0 is the identity): w t / (T - 1) when
        annealed, else w. `token` is an int (a Python float comes back) or a tensor of token indices.

        >>> [Guidance(2.0, annealed=True).weight_at(t, num_tokens=5) for t in range(1, 5)]
        [0.5, 1.0, 1.5, 2.0]
        """
        return self.weight * token / (num_tokens - 1) if self.annealed else self.weight


@dataclass(frozen=True)
class Decoding:
    """How each flow block's inverse is solved, and at which precision (docs/sampling.md). Every mode gives the
    sequential result up to `tol` (exactly when max_iters=0 and tol=0)."""

    mode: DecodingMode = _help(
        "how each flow block is inverted: token by token (sequential), or parallel Jacobi iterations (jacobi; "
        "gs_jacobi: in segments) that reach the same images up to the tolerance",
        default="sequential",
    )
    tol: float = _help(
        "jacobi/gs_jacobi: stop a segment once max |x_new - x| <= tol (model units; 8-bit pixels are 2/255 apart)",
        default=1e-4,
    )
    max_iters: int = _help(
        "jacobi/gs_jacobi: iterations per segment; 0: the segment's length, which is always exact", default=0
    )
    segment_size: int = _help("gs_jacobi: tokens per segment", default=64)
    sequential_blocks: tuple[int, ...] = _help(
        "block indices (model.blocks order; the last is inverted first) decoded sequentially whatever the mode: "
        "the blocks whose Jacobi iterations converge slowly",
        default=(),
    )
    precision: Precision = _help(
        "the Transformer's matmuls and KV cache (bf16 halves the cache; tf32: CUDA matmuls only), also in the "
        "denoising Tweedie step; the flow state, token transforms and guidance stay fp32",
        default="fp32",
    )
    compile: bool = _help(
        "sequential blocks: run the static-shape per-token step under torch.compile (one graph per cache-read bucket)",
        default=False,
    )
    cuda_graph: bool = _help(
        "sequential blocks on a GPU: capture the per-token step as one CUDA graph per block and cache-read bucket and "
        "replay it (one launch per token; needs a closed-form token inverse: affine, shift, spline)",
        default=False,
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "sequential_blocks", tuple(int(k) for k in self.sequential_blocks))
        key = "decoding."
        for name, choices in (("mode", DECODING_MODES), ("precision", PRECISIONS)):
            if getattr(self, name) not in choices:
                shown = _shown(repr(getattr(self, name)))
                raise SettingError(f"{{{name}}}={shown} is not one of {', '.join(choices)}", key)
        if not self.tol >= 0:  # NaN fails too
            raise SettingError(f"{{tol}}={_shown(self.tol)} must be a number >= 0", key)
        if self.max_iters < 0:
            raise SettingError(f"{{max_iters}}={self.max_iters} must be >= 0 (0: the segment length)", key)
        if self.segment_size < 1:
            raise SettingError(f"{{segment_size}}={self.segment_size} must be >= 1", key)
        if any(k < 0 for k in self.sequential_blocks):
            raise SettingError(f"{{sequential_blocks}}={list(self.sequential_blocks)} must be indices >= 0", key)
        if self.compile and self.cuda_graph:
            raise SettingError("{compile} and {cuda_graph} are alternatives for the sequential step: pick one", key)
        if (self.compile or self.cuda_graph) and self.mode != "sequential" and not self.sequential_blocks:
            option = "{compile}" if self.compile else "{cuda_graph}"
            raise SettingError(
                f"{option} applies to {{mode}} sequential (or to the {{sequential_blocks}} of a parallel mode)", key
            )

    @classmethod
    def of(cls, decoding: str | Decoding | None) -> Decoding:
        """A mode name (default options) or a Decoding as is; None is sequential."""
        if decoding is None:
            return cls()
        return decoding if isinstance(decoding, Decoding) else cls(mode=decoding)

    def mode_for_block(self, index: int) -> str:
        return "sequential" if index in self.sequential_blocks else self.mode

    def check(self, model: Any, device_type: str | None = None, key: str | dict[str, str] = "decoding.") -> None:
        """Refuse what `model` (a TarFlow) cannot run, on `device_type` ("cuda", "cpu"; None: not checked): the one
        place for these checks (TarFlow.inverse, tarflow-sample and tarflow-eval's pre-flight call it). `key`
        names the settings in the error, as for SettingError.at."""
        num_blocks = model.config.num_blocks
        bad = [k for k in self.sequential_blocks if not 0 <= k < num_blocks]
        if bad:
            where = f"for a model of {num_blocks} blocks (0..{num_blocks - 1})"
            raise SettingError(f"{{sequential_blocks}} {bad} out of range {where}", key)
        if self.cuda_graph and not model.transform.closed_form_inverse:
            raise SettingError(
                f"{{cuda_graph}} needs a closed-form token inverse; model.transform={model.config.transform} inverts "
                f"by iteration ({type(model.transform).__name__} stops on a host-side test): use {{compile}} instead",
                key,
            )
        if self.cuda_graph and device_type is not None and device_type != "cuda":
            raise SettingError(f"{{cuda_graph}} needs a CUDA device; sampling runs on {device_type}", key)
