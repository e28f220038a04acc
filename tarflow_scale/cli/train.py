"""`tarflow-train`: assemble the run config from YAML + dotted overrides and launch Ray Train + DeepSpeed."""

from __future__ import annotations

import argparse
import sys

import yaml

from tarflow_scale.config import ConfigError, load_config, to_dict


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tarflow-train",
        description="Train a TarFlow model with DeepSpeed ZeRO under Ray Train. With no --config, runs the "
        "embedded default: a tiny model on the bundled real dataset, 2 CPU workers, local Ray. Re-running the "
        "same command (same run_dir) resumes from the latest checkpoint.",
        epilog="example: tarflow-train --config configs/imagenet64_cond.yaml run_dir=/shared/runs/c1 "
        "cluster.num_workers=8 cluster.use_gpu=true",
    )
    parser.add_argument("--config", help="YAML run config (see configs/); defaults to the built-in tiny run")
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
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.channels=256 train.num_steps=10")
    args = parser.parse_args(argv)
    # `--allow-config-change a.b c=d`: argparse gives both to the option; key=value items are overrides.
    args.overrides += [k for k in args.allow_config_change if "=" in k]
    args.allow_config_change = [k for k in args.allow_config_change if "=" not in k]
    return args


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
        return 0
    from tarflow_scale.checkpoint import CheckpointError
    from tarflow_scale.data import DataError

    if config.train.init_from:  # before any worker starts: the file exists and holds this run's model
        from tarflow_scale.checkpoint import check_initial_weights

        try:
            check_initial_weights(config.train.init_from, config.model)
        except CheckpointError as e:
            print(f"tarflow-train: {e}", file=sys.stderr)
            return 2
    from tarflow_scale.training.cluster import launch
    from tarflow_scale.training.run_state import RunStopped

    try:
        launch(config, address=args.address, allow_config_change=tuple(args.allow_config_change))
    except (ConfigError, DataError, CheckpointError) as e:  # repeatable: one line naming the key, file or sample
        print(f"tarflow-train: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:
        print(f"tarflow-train: {e}", file=sys.stderr)
        return 130  # the shell's code for "interrupted"
    return 0


if __name__ == "__main__":
    sys.exit(main())
