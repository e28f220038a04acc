"""`tarflow-data`: convert ImageNet64 .npz batches or image folders to shards, build the bundled set, verify."""

from __future__ import annotations

import argparse
import glob
import os
import sys

from tarflow_scale.atomic import is_storage_error, storage_error_line
from tarflow_scale.cli.common import int_at_least
from tarflow_scale.data import DataError, FolderSource, NpzSource, build_bundled, read_manifest, verify, write_split
from tarflow_scale.data.shards import DEFAULT_SAMPLES_PER_SHARD


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder for the shards and <split>.json")
    p.add_argument("--split", required=True, help="split name, e.g. train or val")
    p.add_argument("--name", default=None, help="shard name prefix (default: imagenet64 / the folder's name)")
    p.add_argument(
        "--samples-per-shard",
        type=int_at_least(1),
        default=DEFAULT_SAMPLES_PER_SHARD,
        help=f"images per .tar shard (default {DEFAULT_SAMPLES_PER_SHARD})",
    )
    p.add_argument("--size", type=int_at_least(1), default=64, help="image side, pixels")
    p.add_argument("--procs", type=int_at_least(1), default=os.cpu_count() or 1, help="encoding processes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in batch logs)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tarflow-data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert-npz", help="official downsampled-ImageNet .npz batches -> shards")
    p.add_argument("src", nargs="+", help="train_data_batch_1.npz ... or val_data.npz")
    p.add_argument("--num-classes", type=int_at_least(1), default=1000, help="classes in the labels (default 1000)")
    _common(p)

    p = sub.add_parser("convert-folder", help="an image folder (one subfolder per class) -> shards")
    p.add_argument("src", help="folder holding one subfolder per class")
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave unreadable images out instead of stopping; the manifest lists them under skipped_inputs",
    )
    _common(p)

    p = sub.add_parser("bundled", help="build the bundled dataset (photo crops from scikit-image/-learn)")
    p.add_argument("--out", required=True, help="output folder for the shards and manifests")
    p.add_argument("--procs", type=int_at_least(1), default=1, help="encoding processes (default 1)")

    p = sub.add_parser(
        "verify",
        help="check shards against their manifest (checksums and sizes; --deep: every sample decoded); "
        "exit code 1 when a check fails",
    )
    p.add_argument("dir", help="dataset folder holding the shards and <split>.json manifests")
    p.add_argument("--split", default=None, help="one split (default: every <split>.json in DIR)")
    p.add_argument(
        "--deep",
        action="store_true",
        help="also decode every sample as the loaders do: an exact 8-bit PNG (no 16-bit, no alpha) of the "
        "manifest's size and channels, a label in [0, num_classes), and each shard's sample count",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "convert-npz":
            source = NpzSource(args.src, image_size=args.size, num_classes=args.num_classes)
            name = args.name or f"imagenet{args.size}"
        elif args.command == "convert-folder":
            source = FolderSource(args.src, image_size=args.size, skip_bad=args.skip_bad)
            name = args.name or os.path.basename(os.path.normpath(args.src))
        elif args.command == "bundled":
            for split, m in build_bundled(args.out, num_procs=args.procs, progress=True).items():
                print(f"{args.out}: {split} {m.num_samples} samples in {len(m.shards)} shards, {m.num_classes} classes")
            return 0
        else:
            return _verify(args.dir, args.split, args.deep)
        m = write_split(
            args.out,
            source,
            name=name,
            split=args.split,
            samples_per_shard=args.samples_per_shard,
            num_procs=args.procs,
            progress=not args.no_progress,
        )
        print(f"{args.out}: {m.split} {m.num_samples} samples in {m.pattern}, manifest {m.split}.json")
        for line in m.skipped_inputs:
            print(f"skipped: {line}", file=sys.stderr)
        return 0
    except DataError as e:
        print(f"tarflow-data: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk, a read-only or misplaced --out: one line naming the path
        if not is_storage_error(e):
            raise
        print(f"tarflow-data: error: {storage_error_line(e)}", file=sys.stderr)
        return 1


def _verify(root: str, split: str | None, deep: bool) -> int:
    splits = [split] if split else sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(root, "*.json")))
    if not splits:
        print(f"tarflow-data: error: {root}: no <split>.json manifest", file=sys.stderr)
        return 1
    failed = False
    for s in splits:
        manifest = read_manifest(root, s)
        problems = verify(root, manifest, deep=deep)
        for problem in problems:
            print(f"FAIL {problem}")
        checked = "every sample decoded" if deep else "checksums and sizes"
        print(
            f"{'FAIL' if problems else 'ok'}   {s}: {manifest.num_samples} samples, {len(manifest.shards)} shards "
            f"({checked})"
        )
        failed |= bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
