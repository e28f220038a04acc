"""Held-out nats/dim of T-NAF vs TarFlow (patch size 1) vs MAF on the digits, at equal wall-clock training.

T-NAF (arXiv 2401.01855) claims the likelihood of larger flows with an order of magnitude fewer parameters.
This study trains each model of `study.models` in turn, single process, with Adam for `study.budget_s`
seconds of wall clock (warmup, then cosine decay over the budget), redrawing the dequantization noise every
batch. A slice of the training split (`study.select_fraction`) is held back and scored every
`study.select_every_s` training seconds; each model keeps its best weights there (early stopping, which the
large MAF needs on 1.3k images). Then the held-out split (fixed dequantization noise) is scored, and, for
reference, an equally large slice of the training data. nats/dim are -log p(x) / 64 in the preprocessed
space x in [-1, 1] (tarflow_scale/data/tabular.py; add log(17/2) = 2.140 for the discrete levels). The table gives
each model's parameter count (for MAF also the count its masks leave connected), held-out nats/dim as mean +-
standard error over images, train nats/dim, optimizer steps done, the step whose weights were kept, and
non-finite losses skipped. The resolved config
and the results are written to run_dir (config.yaml, results.json). Example:

    python tools/study_tnaf.py --config configs/tabular/tnaf_digits.yaml study.budget_s=45
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import yaml
from torch import Tensor, nn

from tarflow_scale.config import ConfigError, dump_config, load_config, to_dict
from tarflow_scale.config.study import DIGITS_IMAGE_SIZE, TNAFRunConfig
from tarflow_scale.data.tabular import (
    LOG_BIN_WIDTH_DIGITS,
    dequantize_digits,
    digits_levels_split,
    val_noise_seed,
)
from tarflow_scale.models.maf import MAF, MaskedLinear
from tarflow_scale.models.tarflow import TarFlow
from tarflow_scale.models.tnaf import TNAF


def build_model(name: str, config: TNAFRunConfig) -> nn.Module:
    if name == "tnaf":
        return TNAF(config.tnaf)
    if name == "tarflow":
        return TarFlow(config.tarflow)
    if name == "maf":
        return MAF(config.maf)
    raise ValueError(f"unknown model {name!r}")


def log_prob(model: nn.Module, x: Tensor) -> Tensor:
    """(B,) nats for vectors x (B, 64); TarFlow sees them as 1 x 8 x 8 images (raster order, as sklearn's)."""
    if isinstance(model, TarFlow):
        return model.log_prob(x.view(-1, 1, DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE))
    return model.log_prob(x)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(all parameters, parameters a mask does not zero out): they differ only for MAF's masked weights."""
    total = sum(p.numel() for p in model.parameters())
    masked_out = sum(int((m.mask == 0).sum()) for m in model.modules() if isinstance(m, MaskedLinear))
    return total, total - masked_out


def train_for_budget(model: nn.Module, levels: Tensor, select: Tensor | None, config: TNAFRunConfig) -> dict:
    """Adam on -log p / D for `study.budget_s` seconds of training (evaluations stop the clock).

    With a selection split `select` (dequantized, fixed), the model is scored on it every
    `study.select_every_s` training seconds and at the end, and left with the weights that scored best there
    (early stopping on data it never trained on, so the held-out split stays untouched). Returns steps done,
    non-finite losses skipped, training seconds, and the step and selection nats/dim of the kept weights.
    """
    study = config.study
    generator = torch.Generator().manual_seed(study.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=study.lr)
    num_dims = levels.shape[1]
    steps = nonfinite = 0
    trained_s, next_select_s = 0.0, study.select_every_s
    best = {"select_nats_per_dim": math.inf, "best_step": 0}
    best_state = None

    def score_selection() -> None:
        nonlocal best_state
        nats = nats_per_dim(model, select, study.eval_batch_size)[0]
        model.train()
        if nats < best["select_nats_per_dim"]:
            best.update(select_nats_per_dim=nats, best_step=steps)
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    model.train()
    while trained_s < study.budget_s:
        start = time.perf_counter()
        warmup = min(1.0, (steps + 1) / max(study.warmup_steps, 1))
        for group in optimizer.param_groups:
            group["lr"] = study.lr * warmup * 0.5 * (1 + math.cos(math.pi * trained_s / study.budget_s))
        batch = levels[torch.randint(0, levels.shape[0], (study.batch_size,), generator=generator)]
        loss = -log_prob(model, dequantize_digits(batch, generator)).mean() / num_dims
        if torch.isfinite(loss):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if study.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), study.grad_clip)
            optimizer.step()
            steps += 1
        else:
            nonfinite += 1  # counted and reported, the step skipped
        trained_s += time.perf_counter() - start
        if select is not None and trained_s >= next_select_s:
            score_selection()
            next_select_s += study.select_every_s
    if select is None:
        best.update(select_nats_per_dim=math.nan, best_step=steps)  # no selection: the final weights
    else:
        score_selection()
        model.load_state_dict(best_state)
    return {"steps": steps, "nonfinite": nonfinite, "train_s": trained_s, **best}


@torch.no_grad()
def nats_per_dim(model: nn.Module, x: Tensor, batch_size: int) -> tuple[float, float]:
    """Mean and standard error over images of -log p(x) / D, nats."""
    model.eval()
    nll = torch.cat([-log_prob(model, chunk).double() for chunk in x.split(batch_size)]) / x.shape[1]
    return nll.mean().item(), (nll.std() / math.sqrt(nll.numel())).item()


def run_study(config: TNAFRunConfig) -> list[dict]:
    """Train and score every model of `study.models` in turn; one dict of results per model."""
    threads_before = torch.get_num_threads()
    torch.set_num_threads(config.study.num_threads)  # restored on return: a test calling main() leaks nothing
    try:
        return _run_study(config)
    finally:
        torch.set_num_threads(threads_before)


def _run_study(config: TNAFRunConfig) -> list[dict]:
    seed = config.data.seed
    train_levels, val_levels = digits_levels_split(seed, config.data.val_fraction)
    val = dequantize_digits(val_levels, torch.Generator().manual_seed(val_noise_seed(seed)))
    # Early stopping reads a slice of the training split held back from training, never the held-out split.
    num_select = round(config.study.select_fraction * train_levels.shape[0])
    select_levels, train_levels = train_levels[:num_select], train_levels[num_select:]
    select = None
    if num_select:
        select = dequantize_digits(select_levels, torch.Generator().manual_seed(val_noise_seed(seed) + 2))
    # As many training images as held-out ones, with noise of their own, to show the generalisation gap.
    train_probe = dequantize_digits(
        train_levels[: val.shape[0]], torch.Generator().manual_seed(val_noise_seed(seed) + 1)
    )
    results = []
    for name in config.study.models:
        torch.manual_seed(config.study.seed)
        model = build_model(name, config)
        params, connected = count_params(model)
        print(f"[{name}] {params:,} parameters, training for {config.study.budget_s:g} s", flush=True)
        fit = train_for_budget(model, train_levels, select, config)
        val_mean, val_se = nats_per_dim(model, val, config.study.eval_batch_size)
        train_mean, _ = nats_per_dim(model, train_probe, config.study.eval_batch_size)
        results.append(
            {"model": name, "params": params, "connected_params": connected, "num_val": val.shape[0],
             "val_nats_per_dim": val_mean, "val_se": val_se, "train_nats_per_dim": train_mean, **fit}
        )  # fmt: skip
        print(
            f"[{name}] {fit['steps']} steps (kept step {fit['best_step']}), held-out {val_mean:.4f} +- "
            f"{val_se:.4f} nats/dim",
            flush=True,
        )
    return results


def format_table(results: list[dict]) -> str:
    lines = [
        f"{'model':<8} {'params':>9} {'connected':>10} {'held-out nats/dim':>20} {'train nats/dim':>15} "
        f"{'steps':>7} {'kept step':>10} {'non-finite':>10}"
    ]
    for r in results:
        held_out = f"{r['val_nats_per_dim']:.4f} +- {r['val_se']:.4f}"
        lines.append(
            f"{r['model']:<8} {r['params']:>9,} {r['connected_params']:>10,} {held_out:>20} "
            f"{r['train_nats_per_dim']:>15.4f} {r['steps']:>7} {r['best_step']:>10} {r['nonfinite']:>10}"
        )
    lines.append(
        f"held-out: {results[0]['num_val']} digits, -log p(x)/64 for x = 2(v+u)/17 - 1 (mean +- s.e. over "
        f"digits); discrete levels: add {-LOG_BIN_WIDTH_DIGITS:.3f}"
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python tools/study_tnaf.py",
        description="Held-out nats/dim of T-NAF vs TarFlow (patch size 1) vs MAF on the digits at equal "
        "wall-clock training time.",
        epilog="example: python tools/study_tnaf.py --config configs/tabular/tnaf_digits.yaml study.budget_s=45",
    )
    parser.add_argument("--config", help="YAML study config (configs/tabular/); defaults to the built-in one")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. tnaf.channels=48 study.budget_s=30")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.overrides, cls=TNAFRunConfig)
    except ConfigError as e:
        print(f"study_tnaf: config error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
        return 0
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(config, run_dir / "config.yaml")
    results = run_study(config)
    (run_dir / "results.json").write_text(json.dumps({"config": to_dict(config), "results": results}, indent=2))
    print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
