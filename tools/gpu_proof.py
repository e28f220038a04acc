"""The parts of the GPU proof (tools/gpu_proof.sh runs them in order, each under its own time cap).

    python tools/gpu_proof.py PART [ARGS] --mode gpu|smoke --report OUT/gpu_proof.md

Every figure is appended to the report the moment it is measured (the file is rewritten atomically each time), so
a part stopped at its cap keeps what it had. `--mode smoke` runs the same code at toy sizes on the CPU (CI).

  env                     versions and the device (part 1; the shell script runs the GPU-marked tests after it)
  train RECIPE            our trainer's per-worker function, one rank, DeepSpeed ZeRO-2 (NCCL), no Ray, on synthetic
                          shards, at the micro-batch the memory estimate derives for --gpu-memory-gib (80: an H100's):
                          images/s, MFU, peak memory against the estimate, checkpoint save, export == consolidated
                          fp32 master weights
  sample                  guided sampling, batch 256, bf16: sequential eager, CUDA graph, Jacobi (part 3)
  eval                    bits/dim images/s; Tweedie denoising images/s and peak memory (part 4)
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

GIB = 2**30


class Report:
    """The markdown report: each `row` is on disk at once (an atomic rewrite), and echoed on stdout."""

    def __init__(self, path: str):
        self.path = Path(path)

    def write(self, text: str) -> None:
        from tarflow_scale import atomic

        old = self.path.read_text() if self.path.is_file() else ""
        atomic.write_text(self.path, old + text + "\n")
        print(text, flush=True)

    def table(self, title: str) -> None:
        self.write(f"\n{title}\n\n| figure | value |\n| --- | --- |")

    def row(self, label: str, value: str) -> None:
        self.write(f"| {label} | {value} |")


def device_for(mode: str) -> torch.device:
    if mode == "gpu" and not torch.cuda.is_available():
        sys.exit("gpu mode needs a CUDA device (none visible); run `bash tools/gpu_proof.sh smoke` on a CPU")
    return torch.device("cuda" if mode == "gpu" else "cpu")


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / GIB


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Toy sizes for --mode smoke: the paper recipes' code paths with a model that runs in seconds on a CPU.
SMOKE_MODEL = ["model.image_size=16", "model.patch_size=4", "model.channels=32", "model.head_dim=16",
               "model.num_blocks=2", "model.layers_per_block=1"]  # fmt: skip


# -- part 1 ------------------------------------------------------------------------------------------------------


def part_env(args, report: Report) -> None:
    device = device_for(args.mode)
    report.table("## 1. Environment")
    report.row("python, torch, CUDA", f"{platform.python_version()}, {torch.__version__}, {torch.version.cuda}")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        report.row("device", f"{props.name}, {props.total_memory / GIB:.1f} GiB, {props.multi_processor_count} SMs")
    else:
        report.row("device", f"CPU ({platform.machine()}), smoke mode")
    for name in ("deepspeed", "webdataset", "pydantic"):
        try:
            module = __import__(name)
            report.row(name, f"{getattr(module, '__version__', '?')} ({Path(module.__file__).parent.parent})")
        except ImportError as e:
            report.row(name, f"missing ({e})")


# -- part 2 ------------------------------------------------------------------------------------------------------


def synthetic_shards(root: Path, num_images: int, size: int, num_classes: int) -> Path:
    """Random 8-bit images in shards: the loader, the decoder and the model see real-sized inputs."""
    import numpy as np

    from tarflow_scale.data import write_split
    from tarflow_scale.data.sources import ArraySource

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(num_images, size, size, 3), dtype=np.uint8)
    labels = np.arange(num_images) % max(num_classes, 1)
    keys = [f"synthetic{i:06d}" for i in range(num_images)]
    classes = [f"c{i}" for i in range(num_classes)]
    source = ArraySource(images, labels, keys, num_classes, classes, {"kind": "synthetic"})
    write_split(str(root), source, name="synthetic", split="train", samples_per_shard=256, progress=False)
    return root


def part_train(args, report: Report) -> None:
    """One recipe through training/single_rank.run_single_rank (the trainer's own train_worker)."""
    from safetensors.torch import load_file

    from tarflow_scale.artifacts.checkpoints import complete_checkpoints, strip_wrapper_prefixes
    from tarflow_scale.benchmarks.gpu import dense_peak
    from tarflow_scale.benchmarks.model import FLOP_CONVENTION, count_train_flops, measure_matmul_peak
    from tarflow_scale.config import load_config
    from tarflow_scale.models.tarflow import TarFlow
    from tarflow_scale.training import trainer
    from tarflow_scale.training.metrics import read_metrics
    from tarflow_scale.training.single_rank import run_single_rank

    device = device_for(args.mode)
    smoke = args.mode == "smoke"
    recipe, work = args.recipe, Path(tempfile.mkdtemp(prefix="gpu_proof_"))
    memory = args.gpu_memory_gib
    conditional = "cond" in recipe
    data = synthetic_shards(work / "data", 48 if smoke else 512, 16 if smoke else 64, 3 if smoke else 1000)
    overrides = [
        f"run_dir={work / 'run'}", f"data.path={data}", f"data.num_workers={0 if smoke else 4}",
        f"data.shuffle_buffer={8 if smoke else 1000}", "cluster.num_workers=1",
        f"cluster.use_gpu={str(not smoke).lower()}", f"cluster.gpu_memory_gib={memory:g}", "train.sample_every=0",
        "train.num_samples=1", "optim.warmup_steps=1",
    ]  # fmt: skip
    if smoke:  # a toy model, and a micro-batch cap standing in for the GPU memory a CPU run does not check
        overrides += [*SMOKE_MODEL, f"model.num_classes={3 if conditional else 0}", "train.max_micro_batch_size=2"]
        if conditional:  # on the CPU `auto` is fp32: ask for the bf16 trunk the recipe gets on a GPU
            overrides.append("deepspeed.precision=bf16")
    # The micro-batch (and checkpointing) this GPU gets for the recipe's global batch of 256, then a global batch
    # of two (conditional: the accumulation path) or one such micro-batch, to keep the run short.
    full = load_config(recipe, [*overrides, "train.global_batch_size=256"])
    micro = full.micro_batch_size
    steps, every, accumulation = 4, 2, 2 if conditional else 1
    config = load_config(
        recipe,
        [*overrides, f"train.global_batch_size={micro * accumulation}", f"train.num_steps={steps}",
         f"train.log_every={every}", f"train.checkpoint_every={steps}"],
    )  # fmt: skip
    assert (config.micro_batch_size, config.activation_checkpointing) == (micro, full.activation_checkpointing)
    estimate = config.memory_estimate
    title = f"## 2. Training: {recipe}, one rank, ZeRO-2, {'NCCL' if not smoke else 'gloo'}, no Ray"
    report.table(title)
    how = "with" if config.activation_checkpointing else "without"
    report.row(
        "derived micro-batch (global 256, one GPU)",
        f"{micro} x {full.grad_accum_steps} accumulation, {how} activation checkpointing, precision "
        f"{estimate.precision}, for cluster.gpu_memory_gib={memory:g}",
    )
    report.row("estimated peak per GPU", f"{estimate.peak / GIB:.3g} GiB")

    saves: list[float] = []
    save = trainer._save_checkpoint

    def timed_save(*a, **k):
        start = time.perf_counter()
        try:
            return save(*a, **k)
        finally:
            saves.append(time.perf_counter() - start)

    trainer._save_checkpoint = timed_save
    start = time.perf_counter()
    run_single_rank(config)
    report.row(
        "wall time of the run (start-up, steps, sample, checkpoint, export)", f"{time.perf_counter() - start:.0f} s"
    )
    logged = [r for r in read_metrics(config.run_dir) if "images_per_s" in r]
    last = logged[-1]
    report.row(
        f"training images/s (steps {last['step'] - every + 1}-{last['step']}, after {last['step'] - every} of warm-up)",
        f"{last['images_per_s']:.1f}",
    )
    measured = max(r["peak_mem_mb"] for r in logged) * 2**20
    label = "GPU allocator peak" if device.type == "cuda" else "process RSS, not comparable"
    report.row(
        f"peak memory measured ({label}) vs estimated",
        f"{measured / GIB:.3g} GiB vs {estimate.peak / GIB:.3g} GiB (estimate / measured = "
        f"{estimate.peak / measured:.2f})",
    )
    c = config.model
    gc.collect()  # the engine's reference cycles: its GPU memory goes back before the FLOP count's model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with device:  # one image's forward and backward, counted
        flop_model = TarFlow(c)
        x = torch.zeros(1, c.in_channels, c.image_size, c.image_size)
        y = torch.zeros(1, dtype=torch.long) if c.num_classes else None
    flops = count_train_flops(flop_model, x, y)
    del flop_model
    if smoke:  # a bf16 matmul at the datasheet peak's size takes long on a CPU: a small fp32 one
        peak, source = measure_matmul_peak(device, torch.float32, size=512, repeats=3), "fp32 512^3 matmul (smoke)"
    else:
        peak, source = dense_peak(device, 0.0)
    report.row(
        "MFU",
        f"{100 * last['images_per_s'] * flops / peak:.1f}% ({flops / 1e9:.4g} GFLOP per image, {FLOP_CONVENTION}; "
        f"peak: {source})",
    )
    checkpoint = complete_checkpoints(config.run_dir)[-1]
    size = sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file())
    report.row("checkpoint save (collective save + store + seal)", f"{saves[-1]:.1f} s, {size / 1e9:.2f} GB")
    if conditional:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        consolidated = strip_wrapper_prefixes(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint)))
        export = load_file(Path(config.run_dir) / "model.safetensors")
        same = export.keys() == consolidated.keys() and all(
            torch.equal(export[k], consolidated[k].to(export[k].dtype)) and export[k].dtype == torch.float32
            for k in export
        )
        report.row(
            "export == DeepSpeed's fp32 consolidation of the checkpoint", f"{same} ({len(export)} tensors, bitwise)"
        )
        if not same:
            sys.exit("the export differs from the fp32 master weights")


# -- part 3 ------------------------------------------------------------------------------------------------------


GUIDANCE = 1.5  # classifier-free guidance weight: the conditional and guiding passes run as one batch of 2B


def decode_once(model, noise, labels, mode: str):
    """The one call of the sampling API: guided, bf16, decoded by `mode`; returns (images, model passes per block,
    in sampling order)."""
    from tarflow_scale.config import Decoding, Guidance
    from tarflow_scale.models.decoding import DecodingStats

    decoding = {
        "sequential": Decoding(precision="bf16"),
        "sequential + CUDA graph": Decoding(precision="bf16", cuda_graph=True),  # one graph per read bucket
        "jacobi (tol 1e-2, bf16's floor)": Decoding("jacobi", tol=1e-2, precision="bf16"),
    }[mode]
    stats = DecodingStats()
    images = model.sample(noise, labels, guidance=Guidance(GUIDANCE), decoding=decoding, stats=stats)
    return images, [stats.passes[k] for k in sorted(stats.passes, reverse=True)]


def kv_reads_per_token(c, rows: int) -> str:
    """Mean KV-cache bytes a sequential step reads (bf16 cache, every layer of a block): the eager step reads the
    t + 1 slots written so far, the CUDA graphs the read bucket covering them (models/decoding/static.py)."""
    from tarflow_scale.models.decoding.static import read_buckets, read_length

    T, buckets = c.num_tokens, read_buckets(c.num_tokens)
    slot = c.layers_per_block * 2 * rows * c.channels * 2  # keys and values, bf16
    eager = sum(t + 1 for t in range(T - 1)) / (T - 1)
    graphed = sum(read_length(t, buckets) for t in range(T - 1)) / (T - 1)
    return (
        f"eager {eager * slot / 2**30:.3g} GiB, CUDA graphs {graphed * slot / 2**30:.3g} GiB ({graphed / eager:.2f}x; "
        f"read buckets {'/'.join(map(str, buckets))} of T={T})"
    )


def part_sample(args, report: Report) -> None:
    from tarflow_scale.benchmarks.common import perturb_heads
    from tarflow_scale.config import load_config
    from tarflow_scale.models.tarflow import TarFlow

    device = device_for(args.mode)
    smoke = args.mode == "smoke"
    config = load_config("imagenet64_cond", [*SMOKE_MODEL, "model.num_classes=3"] if smoke else [])
    c = config.model
    batch = 2 if smoke else 256
    torch.manual_seed(0)
    with device:
        model = perturb_heads(TarFlow(c), std=1e-3).eval()
    generator = torch.Generator(device).manual_seed(0)
    noise = torch.randn(batch, c.in_channels, c.image_size, c.image_size, device=device, generator=generator)
    labels = torch.arange(batch, device=device) % c.num_classes
    report.table(
        f"## 3. Sampling: imagenet64_cond model ({'toy' if smoke else 'paper'} size, untrained: random output heads, "
        f"std 1e-3), guidance {GUIDANCE}, batch {batch} (+{batch} guiding rows), bf16"
    )
    report.row("KV cache read per token (arithmetic)", kv_reads_per_token(c, 2 * batch))
    decode_once(model, noise[:1], labels[:1], "jacobi (tol 1e-2, bf16's floor)")  # warm-up: kernels, cuBLAS
    modes = ["sequential", "sequential + CUDA graph", "jacobi (tol 1e-2, bf16's floor)"]
    reference = None
    for mode in modes:
        if "CUDA graph" in mode and device.type != "cuda":
            report.row(mode, "n/a on the CPU")
            continue
        sync(device)
        start = time.perf_counter()
        images, passes = decode_once(model, noise, labels, mode)
        sync(device)
        seconds = time.perf_counter() - start
        reference = images if reference is None else reference
        diff = float((images.float() - reference.float()).abs().max())
        report.row(
            mode,
            f"{batch / seconds:.2f} images/s ({seconds:.1f} s); passes per block {passes}; "
            f"max abs difference from sequential {diff:.1e}",
        )


# -- part 4 ------------------------------------------------------------------------------------------------------


def part_eval(args, report: Report) -> None:
    from tarflow_scale.benchmarks.common import perturb_heads
    from tarflow_scale.config import EvalConfig, load_config
    from tarflow_scale.models.likelihood import LOG_BIN_WIDTH_8BIT
    from tarflow_scale.models.precision import precision_scope
    from tarflow_scale.models.tarflow import TarFlow
    from tarflow_scale.sampling import tweedie_denoise

    device = device_for(args.mode)
    smoke = args.mode == "smoke"
    config = load_config("imagenet64_cond", [*SMOKE_MODEL, "model.num_classes=3"] if smoke else [])
    c = config.model
    defaults = EvalConfig()
    bpd_batch = 4 if smoke else defaults.batch_size
    denoise_batch = 2 if smoke else defaults.denoise_batch_size
    torch.manual_seed(0)
    with device:
        model = perturb_heads(TarFlow(c), std=1e-3).eval()

    def dequantized(n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        pixels = torch.randint(0, 256, (n, c.in_channels, c.image_size, c.image_size), device=device)
        labels = torch.arange(n, device=device) % c.num_classes if c.num_classes else None
        return (pixels + torch.rand(pixels.shape, device=device)) / 128 - 1, labels  # uniform noise, [-1, 1]

    (x, y), (xd, yd) = dequantized(bpd_batch), dequantized(2 * denoise_batch)
    report.table(
        f"## 4. Evaluation: imagenet64_cond model ({'toy' if smoke else 'paper'} size), eval batch {bpd_batch}, "
        f"denoise batch {denoise_batch}{'' if smoke else ' (the defaults: eval.batch_size, eval.denoise_batch_size)'}"
    )
    labels = {
        "fp32": "strict fp32 (eval.bpd_precision's default)",
        "tf32": "TF32 matmuls",
        "bf16": "bf16 trunk",
    }
    for precision in ("fp32", "tf32", "bf16") if device.type == "cuda" else ("fp32", "bf16"):
        with torch.no_grad(), precision_scope(model, precision, device):
            model.bits_per_dim(x[:1], None if y is None else y[:1], LOG_BIN_WIDTH_8BIT)  # warm-up
            sync(device)
            start = time.perf_counter()
            model.bits_per_dim(x, y, LOG_BIN_WIDTH_8BIT)
            sync(device)
        report.row(f"bits/dim, {labels[precision]}", f"{bpd_batch / (time.perf_counter() - start):.1f} images/s")
        # The Tweedie step at eval.decoding.precision = `precision` (parameters frozen for the score).
        tweedie_denoise(model, xd[:1], 0.05, None if yd is None else yd[:1], precision=precision)  # warm-up
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        start = time.perf_counter()
        tweedie_denoise(model, xd, 0.05, yd, batch_size=denoise_batch, precision=precision)
        sync(device)
        seconds = time.perf_counter() - start
        report.row(
            f"Tweedie denoise, {labels[precision].split(' (')[0]}",
            f"{len(xd) / seconds:.2f} images/s; peak "
            + (f"{peak_gib(device):.1f} GiB (GPU allocator)" if device.type == "cuda" else "n/a on a CPU")
            + f" at {denoise_batch} images per forward+backward",
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/gpu_proof.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=["env", "train", "sample", "eval"])
    parser.add_argument("recipe", nargs="?", default="imagenet64_cond", help="train: the recipe")
    parser.add_argument("--mode", choices=["gpu", "smoke"], default="gpu")
    parser.add_argument("--report", required=True, help="the markdown report to append to")
    parser.add_argument(
        "--gpu-memory-gib",
        type=float,
        default=80.0,
        help="train: cluster.gpu_memory_gib the micro-batch is derived for (default 80, an H100 80GB's budget: on "
        "a larger GPU the run keeps room for the estimate to be wrong, which the measured peak then shows)",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "tarflow_scale" / "torch_extensions"))
    {"env": part_env, "train": part_train, "sample": part_sample, "eval": part_eval}[args.part](
        args, Report(args.report)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
