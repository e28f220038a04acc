"""`tarflow-sample`: draw images from an export or checkpoint; one PNG per sample, a grid and an npz."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import typing
from pathlib import Path
from typing import Any

from tarflow_scale.cli.common import int_at_least
from tarflow_scale.config import Decoding, Guidance, SettingError

# Flags of the Guidance and Decoding fields (config/sampling.py): --field-name, except where a shorter word is the
# established one. Help texts and defaults come from the fields themselves.
FLAGS = {"weight": "--guidance", "mode": "--decoding"}
FLAG_NAMES = {f.name: FLAGS.get(f.name, "--" + f.name.replace("_", "-")) for cls in (Guidance, Decoding)
              for f in dataclasses.fields(cls)}  # fmt: skip
FORMATS = ("png", "shards")
SHARD_FLAGS = ("workers", "address", "shard_size", "cpus_per_worker")  # only with --format shards
DEFAULT_SHARD_SIZE = 1000  # evaluation/shard_worker.py's, not imported here: --help does not load torch


def add_setting_flags(parser: argparse.ArgumentParser, cls: type, prefix: str) -> None:
    """One flag per field of the settings dataclass `cls` (Guidance or Decoding), with its type, default and help."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, flag, dest, text = hints[f.name], FLAG_NAMES[f.name], f"{prefix}.{f.name}", f.metadata["help"]
        if tp is bool:  # the fields default to False: the flag turns them on
            parser.add_argument(flag, dest=dest, action="store_true", help=text)
            continue
        if typing.get_origin(tp) is typing.Literal:
            options = {"choices": typing.get_args(tp)}
        elif typing.get_origin(tp) is tuple:  # tuple[int, ...]: one or more values
            options = {"type": typing.get_args(tp)[0], "nargs": "+", "metavar": "K"}
        else:
            options = {"type": tp, "metavar": f.name.upper()}
        shown = " ".join(map(str, f.default)) or "none" if isinstance(f.default, tuple) else f.default
        parser.add_argument(flag, dest=dest, default=f.default, help=f"{text} (default: {shown})", **options)


def settings_from_args(args: argparse.Namespace, cls: type, prefix: str) -> Any:
    """The `cls` (Guidance or Decoding) the flags of `add_setting_flags` describe."""
    return cls(**{f.name: getattr(args, f"{prefix}.{f.name}") for f in dataclasses.fields(cls)})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tarflow-sample",
        description="Sample images from a TarFlow export (model.safetensors), a checkpoint folder or a run "
        "directory. Writes OUT/000000.png ... (one PNG per sample), OUT/grid.png and OUT/samples.npz (uint8 images, "
        "labels and every setting). Sample k depends only on (--seed, k, its class and the settings).",
        epilog="examples: tarflow-sample runs/tiny/model.safetensors --num 16; "
        "tarflow-sample m.safetensors --num 64 --balanced --guidance 2 --annealed",
    )
    parser.add_argument("checkpoint", help="an export (.safetensors), a checkpoint_* folder or a run directory")
    parser.add_argument("--num", type=int, default=16, help="number of samples (default 16)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--class",
        dest="classes",
        type=int,
        nargs="+",
        metavar="C",
        help="class(es) of a class-conditional model; sample k gets C[k mod len(C)]",
    )
    group.add_argument("--balanced", action="store_true", help="class-conditional: sample k gets class k mod classes")
    add_setting_flags(parser, Guidance, "guidance")
    add_setting_flags(parser, Decoding, "decoding")
    parser.add_argument(
        "--no-denoise",
        action="store_true",
        help="skip the Tweedie denoising step (by default applied when the model was trained with Gaussian noise, "
        "with the noise std recorded in the checkpoint)",
    )
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    parser.add_argument("--batch-size", type=int_at_least(1), default=32, help="samples drawn at once (default 32)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--out", default=None, help="output folder (default: a 'sampled' folder beside CHECKPOINT, "
                        "'sampled_shards' with --format shards)")  # fmt: skip
    parser.add_argument("--format", choices=FORMATS, default="png", help="png: one PNG per sample, a grid and an "
                        "npz, in this process (default); shards: WebDataset shards and a tarflow-data manifest, "
                        "drawn by Ray workers, resumable (docs/sampling.md)")  # fmt: skip
    shards = parser.add_argument_group("--format shards")
    shards.add_argument("--workers", type=int_at_least(1), default=None, help="Ray workers (default 1); one GPU "
                        "each when the cluster has GPUs (or --device cuda)")  # fmt: skip
    shards.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else an "
                        "embedded local one)")  # fmt: skip
    shards.add_argument("--shard-size", type=int_at_least(1), default=None,
                        help=f"samples per shard (default {DEFAULT_SHARD_SIZE})")  # fmt: skip
    shards.add_argument("-v", "--verbose", action="store_true", help="also show Ray's own log lines")
    shards.add_argument("--cpus-per-worker", type=int_at_least(1), default=None, help="CPUs (torch threads) per "
                        "worker (default 1)")  # fmt: skip
    return parser.parse_args(argv)


def default_out_dir(checkpoint: Path, name: str = "sampled") -> Path:
    base = checkpoint if checkpoint.is_dir() else checkpoint.parent
    return base / name


def write_outputs(out: Path, images, labels, settings: dict) -> None:
    """PNG per sample, a grid and an npz, each written atomically."""
    import numpy as np
    from PIL import Image

    from tarflow_scale.atomic import atomic_path
    from tarflow_scale.sampling import save_grid

    out.mkdir(parents=True, exist_ok=True)
    array = images.permute(0, 2, 3, 1).numpy()  # (N, H, W, C) uint8
    for k, image in enumerate(array):
        with atomic_path(out / f"{k:06d}.png") as tmp:
            Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(tmp, format="PNG")
    save_grid(images, out / "grid.png")
    labels_array = np.asarray(labels.numpy() if labels is not None else np.full(len(array), -1), dtype=np.int64)
    with atomic_path(out / "samples.npz", suffix=".npz") as tmp:  # np.savez appends .npz unless present
        np.savez(tmp, images=array, labels=labels_array, settings=json.dumps(settings))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:  # bad values fail here, naming the flag, before the model is loaded
        args.guidance = settings_from_args(args, Guidance, "guidance")
        args.decoding = settings_from_args(args, Decoding, "decoding")
    except SettingError as e:
        print(f"tarflow-sample: {e.at(FLAG_NAMES)}", file=sys.stderr)
        return 2
    unused = [f"--{name.replace('_', '-')}" for name in SHARD_FLAGS if getattr(args, name) is not None]
    if args.format != "shards" and unused:
        print(f"tarflow-sample: {', '.join(unused)} apply to --format shards", file=sys.stderr)
        return 2
    import torch

    from tarflow_scale.artifacts import CheckpointError, load_model, read_provenance
    from tarflow_scale.run_lock import OutputDirError, prepare_output_dir
    from tarflow_scale.sampling import resolve_labels, sample_images

    checkpoint = Path(args.checkpoint)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    shards = args.format == "shards"
    if shards:  # the driver only hands the weights to the workers, whose device is decided with the cluster
        device = "cpu"
    if args.num < 1:
        print("tarflow-sample: --num must be >= 1", file=sys.stderr)
        return 2
    try:
        trained_with = read_provenance(checkpoint).noise
        model = load_model(checkpoint, device)
    except CheckpointError as e:
        print(f"tarflow-sample: {e}", file=sys.stderr)
        return 2
    try:
        args.decoding.check(model, None if shards else torch.device(device).type, key=FLAG_NAMES)
    except SettingError as e:
        print(f"tarflow-sample: {e}", file=sys.stderr)
        return 2
    num_classes = model.config.num_classes
    labels = None
    if args.classes:
        labels = [args.classes[k % len(args.classes)] for k in range(args.num)]
    elif args.balanced:
        labels = "balanced"
    if (args.classes or args.balanced) and not num_classes:
        print("tarflow-sample: --class/--balanced given, but the model is unconditional", file=sys.stderr)
        return 2
    if args.guidance.active and num_classes and labels is None:
        print(
            f"tarflow-sample: --guidance {args.guidance.weight} on a class-conditional model ({num_classes} classes) "
            "needs labels: pass --class C [C ...] (sample k gets C[k mod len]) or --balanced "
            f"(class k mod {num_classes})",
            file=sys.stderr,
        )
        return 2
    noise_std = trained_with.noise_std if trained_with.noise == "gaussian" else None
    denoise = bool(noise_std) and not args.no_denoise
    try:
        y = resolve_labels(labels, args.num, num_classes)
    except ValueError as e:
        print(f"tarflow-sample: {e}", file=sys.stderr)
        return 2
    if shards:
        return sample_shards(args, checkpoint, model, noise_std if denoise else 0.0)
    out = Path(args.out) if args.out else default_out_dir(checkpoint)
    try:  # before any sample is drawn: a file in the way, a read-only or full disk
        prepare_output_dir(out, f"--out {out}")
    except OutputDirError as e:
        print(f"tarflow-sample: {e}", file=sys.stderr)
        return 2
    start = time.time()
    state = {"last": start}

    def progress(done: int, total: int) -> None:
        now = time.time()
        if total > args.batch_size and (now - state["last"] >= 5 or done == total):
            rate = done / max(now - start, 1e-9)
            eta = (total - done) / rate if rate > 0 else 0.0
            print(f"sampled {done}/{total} | {rate:.2f} images/s | eta {eta:.0f}s", flush=True)
            state["last"] = now

    images = sample_images(
        model,
        args.num,
        labels=y,
        guidance=args.guidance,
        decoding=args.decoding,
        denoise=denoise,
        noise_std=noise_std,
        seed=args.seed,
        batch_size=args.batch_size,
        on_batch=progress,
    )
    settings = {
        "checkpoint": str(checkpoint),
        "num": args.num,
        "seed": args.seed,
        "guidance": dataclasses.asdict(args.guidance),
        "decoding": dataclasses.asdict(args.decoding),
        "denoised": denoise,
        "denoise_noise_std": noise_std if denoise else 0.0,
        "labels": None if y is None else y.tolist(),
    }
    write_outputs(out, images, y, settings)
    took = time.time() - start
    what = f"denoised with the training noise std {noise_std:g}" if denoise else "not denoised"
    print(f"wrote {args.num} samples ({what}) in {took:.1f}s: {out}/000000.png ..., {out}/grid.png, {out}/samples.npz")
    return 0


def sample_shards(args: argparse.Namespace, checkpoint: Path, model, denoise_std: float) -> int:
    """--format shards: the sampling settings assembled, the output folder locked, the Ray workers run."""
    from tarflow_scale.atomic import is_storage_error, storage_error_line
    from tarflow_scale.config import ConfigError
    from tarflow_scale.data import DataError
    from tarflow_scale.evaluation.generate import NonFiniteSamplesError
    from tarflow_scale.evaluation.shard_sampling import ShardSampling, sample_to_shards
    from tarflow_scale.run_lock import lock_output_dir

    out = Path(args.out) if args.out else default_out_dir(checkpoint, "sampled_shards")
    labels = tuple(args.classes) if args.classes else "balanced" if args.balanced else None
    spec = ShardSampling(
        num=args.num, seed=args.seed, labels=labels, guidance=args.guidance, decoding=args.decoding,
        denoise_noise_std=denoise_std, shard_size=args.shard_size or DEFAULT_SHARD_SIZE,
    )  # fmt: skip
    # How each recorded setting is given here, for the error of a re-run with other settings.
    names = {f"{prefix}.{name}": flag for name, flag in FLAG_NAMES.items() for prefix in ("guidance", "decoding")}
    names |= {"num": "--num", "seed": "--seed", "labels": "--class/--balanced", "shard_size": "--shard-size",
              "denoise_noise_std": "the denoising noise std (--no-denoise, or the checkpoint's training noise)",
              "model": f"CHECKPOINT {checkpoint}", "out": f"--out {out}"}  # fmt: skip
    use_gpu = None if args.device is None else args.device.startswith("cuda")
    try:
        with lock_output_dir(out, f"--out {out}"):  # one sampler per folder
            report = sample_to_shards(
                model, out, spec, source=str(checkpoint), num_workers=args.workers or 1, address=args.address,
                use_gpu=use_gpu, cpus_per_worker=args.cpus_per_worker or 1, batch_size=args.batch_size, names=names,
                verbose=args.verbose,
            )  # fmt: skip
    except SettingError as e:
        print(f"tarflow-sample: {e.at(FLAG_NAMES)}", file=sys.stderr)
        return 2
    except (ConfigError, DataError, NonFiniteSamplesError) as e:
        text = (
            str(e).replace("cluster.num_workers", "--workers").replace("cluster.cpus_per_worker", "--cpus-per-worker")
        )
        print(f"tarflow-sample: {text}", file=sys.stderr)
        return 2
    except OSError as e:
        if not is_storage_error(e):
            raise
        print(
            f"tarflow-sample: {storage_error_line(e)} (complete shards are kept; re-run to continue)", file=sys.stderr
        )
        return 2
    except KeyboardInterrupt:
        print(f"tarflow-sample: interrupted; the complete shards are kept in {out}: re-run the same command to "
              "continue", file=sys.stderr)  # fmt: skip
        return 130
    where = f"{report.num_samples} samples: {out}/{report.pattern}, manifest {report.manifest}"
    if not report.images_sampled:
        print(f"nothing to draw: all {report.num_shards} shards were already complete. {where}")
        return 0
    rate = f"{report.images_per_s:.2f} images/s, {report.images_per_s / report.num_workers:.2f} per worker"
    reused = f", {report.shards_reused} were already complete" if report.shards_reused else ""
    print(
        f"wrote {report.images_sampled} samples in {report.num_shards - report.shards_reused} shards "
        f"({report.num_workers} workers{reused}) in {report.seconds:.1f}s: {rate}; {report.redrawn} non-finite "
        f"samples redrawn. {where}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
