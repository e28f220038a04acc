"""Training metrics: a JSONL log, TensorBoard scalars and progress lines with rate and ETA (rank 0 only)."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any


def emit(line: str) -> None:
    """One progress line on stdout. Written directly: Ray Train 2.60 patches `print` in workers into its logger,
    which shows every printed line twice on the driver."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


class MetricsLogger:
    """Appends one JSON object per logged step to `metrics.jsonl` and mirrors scalars to TensorBoard."""

    def __init__(
        self, run_dir: str | Path, total_steps: int, enabled: bool = True, tensorboard: bool = True, echo: bool = True
    ):
        self.enabled = enabled
        self.echo = echo  # print a progress line per record (the driver draws its own display otherwise)
        self.total_steps = total_steps
        self.start_time = time.time()
        self.start_step: int | None = None
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))
                except ImportError:  # tensorboard is optional at run time
                    self.writer = None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.start_step is None:  # rates count from the first logged step (compilation, resume excluded)
            self.start_step, self.start_time = step, time.time()
        record = {"step": step, "time": time.time(), **metrics}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"train/{key}", value, step)
        if not self.echo:
            return
        elapsed = time.time() - self.start_time
        rate = (step - self.start_step) / elapsed if step > self.start_step else float("nan")
        eta = (self.total_steps - step) / rate if rate > 0 else float("inf")
        shown = " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        pace = f" | {rate:.2f} step/s | eta {format_duration(eta)}" if math.isfinite(rate) else ""
        emit(f"step {step}/{self.total_steps} | {shown}{pace}")

    def log_images(self, tag: str, images, step: int) -> None:
        """A grid of images in [-1, 1] (B, C, H, W) in TensorBoard's Images tab."""
        if not self.enabled or self.writer is None:
            return
        from torchvision.utils import make_grid

        grid = make_grid(images.float().clamp(-1, 1).cpu(), nrow=max(1, int(len(images) ** 0.5)))
        self.writer.add_image(tag, (grid + 1) / 2, step)
        self.writer.flush()

    def note(self, step: int, record: dict[str, Any]) -> None:
        """An event (not a metric) in metrics.jsonl, e.g. where a run segment resumed; no rate, no TensorBoard."""
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **record}) + "\n")
        emit(f"step {step}/{self.total_steps} | " + " | ".join(f"{k} {v}" for k, v in record.items()))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of a run's metrics.jsonl, in file order (a resumed run re-logs the steps it redid).

    The log is append-only, not rewritten atomically: a line torn by a kill or a full disk is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records
