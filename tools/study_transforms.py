"""Which per-token transform buys the most held-out likelihood for the same CPU wall-clock budget?

Trains five TarFlows on the bundled real dataset, one after another, each for the same wall-clock budget:

    affine        transform=affine,  num_blocks=N
    spline K=4    transform=spline,  num_bins=4,        num_blocks=N
    spline K=8    transform=spline,  num_bins=8,        num_blocks=N
    mixture K=4   transform=mixture, num_components=4,  num_blocks=N
    affine 2N     transform=affine,  num_blocks=2N      (the "spend it on depth instead" baseline)

Everything else (width, layers per block, patching, data, optimizer) is the same for all five. For each it
reports held-out bits/dim over the full val split, the parameter count, training images/s over the budget and
sampling images/s, as JSON and as a markdown table.

Deliberately single process: no Ray, no DeepSpeed. The question is how the transforms compare, not how the
infrastructure scales, and on a small shared CPU the launch overhead would eat a noticeable share of a
two-minute budget. The loop is the training loop of `tarflow_scale.training.trainer` reduced to its maths: AdamW
with the trainer's weight-decay groups, linear warmup, gradient clipping, loss -log p(x) / D.

Choices that make the numbers comparable:
  * Images are area-downsampled by the loader to --image-size (default 16: data.image_size = model.image_size
    = 16, patch 2 -> 64 tokens of 12 values), so a CPU budget of minutes trains something; bpd at 16x16 is not
    comparable with 64x64 numbers.
  * The train split is decoded once into memory before any clock starts, and every model sees the same batch
    sequence (same shuffling, flips and noise seeds): the loader's PNG decoding would otherwise compete with
    training for the two cores and blur the images/s. Per model, more images seen is the point of a faster
    transform, so the batch sequence is only a shared prefix.
  * Uniform dequantization noise (data.noise=uniform) in training and evaluation, so held-out bits/dim are the
    standard upper bound on the discrete 8-bit NLL: bpd = (-log p(x) - D log(2/256)) / (D ln 2).
  * Held-out bpd: every val image once, one dequantization draw seeded by (--seed, image key) — the same noise
    for every model — mean +- standard error over images (the error bar covers the images, not training noise).
    Because the images and the noise are shared, the table also gives each model's paired difference from the
    first model (per-image difference, mean +- standard error): far tighter than either error bar alone.
  * The learning rate warms up linearly over optim.warmup_steps steps, then follows a cosine to optim.min_lr
    over the rest of the *time* budget, so every model, fast or slow, ends its budget fully decayed.
  * Training images/s = images trained on / seconds of training (the budget, plus at most one step over).
    Sampling images/s = --sample-batch-size images sampled at once (seeded per index), after a warm-up draw;
    the best of --sample-repeats timings, the figure least disturbed by other jobs on the machine.
  * torch threads default to 1 (--threads): with other jobs on the machine, one thread per model is the
    least noisy setting; all timings are still on a shared CPU, so read small differences as noise. The
    "CPU share" column (process CPU seconds / wall seconds while training) and the 1-minute load average before
    and after each model say how much the other jobs took.

Example (about 8 minutes: 5 x 90 s of training plus evaluation and sampling):

    python tools/study_transforms.py --budget-s 90 --out runs/study_transforms
    python tools/study_transforms.py --budget-s 30 --variants affine spline4 model.channels=32
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tarflow_scale.config import ConfigError, RunConfig, load_config, to_dict
from tarflow_scale.data import augment, make_eval_loader
from tarflow_scale.evaluation.bpd import batch_bits_per_dim, summarize
from tarflow_scale.models.likelihood import LOG_2, LOG_BIN_WIDTH_8BIT
from tarflow_scale.models.tarflow import TarFlow
from tarflow_scale.sampling import sample_indices
from tarflow_scale.seeding import derive_seed
from tarflow_scale.training.metrics import format_duration
from tarflow_scale.training.trainer import param_groups


@dataclasses.dataclass(frozen=True)
class Variant:
    """One model of the study: a name, and the model fields it sets on top of the shared config."""

    key: str  # for --variants
    name: str  # for the table
    model: dict[str, Any]


def study_variants(num_blocks: int) -> list[Variant]:
    """The five models of the study, at N = num_blocks."""
    return [
        Variant("affine", "affine", {"transform": "affine", "num_blocks": num_blocks}),
        Variant("spline4", "spline K=4", {"transform": "spline", "num_bins": 4, "num_blocks": num_blocks}),
        Variant("spline8", "spline K=8", {"transform": "spline", "num_bins": 8, "num_blocks": num_blocks}),
        Variant("mixture4", "mixture K=4", {"transform": "mixture", "num_components": 4, "num_blocks": num_blocks}),
        Variant("affine2x", f"affine {2 * num_blocks} blocks", {"transform": "affine", "num_blocks": 2 * num_blocks}),
    ]


# The study's defaults, applied before the command line's dotted overrides (which may change any of them except
# the fields the variants set).
STUDY_DEFAULTS = [
    "model.patch_size=2",
    "model.channels=64",
    "model.num_blocks=4",
    "model.layers_per_block=2",
    "model.head_dim=32",
    "model.num_classes=0",  # unconditional: bits/dim of p(x), not p(x | class)
    "data.noise=uniform",
    "data.num_workers=0",  # the splits are read once, in this process
]
VARIANT_FIELDS = ("transform", "num_bins", "num_components")


@dataclasses.dataclass
class StudySettings:
    """How each model is trained, scored and timed (the model, data and optimizer come from a RunConfig)."""

    budget_s: float  # training wall-clock seconds per model
    batch_size: int = 32  # training images per step
    eval_batch_size: int = 128
    sample_batch_size: int = 16
    sample_repeats: int = 5  # timed sampling calls after the warm-up; the fastest counts
    seed: int = 0  # init, batch order, training noise, held-out dequantization noise, sampling noise
    max_nonfinite_in_a_row: int = 5  # non-finite losses skip the step (counted); this many in a row stop training
    log_every_s: float = 15.0  # seconds between progress lines


@dataclasses.dataclass
class Split:
    """A whole split in memory: images uint8 (N, C, H, W), labels int64 (N,), sample keys."""

    images: Tensor
    labels: Tensor
    keys: list[str] = dataclasses.field(repr=False)


def load_split(config: RunConfig, split: str) -> Split:
    """Every image of `split` exactly once, downsampled to data.image_size by the loader."""
    images, labels, keys = [], [], []
    for x, y, k in make_eval_loader(config.data, 256, rank=0, world_size=1, split=split):
        images.append(x)
        labels.append(y)
        keys.extend(k)
    return Split(torch.cat(images), torch.cat(labels), keys)


class BatchStream:
    """Endless shuffled training batches from memory: epochs of a seeded permutation, seeded horizontal flips
    (data.hflip) and seeded dequantization noise. The same seed gives the same sequence to every model."""

    def __init__(self, train: Split, config: RunConfig, batch_size: int, seed: int):
        if len(train.images) < batch_size:
            raise ValueError(f"--batch-size {batch_size} is larger than the train split ({len(train.images)})")
        self.train, self.data, self.batch_size = train, config.data, batch_size
        self.conditional = config.model.num_classes > 0
        self.generator = torch.Generator().manual_seed(derive_seed(seed, "study-batches"))
        self.order, self.position = torch.empty(0, dtype=torch.int64), 0

    def next(self) -> tuple[Tensor, Tensor | None]:
        if self.position + self.batch_size > len(self.order):
            self.order, self.position = torch.randperm(len(self.train.images), generator=self.generator), 0
        index = self.order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        images = self.train.images[index]
        if self.data.hflip:
            flip = torch.rand(len(index), generator=self.generator) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        x = augment(images, self.data.noise, self.data.noise_std, self.generator)
        return x, self.train.labels[index] if self.conditional else None


def lr_factor(
    step: int, elapsed_s: float, warmup_steps: int, warmup_end_s: float | None, budget_s: float, min_ratio: float
) -> float:
    """Multiplier on the peak lr: linear over the first `warmup_steps` steps, then a cosine to `min_ratio` over
    the time left after warmup, so every model ends its budget fully decayed however fast it steps."""
    if step < warmup_steps or warmup_end_s is None:
        return (step + 1) / warmup_steps if warmup_steps else 1.0
    progress = min(1.0, (elapsed_s - warmup_end_s) / max(1e-9, budget_s - warmup_end_s))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def train_for_budget(
    model: TarFlow, stream: BatchStream, config: RunConfig, settings: StudySettings, label: str, eta_after_s: float
) -> dict[str, Any]:
    """Train `model` until settings.budget_s seconds have passed (the step under way finishes).

    Returns steps, images, seconds, training images/s, the train bpd of the last progress window and the count
    of skipped non-finite steps. `eta_after_s`: the study's estimated time after this model, for progress lines.
    """
    optim = config.optim
    optimizer = torch.optim.AdamW(
        param_groups(model, optim.weight_decay), lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay
    )
    num_dims = model.num_dims
    model.train()
    step = images = nonfinite = nonfinite_in_a_row = 0
    stopped = ""
    window_loss, window_count = 0.0, 0
    last_train_bpd = float("nan")
    warmup_end_s = None
    start = last_log = time.perf_counter()
    cpu_start = time.process_time()  # this process's CPU seconds: how much of a core the other jobs left us
    elapsed = 0.0
    while elapsed < settings.budget_s:
        factor = lr_factor(step, elapsed, optim.warmup_steps, warmup_end_s, settings.budget_s, optim.min_lr / optim.lr)
        for group in optimizer.param_groups:
            group["lr"] = optim.lr * factor
        x, y = stream.next()
        loss = -model.log_prob(x, y).mean() / num_dims  # -log p(x) / D, nats
        if not torch.isfinite(loss):
            # Counted and reported, never hidden: the step is skipped; a run of them ends this model's training.
            nonfinite += 1
            nonfinite_in_a_row += 1
            if nonfinite_in_a_row >= settings.max_nonfinite_in_a_row:
                stopped = f"{nonfinite_in_a_row} non-finite losses in a row at step {step}"
                print(f"[{label}] stopped: {stopped}", flush=True)
                break
            elapsed = time.perf_counter() - start
            continue
        nonfinite_in_a_row = 0
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        optimizer.step()
        step += 1
        images += len(x)
        window_loss += loss.item()
        window_count += 1
        now = time.perf_counter()
        elapsed = now - start
        if step == optim.warmup_steps:
            warmup_end_s = elapsed
        if now - last_log >= settings.log_every_s or elapsed >= settings.budget_s:
            last_train_bpd = (window_loss / window_count - LOG_BIN_WIDTH_8BIT) / LOG_2
            left = max(0.0, settings.budget_s - elapsed)
            print(
                f"[{label}] {elapsed:5.0f}s/{settings.budget_s:.0f}s  step {step:5d}  train {last_train_bpd:6.3f} bpd  "
                f"{images / elapsed:6.1f} img/s  lr {optim.lr * factor:.2e}  left: {format_duration(left)} this model, "
                f"~{format_duration(left + eta_after_s)} in all",
                flush=True,
            )
            window_loss, window_count, last_log = 0.0, 0, now
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    return {
        "steps": step,
        "train_images": images,
        "train_seconds": seconds,
        "train_images_per_s": images / seconds if seconds > 0 else float("nan"),
        # CPU seconds / wall seconds: ~threads on an idle machine; below that, other jobs took the difference.
        "train_cpu_share": cpu_seconds / seconds if seconds > 0 else float("nan"),
        "train_bpd_last_window": last_train_bpd,
        "nonfinite_steps": nonfinite,
        "stopped": stopped,
    }


@torch.no_grad()
def held_out_bpd(model: TarFlow, val: Split, settings: StudySettings) -> dict[str, Any]:
    """Mean +- standard error of per-image discrete bits/dim over every image of `val` (one seeded draw each)."""
    model.eval()
    conditional = model.config.num_classes > 0
    values = []
    for lo in range(0, len(val.images), settings.eval_batch_size):
        hi = lo + settings.eval_batch_size
        labels = val.labels[lo:hi] if conditional else None
        values.append(
            batch_bits_per_dim(model, val.images[lo:hi], labels, val.keys[lo:hi], kind="uniform", seed=settings.seed)
        )
    per_image = torch.cat(values).numpy()
    finite = np.isfinite(per_image)
    summary = summarize(per_image[finite]) if finite.any() else {"mean": float("nan"), "stderr": float("nan")}
    return {
        "val_bpd_per_image": per_image.tolist(),  # in val order; for paired differences between models
        "val_bpd": summary["mean"],
        "val_bpd_stderr": summary["stderr"],
        "val_images": len(per_image),
        "val_nonfinite_images": int((~finite).sum()),
    }


@torch.no_grad()
def sampling_rate(model: TarFlow, settings: StudySettings) -> dict[str, Any]:
    """Images/s of sampling settings.sample_batch_size images at once (fastest of the timed repeats), after a
    warm-up of two images; also the count of non-finite samples and of solver warnings (mixture inverse)."""
    model.eval()
    num_classes = model.config.num_classes
    batch = settings.sample_batch_size
    labels = torch.arange(batch) % num_classes if num_classes else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sample_indices(model, [0, 1], settings.seed, None if labels is None else labels[:2])  # warm-up
        times, samples = [], None
        for _ in range(max(1, settings.sample_repeats)):
            start = time.perf_counter()
            samples = sample_indices(model, list(range(batch)), settings.seed, labels)
            times.append(time.perf_counter() - start)
    nonfinite = int((~torch.isfinite(samples.flatten(1)).all(1)).sum())
    return {
        "sample_images_per_s": batch / min(times),
        "sample_seconds": min(times),
        "sample_nonfinite": nonfinite,
        "sample_warnings": len(caught),
    }


def run_study(
    config: RunConfig, variants: list[Variant], settings: StudySettings, out_dir: Path | None = None
) -> dict[str, Any]:
    """Train, score and time every variant in turn; returns (and writes, with `out_dir`) the JSON report."""
    data_start = time.perf_counter()
    train = load_split(config, config.data.train_split)
    val = load_split(config, config.data.eval_split)
    print(
        f"data: {len(train.images)} train / {len(val.images)} val images, {tuple(train.images.shape[1:])}, "
        f"loaded in {time.perf_counter() - data_start:.1f}s",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    overhead_s = 0.0  # evaluation + sampling seconds so far, for the study's ETA
    for index, variant in enumerate(variants):
        model_config = dataclasses.replace(config.model, **variant.model)
        model_config.validate()
        label = f"{index + 1}/{len(variants)} {variant.name}"
        torch.manual_seed(derive_seed(settings.seed, "init", variant.key))
        model = TarFlow(model_config)
        num_params = sum(p.numel() for p in model.parameters())
        load_before = os.getloadavg()[0]
        print(f"[{label}] {num_params / 1e6:.3f}M params, training for {settings.budget_s:.0f}s", flush=True)
        models_after = len(variants) - index - 1
        eta_after = models_after * (settings.budget_s + (overhead_s / index if index else 0.0))
        stream = BatchStream(train, config, settings.batch_size, settings.seed)
        row: dict[str, Any] = {"variant": variant.key, "name": variant.name, "model": to_dict(model_config)}
        row["num_params"] = num_params
        row |= train_for_budget(model, stream, config, settings, label, eta_after)
        start = time.perf_counter()
        row |= held_out_bpd(model, val, settings)
        row["eval_seconds"] = time.perf_counter() - start
        row |= sampling_rate(model, settings)
        overhead_s += time.perf_counter() - start
        row["load_1min"] = [load_before, os.getloadavg()[0]]
        print(
            f"[{label}] val {row['val_bpd']:.4f} +- {row['val_bpd_stderr']:.4f} bpd ({row['val_images']} images), "
            f"train {row['train_images_per_s']:.1f} img/s over {row['steps']} steps, "
            f"sampling {row['sample_images_per_s']:.2f} img/s, load {load_before:.1f} -> {row['load_1min'][1]:.1f}",
            flush=True,
        )
        rows.append(row)
    add_paired_differences(rows)
    report = {
        "settings": settings.__dict__,
        "config": to_dict(config),
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "rows": rows,
    }
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "study_transforms.json").write_text(json.dumps(report, indent=2))
        (out_dir / "study_transforms.md").write_text(format_table(rows) + "\n")
    return report


def add_paired_differences(rows: list[dict[str, Any]]) -> None:
    """Each row's held-out bpd minus the first row's, image by image: every model is scored on the same images
    with the same dequantization noise, so the paired standard error is far smaller than either model's own
    (which mostly measures how much the images differ from one another)."""
    base = np.asarray(rows[0]["val_bpd_per_image"]) if rows else None
    for row in rows:
        diff = np.asarray(row["val_bpd_per_image"]) - base
        diff = diff[np.isfinite(diff)]
        summary = summarize(diff) if len(diff) else {"mean": float("nan"), "stderr": float("nan")}
        row["val_bpd_minus_first"], row["val_bpd_minus_first_stderr"] = summary["mean"], summary["stderr"]


def format_table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of the report."""
    first = rows[0]["name"] if rows else ""
    lines = [
        f"| model | blocks | params | val bits/dim (± s.e.) | Δ vs {first} (paired s.e.) | train img/s | steps "
        "| sample img/s | CPU share | load (1 min) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for index, r in enumerate(rows):
        paired = f"{r['val_bpd_minus_first']:+.3f} ± {r['val_bpd_minus_first_stderr']:.3f}" if index else "reference"
        notes = []
        if r["nonfinite_steps"]:
            notes.append(f"{r['nonfinite_steps']} non-finite steps skipped")
        if r["stopped"]:
            notes.append(f"stopped: {r['stopped']}")
        if r["val_nonfinite_images"]:
            notes.append(f"{r['val_nonfinite_images']} non-finite val images excluded")
        if r["sample_nonfinite"] or r["sample_warnings"]:
            notes.append(f"{r['sample_nonfinite']} non-finite samples, {r['sample_warnings']} solver warnings")
        name = r["name"] + (f" ({'; '.join(notes)})" if notes else "")
        lines.append(
            f"| {name} | {r['model']['num_blocks']} | {r['num_params'] / 1e6:.3f}M | "
            f"{r['val_bpd']:.3f} ± {r['val_bpd_stderr']:.3f} | "
            f"{paired} | {r['train_images_per_s']:.1f} | {r['steps']} | "
            f"{r['sample_images_per_s']:.2f} | {r['train_cpu_share']:.2f} | "
            f"{r['load_1min'][0]:.1f} → {r['load_1min'][1]:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    first = __doc__.split("\n\n")[0]
    parser = argparse.ArgumentParser(prog="python tools/study_transforms.py", description=first)
    parser.add_argument("--budget-s", type=float, default=120.0, help="training wall-clock seconds per model")
    parser.add_argument(
        "--image-size", type=int, default=16, help="side the loader area-downsamples to (model and data)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="training images per step")
    parser.add_argument("--sample-batch-size", type=int, default=16)
    parser.add_argument("--sample-repeats", type=int, default=5, help="timed sampling calls (the fastest counts)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: least noise on a shared CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every-s", type=float, default=15.0, help="seconds between progress lines")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=None,
        metavar="NAME",
        help="subset of affine spline4 spline8 mixture4 affine2x (default: all, in that order)",
    )
    parser.add_argument("--out", default="runs/study_transforms", help="folder for study_transforms.{json,md}")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="dotted config overrides of the shared model, data and optimizer, e.g. model.channels=128 optim.lr=3e-4 "
        "(model.num_blocks is N)",
    )
    args = parser.parse_args(argv)
    for item in args.overrides:
        if item.split("=", 1)[0] in (f"model.{name}" for name in VARIANT_FIELDS):
            print(f"study_transforms: {item} is set by each variant; choose variants with --variants", file=sys.stderr)
            return 2
    size = [f"model.image_size={args.image_size}", f"data.image_size={args.image_size}"]
    try:
        config = load_config(overrides=STUDY_DEFAULTS + size + args.overrides)
    except ConfigError as e:
        print(f"study_transforms: config error: {e}", file=sys.stderr)
        return 2
    variants = study_variants(config.model.num_blocks)
    if args.variants is not None:
        known = {v.key: v for v in variants}
        unknown = [key for key in args.variants if key not in known]
        if unknown:
            print(f"study_transforms: unknown variant {unknown[0]!r} (choose from {', '.join(known)})", file=sys.stderr)
            return 2
        variants = [known[key] for key in args.variants]
    settings = StudySettings(
        budget_s=args.budget_s,
        batch_size=args.batch_size,
        sample_batch_size=args.sample_batch_size,
        sample_repeats=args.sample_repeats,
        seed=args.seed,
        log_every_s=args.log_every_s,
    )
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)  # restored on return, so a test calling main() leaks no setting
    c = config.model
    print(
        f"study: {len(variants)} models x {settings.budget_s:.0f}s, {c.image_size}px patch {c.patch_size} "
        f"({c.num_tokens} tokens x {c.token_dim}), width {c.channels}, {c.layers_per_block} layers/block, "
        f"batch {settings.batch_size}, lr {config.optim.lr:g} (warmup {config.optim.warmup_steps} steps), "
        f"{torch.get_num_threads()} thread(s), load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
        flush=True,
    )
    out_dir = Path(args.out)
    try:
        report = run_study(config, variants, settings, out_dir)
    finally:
        torch.set_num_threads(threads_before)
    print()
    print(format_table(report["rows"]))
    print(f"\nwrote {out_dir / 'study_transforms.json'} and {out_dir / 'study_transforms.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
