"""Typed run configuration: dataclass defaults -> YAML file -> dotted command-line overrides.

Every component (model, data, optimisation, ZeRO, cluster, evaluation) owns one dataclass; `RunConfig`
composes them. Unknown keys and values of the wrong type are errors that name the dotted key at fault.
The defaults are the tiny CPU run the Quickstart launches, so an empty YAML file is a valid config.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message names the file and/or dotted key."""


# ----------------------------------------------------------------------------------------------------------
# Component configs


@dataclass
class TarFlowConfig:
    """Architecture of a TarFlow model (arXiv 2412.06329). Stored inside every checkpoint and export."""

    image_size: int = 16  # H = W of the input, pixels
    in_channels: int = 3
    patch_size: int = 2  # p: a token is a p x p patch, D = C * p^2 values
    channels: int = 64  # Transformer width
    num_blocks: int = 4  # flow blocks, each with its own causal Transformer
    layers_per_block: int = 2
    head_dim: int = 32
    mlp_ratio: float = 4.0
    num_classes: int = 0  # 0: unconditional
    # How an unconditional (or dropped) label is embedded: its own learned vector, or the classes' mean.
    null_label: Literal["learned", "mean"] = "learned"
    # Per-token transform: affine NVP, its volume-preserving variant, rational-quadratic spline, mixture CDF.
    transform: Literal["affine", "affine_vp", "spline", "mixture"] = "affine"
    num_bins: int = 8  # spline: K bins
    spline_bound: float = 4.0  # spline: bins cover [-B, B]; identity tails outside
    num_components: int = 4  # mixture: K logistics
    # Prior on z: standard normal, or a learned per-dimension variance (used with affine_vp).
    prior: Literal["standard", "learned"] = "standard"

    @property
    def token_dim(self) -> int:
        return self.in_channels * self.patch_size**2

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_dims(self) -> int:
        return self.in_channels * self.image_size**2

    def validate(self) -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"model.image_size={self.image_size} is not divisible by model.patch_size={self.patch_size}"
            )
        if self.channels % self.head_dim:
            raise ConfigError(
                f"model.channels={self.channels} is not divisible by model.head_dim={self.head_dim}"
            )
        if self.num_tokens < 2:
            raise ConfigError("model: an image must have at least 2 patches (lower model.patch_size)")
        for name in ("in_channels", "channels", "num_blocks", "layers_per_block", "head_dim", "num_bins"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1")
        if self.num_classes < 0:
            raise ConfigError("model.num_classes must be >= 0 (0 means unconditional)")
        if self.transform == "affine_vp" and self.prior != "learned":
            raise ConfigError("model.transform=affine_vp keeps volume, so it needs model.prior=learned")


@dataclass
class DataConfig:
    """Where the shards are and how training samples are augmented."""

    # Folder holding `<name>-<split>-NNNNNN.tar` shards and their `<split>.json` manifest, or "bundled" for the
    # small real dataset built from the photographs inside scikit-image / scikit-learn.
    path: str = "bundled"
    train_split: str = "train"
    eval_split: str = "val"
    # Noise augmentation in the [-1, 1] pixel scale: "gaussian" (std noise_std) or "uniform" dequantization.
    noise: Literal["gaussian", "uniform", "none"] = "gaussian"
    noise_std: float = 0.05
    hflip: bool = True
    shuffle_buffer: int = 1000
    num_workers: int = 1  # DataLoader processes per rank
    seed: int = 0

    def validate(self) -> None:
        if self.noise == "gaussian" and self.noise_std <= 0:
            raise ConfigError("data.noise_std must be > 0 with data.noise=gaussian")
        if self.num_workers < 0:
            raise ConfigError("data.num_workers must be >= 0")


@dataclass
class OptimConfig:
    """AdamW with cosine decay after a linear warmup."""

    lr: float = 1e-3
    min_lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    grad_clip: float = 1.0  # explicit: DeepSpeed clips at 1.0 unless told otherwise; 0 disables
    ema_decay: float = 0.0  # 0: no EMA (as in the paper)

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError("optim.lr must be > 0")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError("optim.ema_decay must be in [0, 1)")


@dataclass
class DeepSpeedConfig:
    """The DeepSpeed engine; its JSON config is generated from this, never written by hand."""

    zero_stage: int = 2
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    activation_checkpointing: bool = False
    compile: bool = False

    def validate(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"deepspeed.zero_stage={self.zero_stage} must be 0, 1, 2 or 3")


@dataclass
class ClusterConfig:
    """Ray: where to run and how many workers."""

    address: str | None = None  # None: RAY_ADDRESS or an embedded local cluster
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: int = 1
    max_failures: int = 2  # worker-group restarts from the last checkpoint before giving up

    def validate(self) -> None:
        if self.num_workers < 1:
            raise ConfigError("cluster.num_workers must be >= 1 (DeepSpeed needs a process group)")


@dataclass
class TrainConfig:
    """The training loop. Durations count optimizer steps; the global batch is fixed across world sizes."""

    num_steps: int = 200
    global_batch_size: int = 32
    micro_batch_size: int = 16  # per rank per forward pass; accumulation fills the global batch
    label_dropout: float = 0.1  # class-conditional only: drop to the null label for guidance
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    sample_every: int = 100  # sample grid PNG every K steps (0: only at the end)
    num_samples: int = 16
    max_nonfinite_in_a_row: int = 5
    seed: int = 0

    def validate(self) -> None:
        if self.num_steps < 1:
            raise ConfigError("train.num_steps must be >= 1")
        if not 0 <= self.label_dropout < 1:
            raise ConfigError("train.label_dropout must be in [0, 1)")


@dataclass
class EvalConfig:
    """Which evaluation jobs to run and how."""

    jobs: list[str] = field(default_factory=lambda: ["bpd", "sample"])  # bpd | sample | denoise | fid
    batch_size: int = 64
    num_samples: int = 64
    seed: int = 0
    guidance: float = 0.0
    guidance_annealed: bool = False
    attn_temp: float = 1.0
    bpd_draws: int = 1  # dequantization draws per image
    denoise_step: float = 1.0  # multiplier on the Tweedie step sigma^2 * score
    fid_num_samples: int = 50_000
    fid_reference: str = ""  # cached reference statistics (.npz); "" -> next to the data
    inception_path: str = ""  # inception-2015-12-05.pt for offline clusters; "" -> clean-fid's default
    num_workers: int = 1


@dataclass
class RunConfig:
    """Everything one run needs; dumped as `config.yaml` into the run directory."""

    run_dir: str = "runs/tiny"
    model: TarFlowConfig = field(default_factory=TarFlowConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> RunConfig:
        for part in (self.model, self.data, self.optim, self.deepspeed, self.cluster, self.train):
            part.validate()
        per_step = self.cluster.num_workers * self.train.micro_batch_size
        if self.train.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size={self.train.global_batch_size} is not divisible by "
                f"cluster.num_workers x train.micro_batch_size = {per_step}"
            )
        return self

    @property
    def grad_accum_steps(self) -> int:
        return self.train.global_batch_size // (self.cluster.num_workers * self.train.micro_batch_size)


# ----------------------------------------------------------------------------------------------------------
# Loading: dict -> dataclass with type checks, YAML files, dotted overrides


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where lossless (int -> float, list -> tuple)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is typing.Union or origin is types.UnionType:
        errors = []
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} is not a {_type_name(tp)}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(tp))}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported config type {tp}")


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a (partial) dict; missing keys keep their defaults."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s} (valid keys: {', '.join(sorted(names))})"
        )
    kwargs = {name: _coerce(value, hints[name], f"{prefix}{name}") for name, value in data.items()}
    return cls(**kwargs)


def to_dict(config: Any) -> dict:
    """Plain nested dict (tuples become lists) suitable for YAML and JSON."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


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


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, cls: type = RunConfig
) -> Any:
    """Defaults, then the YAML file at `path`, then dotted `overrides`; validated."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        tree = loaded
    tree = _merge(tree, parse_overrides(overrides or []))
    try:
        config = from_dict(cls, tree)
    except ConfigError as e:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{e}") from None
    if hasattr(config, "validate"):
        config.validate()
    return config


def dump_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def model_config_from_dict(data: dict) -> TarFlowConfig:
    config = from_dict(TarFlowConfig, data, prefix="model.")
    config.validate()
    return config
