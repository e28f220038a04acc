"""The config layer's error types and the range checks every config section's `validate()` uses."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
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


class SettingError(ConfigError):
    """A setting that cannot work, written as a template over field names ("{weight}=nan is not a finite number")
    so that one check names the key where the setting was given: `guidance.weight` in Python,
    `eval.guidance.weight` in a run config (config/loading.py re-raises it `at` the section's dotted prefix), the
    flag `--guidance` on the command line (cli/sample.py passes a field -> flag mapping)."""

    def __init__(self, template: str, key: str | Mapping[str, str] = ""):
        self.template = template
        names = key if isinstance(key, Mapping) else _Prefixed(key)
        super().__init__(template.format_map(names))

    def at(self, key: str | Mapping[str, str]) -> SettingError:
        """The same error naming the fields by `key`: a dotted prefix, or a mapping of field names."""
        return SettingError(self.template, key)


class _Prefixed(dict):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def __missing__(self, name: str) -> str:
        return f"{self.prefix}{name}"
