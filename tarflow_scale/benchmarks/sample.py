"""`tarflow-bench sample`: decoding modes (sequential, jacobi, gs_jacobi) x guidance off/on x batch size —
images/s, model passes per block, speed-up over sequential, and how far each mode's images are from sequential's.

The iteration counts of the parallel modes depend on the weights (a zero-initialised model is the identity and
converges in one pass), so the model is your trained one (`--model model.safetensors`, an export, an imported
reference checkpoint or a model directory: the figures that decide the decoding settings for it), or one briefly
trained in this process on the bundled data (`--train-steps`), or one with random output heads (`--train-steps 0`).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

from tarflow_scale.benchmarks.common import add_device_option, fastest_call, load_suite_config, perturb_heads
from tarflow_scale.config import Decoding, Guidance
from tarflow_scale.models.decoding import DecodingStats
from tarflow_scale.models.tarflow import TarFlow
from tarflow_scale.sampling import per_sample_noise, to_uint8


def train_briefly(
    model: TarFlow, data_cfg, steps: int, batch: int, lr: float, seed: int = 0, max_images: int = 1024
) -> list[float]:
    """`steps` Adam steps of maximum likelihood on the bundled training images (Gaussian noise data.noise_std), in
    this process on the model's device: enough for the weights, hence the Jacobi iteration counts, to look like a
    trained model's."""
    from tarflow_scale.data import augment, make_eval_loader

    batches = []
    for x, _, _ in make_eval_loader(data_cfg, 64, 0, 1, split=data_cfg.train_split):
        batches.append(x)
        if len(batches) * 64 >= max_images:
            break
    device = next(model.parameters()).device
    images = torch.cat(batches)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    model.train()
    for _ in range(steps):
        rows = torch.randint(0, len(images), (batch,), generator=generator)
        x = augment(images[rows], data_cfg.noise, data_cfg.noise_std, generator).to(device)  # uint8 -> [-1, 1] + noise
        loss = model.bits_per_dim(x).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def time_sampling(model, z, y, guidance, decoding, repeats, device) -> tuple[float, torch.Tensor, DecodingStats]:
    """Fastest of `repeats` calls after a warm-up (the minimum is least disturbed by other load)."""
    stats = DecodingStats()
    images = model.inverse(z, y, guidance, decoding, stats=stats)
    return fastest_call(lambda: model.inverse(z, y, guidance, decoding), device, repeats), images, stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tarflow-bench sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a trained model to measure (export .safetensors, model "
                   "directory, checkpoint or run directory); its own config is used and --config / --train-steps "
                   "are ignored")  # fmt: skip
    p.add_argument("--config", default=None, help="recipe or YAML (default: the built-in tiny quickstart model)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.channels=256")
    p.add_argument("--batches", default="1,64", help="comma-separated batch sizes")
    p.add_argument("--modes", default="jacobi,gs_jacobi,gs_jacobi_seq",
                   help="parallel modes compared with sequential (always run); 'sequential': only it")  # fmt: skip
    p.add_argument("--tol", type=float, default=1e-4, help="Jacobi stopping tolerance (max change)")
    p.add_argument("--segment-size", type=int, default=16, help="gs_jacobi: tokens per segment")
    p.add_argument("--sequential-blocks", default="", help="gs_jacobi_seq: block indices decoded sequentially "
                   "(default: the block decoded first, num_blocks - 1)")  # fmt: skip
    p.add_argument("--train-steps", type=int, default=200, help="in-process training steps; 0: random heads")
    p.add_argument("--head-std", type=float, default=0.02, help="--train-steps 0: output-head weight std")
    p.add_argument("--repeats", type=int, default=2, help="timed calls per setting; the fastest counts")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "tf32"], help="sampling precision")
    p.add_argument("--compile", action="store_true", help="also time the compiled static-shape sequential step")
    p.add_argument("--cuda-graph", action="store_true", help="also time the sequential step replayed as a CUDA graph")
    add_device_option(p)
    args = p.parse_args(argv)
    config = load_suite_config(p.prog, args.config, args.overrides)
    if config is None:
        return 2
    device = torch.device(args.device)
    if args.cuda_graph and device.type != "cuda":
        print(f"error: --cuda-graph needs a CUDA device (--device is {device})", file=sys.stderr)
        return 2
    if args.model and (args.config or args.overrides):
        print("error: --model carries its own model config: drop --config and the overrides", file=sys.stderr)
        return 2
    if args.model:
        from tarflow_scale.artifacts import CheckpointError, load_model

        try:
            model = load_model(args.model)
        except (CheckpointError, OSError) as e:
            print(f"error: --model: {e}", file=sys.stderr)
            return 2
        c = model.config
    else:
        c = config.model
        torch.manual_seed(0)
        model = TarFlow(c)
    model = model.to(device)  # before the in-process training below: it runs on the device being measured
    print(f"# tarflow-bench sample: {platform.node()} {device} torch {torch.__version__} "
          f"threads={torch.get_num_threads()} precision={args.precision}")  # fmt: skip
    print(f"# model: {c.image_size}px patch {c.patch_size} -> T={c.num_tokens} tokens, {c.num_blocks} blocks x "
          f"{c.layers_per_block} layers, {c.channels} channels, {c.transform}, classes={c.num_classes}")  # fmt: skip
    if args.model:
        print(f"# trained weights: {args.model}")
    elif args.train_steps > 0:
        from tarflow_scale.data import resolve_data_path

        config.data.path = resolve_data_path(config.data)
        start = time.perf_counter()
        losses = train_briefly(model, config.data, args.train_steps, 16, config.optim.lr)
        print(f"# trained {args.train_steps} steps in-process (batch 16, 1024 bundled images): bits/dim "
              f"{losses[0]:.3f} -> "
              f"{sum(losses[-20:]) / len(losses[-20:]):.3f} in {time.perf_counter() - start:.0f} s")  # fmt: skip
    else:
        perturb_heads(model, args.head_std)
        print(f"# untrained: random output heads, weight std {args.head_std}")
    model = model.to(device).eval()

    seq_blocks = tuple(int(k) for k in args.sequential_blocks.split(",") if k) or (c.num_blocks - 1,)
    precision = args.precision
    modes = {
        "jacobi": Decoding("jacobi", tol=args.tol, precision=precision),
        "gs_jacobi": Decoding("gs_jacobi", tol=args.tol, segment_size=args.segment_size, precision=precision),
        "gs_jacobi_seq": Decoding(
            "gs_jacobi", tol=args.tol, segment_size=args.segment_size, sequential_blocks=seq_blocks, precision=precision
        ),
    }
    chosen = [m for m in args.modes.split(",") if m and m != "sequential"]  # sequential: always the baseline
    unknown = [m for m in chosen if m not in modes]
    if unknown:
        print(f"error: --modes {unknown} not in {list(modes)}", file=sys.stderr)
        return 2
    print(f"# tol={args.tol} segment_size={args.segment_size} gs_jacobi_seq sequential_blocks={list(seq_blocks)}; "
          "passes/block listed in sampling order (block num_blocks-1 first)")  # fmt: skip
    if device.type == "cpu":
        print("# CPU timings depend on the machine's other load: compare rows of one run, not across runs")
    print(
        "| guidance | batch | mode | images/s | speed-up | passes per block | pass ratio | max abs diff "
        "| 8-bit pixels differing |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    shape = (c.in_channels, c.image_size, c.image_size)
    notes: list[str] = []
    for guided in (False, True):
        if c.num_classes:
            guidance = Guidance(weight=1.5 if guided else 0.0)
            label = "w=1.5 (class)" if guided else "off"
        else:
            guidance = Guidance(weight=1.0 if guided else 0.0, attn_temp=1.5)
            label = "w=1, attn_temp 1.5" if guided else "off"
        for batch in [int(b) for b in args.batches.split(",")]:
            z = model.prior.scale(per_sample_noise(range(batch), shape, 0, device, next(model.parameters()).dtype))
            y = (torch.arange(batch, device=device) % c.num_classes) if c.num_classes else None
            runs = {"sequential": Decoding(precision=precision)}
            if args.compile:
                runs["sequential+compile"] = Decoding(compile=True, precision=precision)
            if args.cuda_graph:
                runs["sequential+cuda_graph"] = Decoding(cuda_graph=True, precision=precision)
            runs.update({m: modes[m] for m in chosen})
            base_s, base_images = None, None
            for name, decoding in runs.items():
                seconds, images, stats = time_sampling(model, z, y, guidance, decoding, args.repeats, device)
                if base_s is None:
                    base_s, base_images = seconds, images
                passes = [stats.passes[k] for k in sorted(stats.passes, reverse=True)]
                # Sequential passes / this mode's: the speed-up where a pass costs the same whatever its length
                # (launch- or memory-bound: small batches on a GPU); load-independent, unlike images/s here.
                ratio = c.num_blocks * (c.num_tokens - 1) / sum(passes)
                diff = float((images - base_images).abs().max())
                flipped = float((to_uint8(images) != to_uint8(base_images)).float().mean())
                print(f"| {label} | {batch} | {name} | {batch / seconds:.2f} | {base_s / seconds:.2f}x | {passes} | "
                      f"{ratio:.1f}x | {diff:.1e} | {flipped:.1e} |", flush=True)  # fmt: skip
            if args.precision != "fp32":  # what the reduced precision itself moves, for scale
                exact = model.inverse(z, y, guidance, Decoding())
                notes.append(
                    f"# {label}, batch {batch}: {args.precision} sequential vs fp32 sequential: max abs diff "
                    f"{float((base_images - exact).abs().max()):.1e}, 8-bit pixels differing "
                    f"{float((to_uint8(base_images) != to_uint8(exact)).float().mean()):.1e}"
                )
    for note in notes:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
