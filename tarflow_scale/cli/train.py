"""`tarflow-train`: assemble the run config from YAML + dotted overrides, launch Ray Train + DeepSpeed, and end
with a summary on the driver (held-out bits/dim next to PNG's, where the artifacts are, what to run next)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from tarflow_scale.atomic import is_storage_error, storage_error_line
from tarflow_scale.config import ConfigError, RunConfig, load_config, to_dict


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tarflow-train",
        description="Train a TarFlow model with DeepSpeed ZeRO under Ray Train. With no --config, runs the "
        "embedded default: a small model on the bundled real dataset, 2 CPU workers, local Ray, about 5 minutes "
        "on 2 cores, ending with its held-out bits/dim next to PNG's. Re-running the same command (same run_dir) "
        "resumes from the latest checkpoint, or says the run is finished.",
        epilog="example: tarflow-train --config imagenet64_cond run_dir=/shared/runs/c1 "
        "cluster.num_workers=8 cluster.use_gpu=true",
    )
    parser.add_argument(
        "--config", help="YAML run config: a path or a shipped recipe name (see configs/); default: the tiny run"
    )
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded cluster)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument(
        "--allow-config-change",
        nargs="+",
        default=[],
        metavar="KEY",
        help="dotted config keys that may differ from the checkpoint a run resumes from (e.g. optim.lr); "
        "without it, resuming with a changed model/optimizer/schedule/data/batch setting is refused",
    )
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="resume from a checkpoint that is not your own (another user's files, or writable by others): a resume "
        "unpickles DeepSpeed's engine state, which runs any code planted in it, so only for checkpoints you trust",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="the libraries' full output (Ray, Ray Train, DeepSpeed) and rank 0's own progress lines",
    )
    parser.add_argument(
        "--no-eval",
        action="store_true",
        help="skip the end-of-run held-out bits/dim pass on the driver (skipped anyway above "
        "4096 held-out images: use tarflow-eval there)",
    )
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.channels=256 train.num_steps=10")
    args = parser.parse_args(argv)
    # `--allow-config-change a.b c=d`: argparse gives both to the option; key=value items are overrides.
    args.overrides += [k for k in args.allow_config_change if "=" in k]
    args.allow_config_change = [k for k in args.allow_config_change if "=" not in k]
    return args


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _shown(path: Path) -> str:
    """A path as the user would type it: relative to the current folder when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def evaluation_lines(config: RunConfig, export: Path) -> list[str]:
    """Held-out bits/dim (one exact pass over the held-out split) and PNG's on the same images."""
    from tarflow_scale.artifacts import load_model
    from tarflow_scale.data import DataError, read_manifest
    from tarflow_scale.evaluation.summary import (
        MAX_QUICK_EVAL_IMAGES,
        comparison_line,
        heldout_bits_per_dim,
        png_bits_per_dim,
    )

    try:
        manifest = read_manifest(config.data.path, config.data.eval_split)
    except (DataError, OSError) as e:
        return [f"held-out bits/dim: skipped (no readable {config.data.eval_split} split: {e})"]
    if manifest.num_samples > MAX_QUICK_EVAL_IMAGES:
        return [
            f"held-out bits/dim: skipped on the driver ({manifest.num_samples} images in {config.data.eval_split}); "
            f"run: tarflow-eval {_shown(export)} --config eval_full"
        ]
    model = load_model(export)
    score = heldout_bits_per_dim(model, config.data)
    png = png_bits_per_dim(config.data, config.data.path)
    noise = config.data.noise
    caveat = "" if noise == "uniform" else f" (the model trained with {noise} noise: a loose bound)"
    return [
        f"held-out bits/dim {score.mean:.3f} ± {score.stderr:.3f}: {score.num_images} {score.split} images, each "
        f"once, uniform dequantization{caveat}",
        f"PNG (optimize=True) on the same images: {png:.3f} bits/dim; the model {comparison_line(score.mean, png)}",
    ]


def summary_lines(config: RunConfig, outcome, evaluate: bool) -> list[str]:
    run_dir = Path(config.run_dir)
    export = run_dir / "model.safetensors"
    lines = []
    if outcome.already_finished:
        lines.append(
            f"{_shown(run_dir)} already finished at step {outcome.end_step} (train.num_steps="
            f"{config.train.num_steps}): nothing to train. Raise train.num_steps to train longer, or choose "
            "another run_dir to start over."
        )
    else:
        trained = outcome.end_step - outcome.start_step
        lines.append(
            f"done: {outcome.end_step} steps ({trained} in this launch) in {_duration(outcome.seconds)}, "
            f"{config.cluster.num_workers} {'GPU' if config.cluster.use_gpu else 'CPU'} workers"
        )
        if evaluate:
            lines += evaluation_lines(config, export)
    grids = sorted((run_dir / "samples").glob("step_*.png"))
    # eval_quick runs every job; a model trained without Gaussian noise has nothing for the Tweedie step to remove.
    gaussian = config.data.noise == "gaussian"
    quick_jobs = "" if gaussian else " eval.jobs=[bpd,sample,fid]"
    evaluated = "denoising, pipeline FID" if gaussian else "pipeline FID"
    lines += [
        f"export   {_shown(export)}",
        f"samples  {_shown(grids[-1]) if grids else _shown(run_dir / 'samples')}",
        f"metrics  {_shown(run_dir / 'metrics.jsonl')}; tensorboard --logdir {_shown(run_dir / 'tensorboard')}",
        "next:",
        f"  tarflow-eval {_shown(export)} --config eval_quick{quick_jobs}   # bits/dim, samples, {evaluated}",
        f"  tarflow-sample {_shown(export)} --num 16                 # one PNG per sample, a grid, an npz",
        "  tarflow-train --config imagenet64_cond --address HEAD_IP:6379 run_dir=/shared/runs/c1 "
        "data.path=/shared/imagenet64 cluster.num_workers=8 cluster.use_gpu=true   # a cluster: see the README",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"tarflow-train: config error: {e}", file=sys.stderr)
        return 2
    from tarflow_scale.training.deepspeed_config import describe_precision, precision_warning

    warning = precision_warning(config)
    if warning:
        print(f"tarflow-train: warning: {warning}", file=sys.stderr)
    if args.dry_run:
        print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
        print(f"# {describe_precision(config)}")
        print(
            f"# batch: {config.train.global_batch_size} = {config.cluster.num_workers} workers x micro-batch "
            f"{config.micro_batch_size} x {config.grad_accum_steps} accumulation step(s)"
        )
        # The estimate sizes the micro-batch on GPUs only (cluster.gpu_memory_gib); on CPU it is for information.
        fits = f"cluster.gpu_memory_gib={config.cluster.gpu_memory_gib:g}" if config.cluster.use_gpu else None
        for line in config.memory_estimate.lines(config.cluster.gpu_memory_gib if fits else None):
            print(f"# {line}")
        return 0
    from tarflow_scale.artifacts import CheckpointError
    from tarflow_scale.data import DataError

    if config.train.init_from:  # before any worker starts: the file exists and holds this run's model
        from tarflow_scale.artifacts.load import check_initial_weights

        try:
            check_initial_weights(config.train.init_from, config.model)
        except CheckpointError as e:
            print(f"tarflow-train: {e}", file=sys.stderr)
            return 2
    from tarflow_scale.training.cluster import launch
    from tarflow_scale.training.console import ConsoleOptions
    from tarflow_scale.training.failures import GPUOutOfMemoryError
    from tarflow_scale.training.run_state import RunAborted, RunStopped

    try:
        outcome = launch(
            config,
            address=args.address,
            allow_config_change=tuple(args.allow_config_change),
            console=ConsoleOptions(verbose=args.verbose),
            trust_checkpoint=args.trust_checkpoint,
        )
    except (
        ConfigError,
        DataError,
        CheckpointError,
        GPUOutOfMemoryError,
    ) as e:  # repeatable: names the key, file or sample
        print(f"tarflow-train: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the driver's own writes: a full disk, a read-only run_dir
        if not is_storage_error(e):
            raise
        print(f"tarflow-train: {storage_error_line(e)}", file=sys.stderr)
        return 2
    except (RunStopped, RunAborted) as e:
        print(f"tarflow-train: {e}", file=sys.stderr)
        return 130  # the shell's code for "interrupted"
    import ray

    if ray.is_initialized():  # free the workers' memory before the driver's own evaluation pass
        ray.shutdown()
    print("\n".join(summary_lines(config, outcome, evaluate=not args.no_eval)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
