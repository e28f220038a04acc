"""The config layer's error type and the range checks every config section's `validate()` uses."""

from __future__ import annotations

import dataclasses
import math
from typing import Any


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message names the file and/or dotted key."""


def check_at_least(section: Any, prefix: str, minimum: float, *names: str) -> None:
    """Each named field is a finite number >= minimum; else a ConfigError naming `prefix.name`."""
    for name in names:
        value = getattr(section, name)
        if not math.isfinite(value) or value < minimum:
            raise ConfigError(f"{prefix}.{name}={value} must be >= {minimum:g}")


def check_no_nan(section: Any, prefix: str) -> None:
    """NaN passes every `<`/`>` comparison as False, so range checks alone let it through: refuse it here."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        values = value if isinstance(value, (tuple, list)) else [value]
        if any(isinstance(v, float) and math.isnan(v) for v in values):
            raise ConfigError(f"{prefix}.{f.name}={value} is not a number")
