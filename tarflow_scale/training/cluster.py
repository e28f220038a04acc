"""Ray side of training: start or join a cluster, run `train_worker` on N workers, export the result."""

from __future__ import annotations

import os
from pathlib import Path

from ..config import ConfigError, RunConfig, dump_config, local_run_dir, to_dict
from ..data import read_manifest, resolve_data_path

DEFAULT_EXTENSIONS_DIR = Path.home() / ".cache" / "tarflow_scale" / "torch_extensions"


def check_data_matches_model(config: RunConfig) -> None:
    """Fail before any worker starts when the shards cannot feed this model."""
    manifest = read_manifest(config.data.path, config.data.train_split)
    model = config.model
    size = config.data.image_size or manifest.image_size  # the loader can downsample, never upsample
    if size != model.image_size or size > manifest.image_size or manifest.channels != model.in_channels:
        raise ConfigError(
            f"data.path={config.data.path} holds {manifest.channels}x{manifest.image_size}x{manifest.image_size} "
            f"images but the model expects {model.in_channels}x{model.image_size}x{model.image_size} "
            "(set model.image_size / model.in_channels to match, or data.image_size to downsample)"
        )
    if model.num_classes and manifest.num_classes != model.num_classes:
        raise ConfigError(
            f"model.num_classes={model.num_classes} but data.path={config.data.path} has {manifest.num_classes} classes"
        )


def init_ray(address: str | None) -> None:
    """Join `address` (or RAY_ADDRESS); with neither, start a fresh embedded local cluster."""
    import ray

    if ray.is_initialized():
        return
    # Workers JIT-build DeepSpeed's CPU comm op once; keep it out of the temp dir so later runs reuse it.
    env = {"TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(DEFAULT_EXTENSIONS_DIR))}
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True)


def launch(config: RunConfig, address: str | None = None):
    """Train `config` with Ray Train + DeepSpeed; resumes when `run_dir` already holds checkpoints.

    Returns Ray's `Result`. At the end the trainer writes `run_dir/model.safetensors` from the live weights.
    """
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchTrainer

    from .trainer import train_worker

    config.validate()
    run_dir = local_run_dir(config.run_dir).resolve()  # accepts file:// URIs
    config.run_dir = str(run_dir)
    config.data.path = resolve_data_path(config.data)
    check_data_matches_model(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(config, run_dir / "config.yaml")

    init_ray(address or config.cluster.address)
    resources = {"CPU": config.cluster.cpus_per_worker}
    if config.cluster.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=to_dict(config),
        scaling_config=ScalingConfig(
            num_workers=config.cluster.num_workers, use_gpu=config.cluster.use_gpu, resources_per_worker=resources
        ),
        run_config=RayRunConfig(
            name=run_dir.name,
            storage_path=run_dir.parent.as_uri(),  # Ray Train's storage (pyarrow fs) on the shared path
            failure_config=FailureConfig(max_failures=config.cluster.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.train.keep_checkpoints),
        ),
    )
    return trainer.fit()
