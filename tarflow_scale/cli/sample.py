"""`tarflow-sample`: draw images from an export or checkpoint; one PNG per sample, a grid and an npz."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tarflow_scale.cli.common import int_at_least


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
    parser.add_argument(
        "--guidance",
        type=float,
        default=0.0,
        help="guidance weight w (params p_c + w (p_c - p_u)); needs --class/--balanced on a conditional model; "
        "an unconditional model guides by attention temperature (--attn-temp). Default 0: no guidance",
    )
    parser.add_argument("--annealed", action="store_true", help="anneal guidance linearly over each block's tokens")
    parser.add_argument(
        "--attn-temp", type=float, default=1.0, help="attention temperature of the guiding pass (default 1.0)"
    )
    parser.add_argument(
        "--no-denoise",
        action="store_true",
        help="skip the Tweedie denoising step (by default applied when the model was trained with Gaussian noise, "
        "with the noise std recorded in the checkpoint)",
    )
    parser.add_argument(
        "--decoding",
        choices=["sequential", "jacobi", "gs_jacobi"],
        default="sequential",
        help="how each flow block is inverted: token by token (default), or parallel Jacobi iterations that "
        "reach the same images up to --tol (docs/sampling.md)",
    )
    parser.add_argument("--tol", type=float, default=1e-4, help="jacobi/gs_jacobi stopping tolerance (default 1e-4)")
    parser.add_argument("--segment-size", type=int, default=64, help="gs_jacobi: tokens per segment (default 64)")
    parser.add_argument(
        "--sequential-blocks",
        type=int,
        nargs="+",
        default=[],
        metavar="K",
        help="block indices (model.blocks order; the last is inverted first) decoded sequentially whatever "
        "--decoding says: the blocks whose Jacobi iterations converge slowly (docs/sampling.md)",
    )
    parser.add_argument(
        "--precision",
        choices=["fp32", "bf16", "tf32"],
        default="fp32",
        help="the Transformer's matmuls and KV cache (the flow state stays fp32); default fp32",
    )
    parser.add_argument(
        "--cuda-graph",
        action="store_true",
        help="sequential decoding on a GPU: capture each block's per-token step once as a CUDA graph and replay it "
        "(one launch per token; affine, shift and spline models)",
    )
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    parser.add_argument("--batch-size", type=int_at_least(1), default=32, help="samples drawn at once (default 32)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--out", default=None, help="output folder (default: a 'sampled' folder beside CHECKPOINT)")
    return parser.parse_args(argv)


def default_out_dir(checkpoint: Path) -> Path:
    base = checkpoint if checkpoint.is_dir() else checkpoint.parent
    return base / "sampled"


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
    import torch

    from tarflow_scale.checkpoint import CheckpointError, read_training_config
    from tarflow_scale.models.decoding import Decoding
    from tarflow_scale.run_lock import OutputDirError, prepare_output_dir
    from tarflow_scale.sampling import resolve_labels, sample_images

    checkpoint = Path(args.checkpoint)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.num < 1:
        print("tarflow-sample: --num must be >= 1", file=sys.stderr)
        return 2
    if args.cuda_graph and not device.startswith("cuda"):
        print(f"tarflow-sample: --cuda-graph needs a CUDA device (--device is {device})", file=sys.stderr)
        return 2
    if args.cuda_graph and args.decoding != "sequential":
        print("tarflow-sample: --cuda-graph applies to --decoding sequential", file=sys.stderr)
        return 2
    try:
        run_config = read_training_config(checkpoint)
        from tarflow_scale.checkpoint import load_model

        model = load_model(checkpoint, device)
    except CheckpointError as e:
        print(f"tarflow-sample: {e}", file=sys.stderr)
        return 2
    num_classes = model.config.num_classes
    labels = None
    if args.classes:
        labels = [args.classes[k % len(args.classes)] for k in range(args.num)]
    elif args.balanced:
        labels = "balanced"
    try:
        decoding = Decoding(
            mode=args.decoding, tol=args.tol, segment_size=args.segment_size,
            sequential_blocks=tuple(args.sequential_blocks), cuda_graph=args.cuda_graph,
        )  # fmt: skip
    except ValueError as e:
        print(f"tarflow-sample: {e}", file=sys.stderr)
        return 2
    bad = [k for k in decoding.sequential_blocks if not 0 <= k < model.config.num_blocks]
    if bad:
        print(f"tarflow-sample: --sequential-blocks {bad} out of range: the model has "
              f"{model.config.num_blocks} blocks (0..{model.config.num_blocks - 1})", file=sys.stderr)  # fmt: skip
        return 2
    if args.cuda_graph and not model.blocks[0].transform.closed_form_inverse:
        print(
            f"tarflow-sample: --cuda-graph needs a closed-form token inverse; this model's {model.config.transform} "
            "transform inverts by iteration",
            file=sys.stderr,
        )
        return 2
    if (args.classes or args.balanced) and not num_classes:
        print("tarflow-sample: --class/--balanced given, but the model is unconditional", file=sys.stderr)
        return 2
    if args.guidance and num_classes and labels is None:
        print(
            f"tarflow-sample: --guidance {args.guidance} on a class-conditional model ({num_classes} classes) needs "
            f"labels: pass --class C [C ...] (sample k gets C[k mod len]) or --balanced (class k mod {num_classes})",
            file=sys.stderr,
        )
        return 2
    noise_std = None
    if run_config is not None and run_config.data.noise == "gaussian":
        noise_std = run_config.data.noise_std
    denoise = bool(noise_std) and not args.no_denoise
    try:
        y = resolve_labels(labels, args.num, num_classes)
    except ValueError as e:
        print(f"tarflow-sample: {e}", file=sys.stderr)
        return 2
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
        guidance_annealed=args.annealed,
        attn_temp=args.attn_temp,
        denoise=denoise,
        noise_std=noise_std,
        seed=args.seed,
        batch_size=args.batch_size,
        on_batch=progress,
        decoding=decoding,
        precision=args.precision,
    )
    settings = {
        "checkpoint": str(checkpoint),
        "num": args.num,
        "seed": args.seed,
        "guidance": args.guidance,
        "guidance_annealed": args.annealed,
        "attn_temp": args.attn_temp,
        "decoding": args.decoding,
        "decoding_tol": args.tol if args.decoding != "sequential" else None,
        "decoding_segment_size": args.segment_size if args.decoding == "gs_jacobi" else None,
        "decoding_sequential_blocks": list(args.sequential_blocks),
        "precision": args.precision,
        "cuda_graph": args.cuda_graph,
        "denoised": denoise,
        "denoise_noise_std": noise_std if denoise else 0.0,
        "labels": None if y is None else y.tolist(),
    }
    write_outputs(out, images, y, settings)
    took = time.time() - start
    what = f"denoised with the training noise std {noise_std:g}" if denoise else "not denoised"
    print(f"wrote {args.num} samples ({what}) in {took:.1f}s: {out}/000000.png ..., {out}/grid.png, {out}/samples.npz")
    return 0


if __name__ == "__main__":
    sys.exit(main())
