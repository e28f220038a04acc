"""`eval.sweep`: the sampling settings a FID sweep scores, one list per setting (several lists: their grid), and
the points of that grid, each a full set of sampling settings built through the same `Guidance` / `Decoding`
validators as `eval.guidance` / `eval.decoding`.

The keys are flat lists so that one dotted override sets one (`eval.sweep.guidance=[0,0.5,1,2,3]`); each names
a setting of the eval section (`SWEPT`), and the outputs (sweep.csv, metrics.json) use those names:
guidance.weight, guidance.attn_temp, denoise_step, decoding.mode.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .checks import ConfigError, SettingError
from .sampling import Decoding, DecodingMode, Guidance

# eval.sweep.<key> -> the setting it sweeps, named as under eval (the names of sweep.csv's columns).
SWEPT: dict[str, str] = {
    "guidance": "guidance.weight",
    "attn_temp": "guidance.attn_temp",
    "denoise_step": "denoise_step",
    "decoding_mode": "decoding.mode",
}
SETTING_NAMES: tuple[str, ...] = tuple(SWEPT.values())


class _Keys(dict):
    """Field name -> the key that set it, for SettingError.at: the swept fields name their list entry, the rest
    the eval section's key (`eval.decoding.compile`)."""

    def __init__(self, section: str, swept: dict[str, str]):
        super().__init__(swept)
        self.section = section

    def __missing__(self, name: str) -> str:
        return f"{self.section}{name}"


@dataclass(frozen=True)
class SweepPoint:
    """One setting of a sweep: the sampling settings of every FID sample drawn under it."""

    guidance: Guidance
    decoding: Decoding
    denoise_step: float

    def values(self) -> dict[str, Any]:
        """The four sweepable settings by name (sweep.csv's setting columns)."""
        return {
            "guidance.weight": self.guidance.weight,
            "guidance.attn_temp": self.guidance.attn_temp,
            "denoise_step": self.denoise_step,
            "decoding.mode": self.decoding.mode,
        }

    def label(self, names: list[str] | tuple[str, ...] = SETTING_NAMES) -> str:
        """`guidance.weight=0.5 decoding.mode=jacobi`: the settings `names` (the swept ones) of this point."""
        return setting_label(self.values(), names)


def setting_label(values: dict[str, Any], names: list[str] | tuple[str, ...]) -> str:
    """`guidance.weight=0.5 decoding.mode=jacobi` for the settings `names` of `values` (SweepPoint.values())."""
    return " ".join(f"{name}={values[name]:g}" if name != "decoding.mode" else f"{name}={values[name]}"
                    for name in names)  # fmt: skip


@dataclass
class SweepConfig:
    """eval.sweep: values of each sampling setting to score by FID in one evaluation (empty: not swept). Several
    non-empty lists sweep their grid (every combination); the settings not swept keep eval.guidance.* /
    eval.decoding.* / eval.denoise_step. Only the fid job sweeps (eval/README.md)."""

    # Keys a user may write the way the eval section nests them: the sweep's keys are flat lists.
    NESTED_SPELLINGS: ClassVar[dict[str, str]] = {
        "guidance.weight": "guidance",
        "guidance.attn_temp": "attn_temp",
        "decoding.mode": "decoding_mode",
    }

    guidance: list[float] = field(default_factory=list)  # guidance.weight values
    attn_temp: list[float] = field(default_factory=list)  # guidance.attn_temp values
    denoise_step: list[float] = field(default_factory=list)  # eval.denoise_step values (denoised FID only)
    decoding_mode: list[DecodingMode] = field(default_factory=list)  # decoding.mode values

    @property
    def active(self) -> bool:
        return any(getattr(self, key) for key in SWEPT)

    def swept(self) -> list[str]:
        """The swept settings' names (guidance.weight, ...), in SWEPT order."""
        return [name for key, name in SWEPT.items() if getattr(self, key)]

    def _check_values(self, prefix: str) -> None:
        for key in SWEPT:
            values = getattr(self, key)
            seen = set()
            for i, value in enumerate(values):
                where = f"{prefix}{key}[{i}]"
                if key == "denoise_step" and not math.isfinite(value):
                    raise ConfigError(f"{where}={value} must be a finite number")
                try:
                    if key == "guidance":
                        Guidance(weight=value)
                    elif key == "attn_temp":
                        Guidance(attn_temp=value)
                    elif key == "decoding_mode":
                        Decoding(mode=value)
                except SettingError as e:
                    raise e.at(_Keys(f"{prefix}{key}.", {SWEPT[key].split(".")[-1]: where})) from None
                if value in seen:
                    raise ConfigError(f"{prefix}{key} lists {value!r} twice (each setting is scored once)")
                seen.add(value)

    def points(
        self, guidance: Guidance, decoding: Decoding, denoise_step: float, prefix: str = "eval.sweep."
    ) -> list[SweepPoint]:
        """Every setting of the grid (the last swept key varies fastest), built from the base settings with the
        swept fields replaced; one point (the base) when nothing is swept. A SettingError or ConfigError names
        the list entry (`eval.sweep.attn_temp[1]`) or the base key that cannot go with it."""
        self._check_values(prefix)
        section = prefix.removesuffix("sweep.")
        grid = [[(key, i, value) for i, value in enumerate(getattr(self, key))] or [(key, None, None)] for key in SWEPT]
        # The Guidance / Decoding field each list sets (weight, attn_temp, mode): a SettingError names it.
        fields = {key: name.split(".")[1] for key, name in SWEPT.items() if "." in name}
        points = []
        for combination in itertools.product(*grid):
            chosen = {key: (i, value) for key, i, value in combination if i is not None}
            swept = {fields[k]: f"{prefix}{k}[{i}]" for k, (i, _) in chosen.items() if k in fields}
            try:
                g = dataclasses.replace(
                    guidance,
                    weight=chosen.get("guidance", (None, guidance.weight))[1],
                    attn_temp=chosen.get("attn_temp", (None, guidance.attn_temp))[1],
                )
            except SettingError as e:
                raise e.at(_Keys(f"{section}guidance.", swept)) from None
            try:
                d = dataclasses.replace(decoding, mode=chosen.get("decoding_mode", (None, decoding.mode))[1])
            except SettingError as e:
                raise e.at(_Keys(f"{section}decoding.", swept)) from None
            points.append(SweepPoint(g, d, chosen.get("denoise_step", (None, denoise_step))[1]))
        return points
