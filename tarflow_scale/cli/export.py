"""`tarflow-export`: consolidate a training checkpoint (any ZeRO stage) into one self-contained safetensors file,
or (--format dir) into a model directory with a model card."""

from __future__ import annotations

import argparse
import sys

from tarflow_scale.artifacts import CheckpointError, export_checkpoint, export_model_dir
from tarflow_scale.artifacts.weights import MAX_ABS_WEIGHT
from tarflow_scale.atomic import is_storage_error, storage_error_line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tarflow-export",
        description="Consolidate a DeepSpeed ZeRO checkpoint folder (or a run directory: its newest checkpoint) "
        "into OUT.safetensors with the model config embedded in its metadata (and OUT.json beside it). "
        "The checkpoint's checksums are verified and its files read without unpickling (no code in them runs); "
        f"weights that are not finite or beyond |w| <= {MAX_ABS_WEIGHT:g} are refused. "
        "The result loads with tarflow_scale.load_model, without DeepSpeed or Ray.",
    )
    parser.add_argument("checkpoint", help="checkpoint_* folder written by tarflow-train, or its run directory")
    parser.add_argument("out", help="output .safetensors path (--format file) or folder (--format dir)")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights instead of the raw ones")
    parser.add_argument(
        "--format",
        choices=("file", "dir"),
        default="file",
        help="file: one .safetensors; dir: a model directory (config.json, model.safetensors, README.md model card) "
        "that PretrainedTarFlow.from_pretrained loads and push_to_hub uploads",
    )
    parser.add_argument(
        "--metrics",
        help="an evaluation's metrics.json for the model card (default: eval/metrics.json beside the input)",
    )
    args = parser.parse_args(argv)
    try:
        if args.format == "dir":
            path = export_model_dir(args.checkpoint, args.out, use_ema=args.ema, metrics_path=args.metrics)
        else:
            path = export_checkpoint(args.checkpoint, args.out, use_ema=args.ema)
    except CheckpointError as e:
        print(f"tarflow-export: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # OUT on a full or read-only disk, or a file where a folder should be
        if not is_storage_error(e):
            raise
        print(f"tarflow-export: {storage_error_line(e)}", file=sys.stderr)
        return 2
    if args.format == "dir":
        print(f"wrote {path}/ (config.json, model.safetensors, README.md)")
    else:
        print(f"wrote {path} (config: {path.with_suffix('.json')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
