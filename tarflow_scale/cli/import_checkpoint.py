"""`tarflow-import`: convert a checkpoint of another TarFlow implementation into a tarflow_scale export.

    tarflow-import ml-tarflow CKPT.pth OUT.safetensors [key=value ...]
    tarflow-import ml-tarflow CKPT.pth OUT_DIR/ [key=value ...]      (a model directory with a model card)

The config is inferred from the tensor shapes and the reference file name
(`<dataset>_model_<patch>_<channels>_<blocks>_<layers>_<noise std|uniform>.pth`); dotted overrides supply what
neither tells: model.in_channels (default 3), data.noise_std / data.noise=uniform for a renamed file, data.path for
the dataset tarflow-eval should score bits/dim and FID on.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

FORMATS = ("ml-tarflow",)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tarflow-import", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("format", choices=FORMATS, help="the source implementation (apple/ml-tarflow)")
    parser.add_argument("checkpoint", help="the reference state_dict (.pth)")
    parser.add_argument("out", help="OUT.safetensors (an export), or a folder for a model directory")
    parser.add_argument("overrides", nargs="*", help="dotted keys, e.g. data.path=/data/imagenet64 data.noise_std=0.05")
    args = parser.parse_intermixed_args(argv)

    from tarflow_scale.artifacts import CheckpointError, export_model_dir, read_provenance
    from tarflow_scale.config import ConfigError
    from tarflow_scale.interop.ml_tarflow import import_checkpoint

    out = Path(args.out)
    try:
        if out.suffix == ".safetensors":
            path = import_checkpoint(args.checkpoint, out, args.overrides)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                exported = import_checkpoint(args.checkpoint, Path(tmp) / "model.safetensors", args.overrides)
                path = export_model_dir(exported, out)
    except (CheckpointError, ConfigError) as e:
        print(f"tarflow-import: error: {e}", file=sys.stderr)
        return 2
    info = read_provenance(path)
    m, noise = info.model_config, info.noise
    print(
        f"wrote {path}: {m.in_channels}x{m.image_size}x{m.image_size}, patch {m.patch_size}, width {m.channels}, "
        f"{m.num_blocks} blocks x {m.layers_per_block} layers, {m.num_classes or 'no'} classes, prior {m.prior}; "
        f"training noise {noise.noise} (sigma {noise.noise_std})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
