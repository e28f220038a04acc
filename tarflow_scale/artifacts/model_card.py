"""What a model directory says about itself: config.json (model + training noise) and the README.md model card.

Both are built from the model config and the provenance the weights carry (the export metadata: the training
run's resolved config, source, tag; or, for an imported checkpoint, what the importer inferred), plus an
evaluation's metrics.json when one is given. The card is rendered by huggingface_hub's ModelCard (Jinja template).
"""

from __future__ import annotations

from typing import Any

import yaml

from ..config import RunConfig, TarFlowConfig, to_dict
from .provenance import embedded_run_config, training_noise
from .weights import EXPORT_FORMAT, FILE_KEYS

PAPER_URL = "https://arxiv.org/abs/2412.06329"
# Names the metadata in errors (the loaders already checked it against the file it came from).
_WHERE = "the model's provenance"

MODEL_CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

A TarFlow normalizing flow ([Zhai et al., 2024](https://arxiv.org/abs/2412.06329)) saved by
tarflow_scale: exact log-likelihood and exact sampling.

## Model

{{ model_table }}

## Training

{{ training }}

## Evaluation

{{ evaluation }}

## Usage

```python
import torch
from tarflow_scale import PretrainedTarFlow

model = PretrainedTarFlow.from_pretrained("{{ load_path }}")
images = model.sample(16{{ sample_labels }})  # (16, C, H, W) in [-1, 1]
```

Evaluate (bits/dim, samples, FID) on Ray: `tarflow-eval {{ load_path }} data.path=DATA eval.jobs=[bpd,sample]`.
Integrity: `model.safetensors` records a SHA-256 of its weights (`weights_sha256`), verified on every load.
"""


def _noise_fields(run: RunConfig | None) -> dict[str, Any]:
    """{"noise": gaussian|uniform|none|unknown, "noise_std": sigma on [-1, 1] (0 unless gaussian)}."""
    noise = training_noise(run, _WHERE)
    return {"noise": noise.noise, "noise_std": noise.noise_std}


def config_json(config: TarFlowConfig, provenance: dict[str, str]) -> dict[str, Any]:
    """config.json of a model directory: everything needed to rebuild and evaluate the model, human-readable."""
    run = embedded_run_config(provenance, _WHERE)
    out: dict[str, Any] = {"format": EXPORT_FORMAT, "model": to_dict(config), "training_noise": _noise_fields(run)}
    if run is not None:
        out["training"] = {
            "data": run.data.path,
            "num_steps": run.train.num_steps,
            "global_batch_size": run.train.global_batch_size,
        }
    out["source"] = {k: v for k, v in provenance.items() if k not in FILE_KEYS and k != "run_config"}
    return out


def _table(rows: list[tuple[str, Any]]) -> str:
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def _evaluation(metrics: dict[str, Any] | None) -> str:
    if not metrics:
        return "No evaluation results were saved with this model (run `tarflow-eval` and export again to add them)."
    results, rows = metrics.get("results", {}), []
    for name, r in results.get("bpd", {}).items():
        if isinstance(r, dict) and "mean" in r:
            rows.append(
                (f"bits/dim ({name})", f"{r['mean']:.4f} ± {r.get('stderr', 0):.4f} ({r.get('num_images')} images)")
            )
    if "fid" in results:
        r = results["fid"]
        kid = "n/a" if r.get("kid") is None else f"{r['kid']:.5f}"
        rows.append(("FID", f"{r['fid']:.3f} ({r.get('num_generated')} samples, {r.get('feature_extractor')})"))
        rows.append(("KID", kid))
    if "sample" in results:
        rows.append(("samples drawn", results["sample"].get("num_samples")))
    if not rows:
        return "The evaluation beside this model recorded no bits/dim or FID results."
    settings = metrics.get("config", {}).get("eval", {})
    guidance = settings.get("guidance") or {}
    note = f"\n\nSampling: guidance {guidance.get('weight')}, attention temperature {guidance.get('attn_temp')}."
    return _table(rows) + (note if settings else "")


def card_fields(
    config: TarFlowConfig,
    provenance: dict[str, str],
    metrics: dict[str, Any] | None,
    load_path: str = "PATH",
    num_params: int | None = None,
) -> dict[str, str]:
    """The values the model card template renders."""
    c = config
    model_rows = [
        ("image", f"{c.in_channels} x {c.image_size} x {c.image_size}"),
        ("classes", c.num_classes or "unconditional"),
        ("patch size", c.patch_size),
        ("width x blocks x layers", f"{c.channels} x {c.num_blocks} x {c.layers_per_block}"),
        ("transform / prior", f"{c.transform} / {c.prior}"),
        ("parameters", f"{num_params:,}" if num_params else "see model.safetensors"),
    ]
    run = embedded_run_config(provenance, _WHERE)
    noise = _noise_fields(run)
    source = provenance.get("source", "unknown")
    if run is None:
        training = f"Source: `{source}`. The weights carry no training run config."
    else:
        rows = [
            ("data", f"`{run.data.path or 'unknown'}` (split {run.data.train_split})"),
            ("noise augmentation", f"{noise['noise']} (sigma {noise['noise_std']} on [-1, 1])"),
            ("steps", f"{run.train.num_steps} (checkpoint tag: {provenance.get('tag', 'n/a')})"),
            ("global batch", run.train.global_batch_size),
            ("weights", provenance.get("weights", "raw")),
            ("source", f"`{source}`"),
        ]
        recipe = yaml.safe_dump(to_dict(run), sort_keys=False).strip()
        training = _table(rows) + f"\n\nThe full recipe (resolved run config):\n\n```yaml\n{recipe}\n```"
    return {
        "title": f"TarFlow {c.image_size}x{c.image_size}" + (f", {c.num_classes} classes" if c.num_classes else ""),
        "model_table": _table(model_rows),
        "training": training,
        "evaluation": _evaluation(metrics),
        "load_path": load_path,
        "sample_labels": f", y=torch.arange(16) % {c.num_classes}" if c.num_classes else "",
    }
