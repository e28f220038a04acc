"""Ray side of training: start or join a cluster, run `train_worker` on N workers, report how the launch went."""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checkpoint import EXPORT_NAME
from ..config import ConfigError, RunConfig, dump_config, to_dict
from ..data import read_manifest, resolve_data_path
from .console import (
    ConsoleOptions,
    TrainingProgress,
    apply_driver_settings,
    ray_init_kwargs,
    ray_train_log_level,
)

DEFAULT_EXTENSIONS_DIR = Path.home() / ".cache" / "tarflow_scale" / "torch_extensions"
CONSOLE_KEY = "_console"  # ConsoleOptions ride along in the train loop config under this key
_CHECKPOINT_NAME = re.compile(r"checkpoint_(\d+)$")


@dataclass
class LaunchOutcome:
    """What `launch` did: trained (from `start_step` to `end_step`), or found the run already finished."""

    run_dir: Path
    already_finished: bool
    start_step: int
    end_step: int
    seconds: float  # wall-clock of the Ray Train fit (0 when already finished)
    result: Any = None  # Ray's Result


def checkpoint_steps(run_dir: str | Path) -> list[int]:
    """Steps of the complete checkpoints (`checkpoint_N/latest` present) in a run directory, ascending."""
    steps = []
    for path in Path(run_dir).glob("checkpoint_*"):
        match = _CHECKPOINT_NAME.match(path.name)
        if match and (path / "latest").is_file():
            steps.append(int(match.group(1)))
    return sorted(steps)


def finished_step(config: RunConfig) -> int | None:
    """The step a finished run stopped at, or None when there is training (or the final export) left to do.

    Finished means: a complete checkpoint at or beyond `train.num_steps` and the export written. Raising
    `train.num_steps` makes the run unfinished again (it resumes from its newest checkpoint).
    """
    run_dir = Path(config.run_dir)
    steps = checkpoint_steps(run_dir)
    if not steps or steps[-1] < config.train.num_steps or not (run_dir / EXPORT_NAME).is_file():
        return None
    return steps[-1]


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


def init_ray(address: str | None, console: ConsoleOptions | None = None) -> None:
    """Join `address` (or RAY_ADDRESS); with neither, start a fresh embedded local cluster."""
    import ray

    if ray.is_initialized():
        return
    console = console or ConsoleOptions()
    apply_driver_settings(console)
    settings = ray_init_kwargs(console)
    # Workers JIT-build DeepSpeed's CPU comm op once; keep it out of the temp dir so later runs reuse it.
    env = {"TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(DEFAULT_EXTENSIONS_DIR))}
    env.update(settings["env_vars"])
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    ray.init(
        address=address,
        runtime_env={"env_vars": env},
        log_to_driver=settings["log_to_driver"],
        logging_level=settings["logging_level"],
    )


def _say(message: str) -> None:
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def launch(config: RunConfig, address: str | None = None, console: ConsoleOptions | None = None) -> LaunchOutcome:
    """Train `config` with Ray Train + DeepSpeed; resumes when `run_dir` already holds checkpoints, and returns at
    once (before Ray starts) when the run already finished. At the end the trainer writes
    `run_dir/model.safetensors` from the live weights."""
    console = console or ConsoleOptions()
    config.validate()
    run_dir = Path(config.run_dir).resolve()
    config.run_dir = str(run_dir)
    done = finished_step(config)
    if done is not None:
        return LaunchOutcome(run_dir, True, done, done, 0.0)
    previous = checkpoint_steps(run_dir)
    start_step = previous[-1] if previous else 0

    config.data.path = resolve_data_path(config.data, announce=_say)
    check_data_matches_model(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(config, run_dir / "config.yaml")

    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchTrainer

    from .trainer import train_worker

    where = f"resuming from step {start_step}" if start_step else "from scratch"
    _say(
        f"training {run_dir.name}: {config.train.num_steps} steps, {config.cluster.num_workers} workers "
        f"({'GPU' if config.cluster.use_gpu else 'CPU'}), {where}; starting Ray and DeepSpeed..."
    )
    init_ray(address or config.cluster.address, console)
    resources = {"CPU": config.cluster.cpus_per_worker}
    if config.cluster.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={**to_dict(config), CONSOLE_KEY: console.to_dict()},
        scaling_config=ScalingConfig(
            num_workers=config.cluster.num_workers, use_gpu=config.cluster.use_gpu, resources_per_worker=resources
        ),
        run_config=RayRunConfig(
            name=run_dir.name,
            storage_path=str(run_dir.parent),
            failure_config=FailureConfig(max_failures=config.cluster.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.train.keep_checkpoints),
            logging_config=LoggingConfig(log_level=ray_train_log_level(console)),
        ),
    )
    progress = None
    if not console.verbose:  # verbose: rank 0 prints its own progress lines
        progress = TrainingProgress(run_dir / "metrics.jsonl", config.train.num_steps, console.progress_every_s)
        progress.start()
    started = time.time()
    try:
        result = trainer.fit()
    finally:
        if progress is not None:
            progress.stop()
    return LaunchOutcome(run_dir, False, start_step, config.train.num_steps, time.time() - started, result)
