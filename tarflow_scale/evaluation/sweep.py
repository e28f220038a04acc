"""A FID sweep's outputs (eval.sweep): the best setting, `sweep.csv` (one row per setting), `sweep.png` (FID against
the swept value, one line per combination of the other swept settings; matplotlib) and `sweep_grid.png` (each
setting's first samples side by side, labelled; the same seeds under every setting)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

import numpy as np

from .. import atomic
from ..atomic import atomic_path
from ..config.sweep import SETTING_NAMES, setting_label

CSV_FILE, PLOT_FILE, GRID_FILE = "sweep.csv", "sweep.png", "sweep_grid.png"
CSV_COLUMNS = (
    *SETTING_NAMES, "fid", "kid", "kid_std", "images_per_s_per_worker", "mean_passes_per_block", "pass_ratio",
    "num_generated", "num_nonfinite_redrawn", "best",
)  # fmt: skip
NUMERIC = ("guidance.weight", "guidance.attn_temp", "denoise_step")  # x axis candidates, in order of preference
MIN_PANEL_PIXELS = 128  # a setting's grid is upscaled (nearest) to at least this width, so 8x8 samples show


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def best_row(rows: list[dict[str, Any]]) -> int | None:
    """The row with the lowest FID (the first of equals); None when no row has a finite FID."""
    finite = [i for i, row in enumerate(rows) if _finite(row["fid"])]
    return min(finite, key=lambda i: rows[i]["fid"]) if finite else None


def write_csv(rows: list[dict[str, Any]], best: int | None, path: Path) -> Path:
    """One line per setting: its four sampling settings, FID, KID ± std, per-worker images/s and passes per block."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for i, row in enumerate(rows):
        passes = row.get("decoding_passes") or {}
        mean = passes.get("mean_passes_per_block")
        values = {
            **row["setting"],
            **{k: row.get(k) for k in ("fid", "kid", "kid_std", "images_per_s_per_worker")},
            "mean_passes_per_block": " ".join(f"{p:g}" for p in mean) if mean else "",
            "pass_ratio": passes.get("pass_ratio"),
            "num_generated": row["num_generated"],
            "num_nonfinite_redrawn": row["num_nonfinite_redrawn"],
            "best": i == best,
        }
        writer.writerow(["" if values[c] is None else repr(values[c]) if isinstance(values[c], float) else values[c]
                         for c in CSV_COLUMNS])  # fmt: skip
    atomic.write_text(path, buffer.getvalue())
    return path


def write_plot(rows: list[dict[str, Any]], swept: list[str], best: int | None, metric: str, path: Path) -> Path:
    """FID against the first swept numeric setting (else decoding.mode), one line per combination of the others."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend

    x_name = _x_axis(swept)
    others = [name for name in swept if name != x_name]
    categories = list(dict.fromkeys(row["setting"][x_name] for row in rows))  # decoding.mode: in sweep order

    def x_of(row: dict[str, Any]) -> float:
        value = row["setting"][x_name]
        return value if x_name in NUMERIC else categories.index(value)

    lines: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        lines.setdefault(setting_label(row["setting"], others), []).append(row)
    figure = Figure(figsize=(6.4, 4.2), dpi=120)
    axes = figure.add_subplot()
    for name, members in lines.items():
        members = sorted((r for r in members if _finite(r["fid"])), key=x_of)
        axes.plot([x_of(r) for r in members], [r["fid"] for r in members], marker="o", label=name or None)
    if best is not None:
        axes.plot([x_of(rows[best])], [rows[best]["fid"]], marker="*", markersize=16, color="black", linestyle="",
                  label=f"best: {setting_label(rows[best]['setting'], swept)}")  # fmt: skip
    if x_name not in NUMERIC:
        axes.set_xticks(range(len(categories)), categories)
    axes.set_xlabel(x_name)
    axes.set_ylabel(metric)
    axes.set_title(f"{metric}\nagainst {x_name}", fontsize=10)  # two lines: the metric names its features
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        figure.savefig(tmp, format="png")
    return path


def _panel(images: np.ndarray) -> np.ndarray:
    """(n, C, H, W) uint8 -> one (h, w, 3) uint8 grid of ceil(sqrt(n)) columns, 1-pixel gaps, upscaled."""
    n, c, h, w = images.shape
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    scale = max(1, math.ceil(MIN_PANEL_PIXELS / (cols * (w + 1))))
    canvas = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1, 3), 255, np.uint8)
    for k, image in enumerate(images):
        r, col = divmod(k, cols)
        hwc = image.transpose(1, 2, 0)
        canvas[r * (h + 1) : r * (h + 1) + h, col * (w + 1) : col * (w + 1) + w] = hwc if c == 3 else hwc[..., :1]
    return canvas.repeat(scale, 0).repeat(scale, 1)


def write_grid(grids: list[np.ndarray], labels: list[str], places: list[tuple[int, int]], path: Path) -> Path:
    """Each setting's samples as a panel under its label, at (row, column) `places`; written atomically."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    panels = [_panel(g) for g in grids]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max(int(probe.textlength(t, font=font)) for t in labels)
    cell_w = max(max(p.shape[1] for p in panels), text_w) + 12
    text_h = 22
    cell_h = max(p.shape[0] for p in panels) + text_h + 8
    num_rows, num_cols = (max(place[k] for place in places) + 1 for k in (0, 1))
    sheet = Image.new("RGB", (num_cols * cell_w, num_rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for panel, text, (r, c) in zip(panels, labels, places):
        x, y = c * cell_w, r * cell_h
        draw.text((x + 6, y + 4), text, fill="black", font=font)
        sheet.paste(Image.fromarray(panel), (x + (cell_w - panel.shape[1]) // 2, y + text_h))
    with atomic_path(path, suffix=".png") as tmp:
        sheet.save(tmp)
    return path


def _x_axis(swept: list[str]) -> str:
    """The setting plotted along x (and laid out left to right in the grid): the first swept numeric one."""
    return next((name for name in NUMERIC if name in swept), swept[0])


def _places(rows: list[dict[str, Any]], swept: list[str]) -> list[tuple[int, int]]:
    """(row, column) of each setting's panel: columns follow the x-axis setting, rows the others' combinations."""
    x_name = _x_axis(swept)
    others = [name for name in swept if name != x_name]
    columns = list(dict.fromkeys(row["setting"][x_name] for row in rows))
    lines = list(dict.fromkeys(setting_label(row["setting"], others) for row in rows))
    return [(lines.index(setting_label(r["setting"], others)), columns.index(r["setting"][x_name])) for r in rows]


def write_sweep_outputs(
    rows: list[dict[str, Any]], swept: list[str], grids: list[np.ndarray | None], out_dir: Path, extractor: str
) -> dict[str, Any]:
    """sweep.csv, sweep.png and sweep_grid.png in `out_dir`; returns the best setting and the files written."""
    best = best_row(rows)
    metric = "FID" if extractor == "inception" else f"Frechet distance ({extractor} features: NOT FID)"
    files = {"csv": str(write_csv(rows, best, out_dir / CSV_FILE))}
    files["plot"] = str(write_plot(rows, swept, best, metric, out_dir / PLOT_FILE))
    if all(g is not None and len(g) for g in grids):
        texts = [setting_label(row["setting"], swept) for row in rows]
        files["grid"] = str(write_grid(grids, texts, _places(rows, swept), out_dir / GRID_FILE))
    else:  # units saved before grids were kept: the numbers stand, the picture is left out
        files["grid"] = None
    out: dict[str, Any] = {"files": files, "best": None}
    if best is not None:
        row = rows[best]
        out["best"] = {
            "row": best,
            "setting": row["setting"],
            "label": setting_label(row["setting"], swept),
            **{k: row[k] for k in ("fid", "kid", "kid_std")},
        }
    return out
