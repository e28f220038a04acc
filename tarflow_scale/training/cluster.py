"""Ray side of training: start or join a cluster, run `train_worker` on N workers, export the result."""

from __future__ import annotations

import os
from pathlib import Path

from ..config import ConfigError, RunConfig, local_run_dir, to_dict
from ..data import check_shard_sizes, read_manifest, resolve_data_path

DEFAULT_EXTENSIONS_DIR = Path.home() / ".cache" / "tarflow_scale" / "torch_extensions"


def check_data_matches_model(config: RunConfig) -> None:
    """Fail before any worker starts when the shards cannot feed this model."""
    manifest = read_manifest(config.data.path, config.data.train_split)
    check_shard_sizes(config.data.path, manifest)  # cheap; `tarflow-data verify` is the full check
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


def prepare_run_dir(run_dir: Path) -> None:
    """Create run_dir and prove it writable before any worker starts (ConfigError naming it otherwise)."""
    from .. import atomic

    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic.write_text(run_dir / ".write_test", "ok\n")
        (run_dir / ".write_test").unlink()
    except OSError as e:
        raise ConfigError(f"run_dir={run_dir} is not writable: {e.strerror or e}") from None


def launch(config: RunConfig, address: str | None = None, allow_config_change: tuple[str, ...] = ()):
    """Train `config` with Ray Train + DeepSpeed; resumes when `run_dir` already holds checkpoints.

    Everything that would fail the same way in every worker is checked here first (config, data, run_dir, the
    config and world size of the checkpoint it resumes from). Returns Ray's `Result`; raises RunStopped after a
    SIGINT/SIGTERM stop, and a repeatable worker error (ConfigError, DataError, ...) as itself, unretried.
    At the end the trainer writes `run_dir/model.safetensors` from the live weights.
    """
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig

    from ..checkpoint import complete_checkpoints
    from .failures import ReliableTorchTrainer, repeatable_failure
    from .run_state import RunStopped, check_resume, clear_stop, record_config, repair_ray_snapshot, stop_requested
    from .trainer import train_worker

    config.validate()
    run_dir = local_run_dir(config.run_dir).resolve()  # accepts file:// URIs
    config.run_dir = str(run_dir)
    config.data.path = resolve_data_path(config.data)
    check_data_matches_model(config)
    plan = check_resume(config, tuple(allow_config_change))
    for key, (old, new) in plan.allowed_changes.items():
        print(f"tarflow-train: config change on resume: {key}: {old!r} -> {new!r}", flush=True)
    prepare_run_dir(run_dir)
    repair_ray_snapshot(run_dir)
    clear_stop(run_dir)
    record_config(config, plan)

    init_ray(address or config.cluster.address)
    resources = {"CPU": config.cluster.cpus_per_worker}
    if config.cluster.use_gpu:
        resources["GPU"] = 1
    trainer = ReliableTorchTrainer(
        train_worker,
        stop_dir=run_dir,
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
    try:
        result = trainer.fit()
    except Exception as e:
        cause = repeatable_failure(e)
        if cause is not None:  # the worker's own error, not Ray's wrapper: it names the key, file or sample
            raise cause from None
        raise
    if stop_requested(run_dir):
        from ..checkpoint import checkpoint_step

        clear_stop(run_dir)
        done = complete_checkpoints(run_dir)
        last = done[-1] if done else None
        step = checkpoint_step(last) if last else 0
        if step < config.train.num_steps:  # a signal during the last step changes nothing: the run finished
            raise RunStopped(step, last)
    return result
