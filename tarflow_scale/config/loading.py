"""Loading configs: defaults -> YAML file -> dotted command-line overrides, with type checks whose errors name the
dotted key and the source (file or override) at fault; the shipped recipes; writing the resolved config."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml

from .checks import ConfigError, SettingError
from .models import TarFlowConfig
from .run import RunConfig

# Written here rather than taken from dacite, cattrs or OmegaConf (tried against tests/test_config.py): dacite
# takes true as an int and names no key for an unknown nested one; cattrs converts lossily (3.7 -> 3, "false" ->
# True) unless every scalar gets a hook like these; OmegaConf takes 3 as true and resolves ${...} in every string.
# The scalar types a config field may have: what a value must be, and what an error says was expected.
_SCALARS: dict[type, tuple[Callable[[Any], bool], str]] = {
    bool: (lambda v: isinstance(v, bool), "true/false"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    str: (lambda v: isinstance(v, str), "a string"),
    type(None): (lambda v: v is None, "null"),
}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` checked against the annotation `tp` of config key `key`; converted only where lossless (int ->
    float, list -> tuple, and the YAML 1.1 string "3e-3" -> float). A dataclass annotation recurses into from_dict.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _coerce(value, option, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} is not a {str(tp).replace('typing.', '')}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args[-1] is not Ellipsis:  # tuple[float, float]: a fixed length, a type per place
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        items = (_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))  # list[T], tuple[T, ...]
        return tuple(items) if origin is tuple else list(items)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp not in _SCALARS:
        raise ConfigError(f"{key}: unsupported config type {tp}")
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "3e-3" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    accepts, expected = _SCALARS[tp]
    if not accepts(value):
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")
    return float(value) if tp is float else value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a (partial) dict; missing keys keep their defaults. `prefix` is the dotted path
    of `cls` in the run config, for error messages ("model.")."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    # A section lists its keys that moved (old name -> new dotted key) in MOVED_KEYS: a removed flat key, or a
    # scalar given where a section now stands (eval.guidance=2 -> eval.guidance.weight), is named with its new key.
    moved = getattr(cls, "MOVED_KEYS", {})
    for name, value in data.items():
        section = name in names and dataclasses.is_dataclass(hints[name]) and not isinstance(value, dict)
        if name in moved and (name not in names or section):
            raise ConfigError(f"config key {prefix}{name} was removed: set {moved[name]} instead")
    # A section may flatten keys that users write nested elsewhere (eval.sweep.guidance for guidance.weight).
    for dotted, flat in getattr(cls, "NESTED_SPELLINGS", {}).items():
        head, leaf = dotted.split(".", 1)
        if isinstance(data.get(head), dict) and leaf in data[head]:
            raise ConfigError(f"config key {prefix}{dotted} is written {prefix}{flat} (a list: {prefix}{flat}=[...])")
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]} (valid keys: {', '.join(sorted(names))})")
    kwargs = {name: _coerce(value, hints[name], f"{prefix}{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except SettingError as e:  # a section that checks itself when built (config/sampling.py): name its keys here
        raise e.at(prefix) from None


def to_dict(config: Any) -> dict:
    """Plain nested dict (tuples become lists) suitable for YAML and JSON."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1}} -> {"optim.lr": 1}: every leaf under its dotted key (lists stay values)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for name in parents:
        node = node.setdefault(name, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {name} is not a section")
    node[leaf] = value


def parse_overrides(overrides: list[str]) -> dict:
    """`["model.channels=256", "run_dir=/tmp/x"]` -> nested dict; values are parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. model.channels=256)")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return tree


def merge_trees(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_trees(out[key], value)
        else:
            out[key] = value
    return out


# The recipes shipped inside the package (in a checkout, a symlink to the repository's `configs/`).
SHIPPED_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def shipped_config_names() -> list[str]:
    """Names accepted by `--config NAME`: the shipped YAML files relative to the configs folder, no suffix."""
    if not SHIPPED_CONFIG_DIR.is_dir():
        return []
    return sorted(
        p.relative_to(SHIPPED_CONFIG_DIR).with_suffix("").as_posix() for p in SHIPPED_CONFIG_DIR.rglob("*.yaml")
    )


def resolve_config_path(ref: str | Path) -> Path:
    """A config file path, or the name of a shipped recipe (`imagenet64_cond`, `tabular/tnaf_digits`).

    An existing file wins; otherwise the name is looked up among the shipped configs, with or without `.yaml`
    and with or without a leading `configs/`, so the README's `--config configs/X.yaml` works from any folder.
    """
    path = Path(ref)
    if path.is_file():
        return path
    name = path.as_posix().removesuffix(".yaml").removesuffix(".yml")
    name = name.removeprefix("./").removeprefix("configs/")
    shipped = SHIPPED_CONFIG_DIR / f"{name}.yaml"
    if not path.is_absolute() and shipped.is_file():
        return shipped
    names = ", ".join(shipped_config_names()) or "(none found)"
    raise ConfigError(f"config file {ref} does not exist, and it is not a shipped config; shipped names: {names}")


def read_yaml_mapping(path: str | Path) -> dict:
    """The top-level mapping of a YAML config file (a path or a shipped config's name); errors name the file."""
    path = resolve_config_path(path)
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return loaded


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, cls: type = RunConfig) -> Any:
    """Defaults, then the YAML file at `path`, then dotted `overrides`; validated.

    The defaults are `cls()` as a tree, so a partial section keeps the run's defaults for the keys it does not
    name (the study's `tarflow` section defaults to the digits' 8 x 8 geometry, not a bare TarFlowConfig's).
    """
    file_tree = read_yaml_mapping(path) if path is not None else {}
    override_tree = parse_overrides(overrides or [])
    # Check each source on its own first, so an error names where the bad key came from.
    try:
        from_dict(cls, override_tree)
    except ConfigError as e:
        raise ConfigError(f"command-line override: {e}") from None
    try:
        from_dict(cls, file_tree)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    config = from_dict(cls, merge_trees(to_dict(cls()), merge_trees(file_tree, override_tree)))
    if hasattr(config, "validate"):
        config.validate()
    return config


def dump_config(config: Any, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically (a reader never sees half a config)."""
    from .. import atomic

    atomic.write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))


def model_config_from_dict(data: dict) -> TarFlowConfig:
    config = from_dict(TarFlowConfig, data, prefix="model.")
    config.validate()
    return config
