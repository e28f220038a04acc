"""Typed configuration. `checks`: the error types and range checks; `models`: the model families' architectures;
`sampling`: guidance and decoding settings; `sweep`: eval.sweep and its grid of settings; `run`: the run config and
its components; `memory` and `batching`: the per-GPU memory estimate and the micro-batch derived from it; `study`:
the tabular study; `loading`: YAML, overrides, type checks.
"""

from .checks import ConfigError, SettingError
from .loading import (
    SHIPPED_CONFIG_DIR,
    dump_config,
    flatten,
    from_dict,
    load_config,
    model_config_from_dict,
    parse_overrides,
    read_yaml_mapping,
    resolve_config_path,
    shipped_config_names,
    to_dict,
)
from .models import MAFConfig, TarFlowConfig, TNAFConfig
from .run import (
    ClusterConfig,
    DataConfig,
    DeepSpeedConfig,
    EvalConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    local_run_dir,
    resolve_batching,
)
from .sampling import Decoding, Guidance
from .sweep import SweepConfig, SweepPoint

__all__ = [
    "SHIPPED_CONFIG_DIR",
    "ClusterConfig",
    "ConfigError",
    "DataConfig",
    "Decoding",
    "DeepSpeedConfig",
    "EvalConfig",
    "Guidance",
    "MAFConfig",
    "OptimConfig",
    "RunConfig",
    "SettingError",
    "SweepConfig",
    "SweepPoint",
    "TNAFConfig",
    "TarFlowConfig",
    "TrainConfig",
    "dump_config",
    "flatten",
    "from_dict",
    "load_config",
    "local_run_dir",
    "model_config_from_dict",
    "parse_overrides",
    "read_yaml_mapping",
    "resolve_batching",
    "resolve_config_path",
    "shipped_config_names",
    "to_dict",
]
