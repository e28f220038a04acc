"""What a training run prints: the libraries' logging settings (quiet by default, full with --verbose), colour
only on a terminal, and one progress display on the driver, fed by rank 0's metrics.jsonl.

Quiet mode uses the libraries' own settings: Ray's driver `logging_level`; Ray's worker logger level
(`RAY_LOGGER_LEVEL` in the job's runtime env: the PlacementGroupCleaner's polling warnings); Ray Train's
`LoggingConfig(log_level=...)` and its print patch (`RAY_TRAIN_ENABLE_PRINT_PATCH=0`); `RAY_COLOR_PREFIX=0` off a
terminal; on the workers, the levels of the DeepSpeed and torch loggers and of the logger Ray Train 2.60 reports
checkpoints through (named by its file path, so `LoggingConfig` misses it: it echoes every rank's
`TrainingReport(...)`). The one filter, a last resort: DeepSpeed prints "... built successfully" unconditionally
while creating the engine, so stdout is held back during `deepspeed.initialize` and shown if it fails. Worker
warnings and errors still reach the driver; a failing worker raises on the driver with its traceback.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from .metrics import format_duration

# Loggers on the workers that narrate routine work at INFO/WARNING (op builds, CUDA probing on CPU nodes).
NOISY_WORKER_LOGGERS = ("DeepSpeed", "torch.utils.cpp_extension", "torch.distributed")


@dataclass(frozen=True)
class ConsoleOptions:
    """How the driver and the workers talk; travels to the workers inside the train loop config."""

    verbose: bool = False  # the libraries' full output, and every rank-0 progress line from the worker
    progress_every_s: float = 10.0  # seconds between progress lines when stdout is not a terminal

    def to_dict(self) -> dict[str, Any]:
        return {"verbose": self.verbose, "progress_every_s": self.progress_every_s}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ConsoleOptions:
        return cls(**(data or {}))


def is_terminal(stream: TextIO | None = None) -> bool:
    stream = stream or sys.stdout
    return bool(getattr(stream, "isatty", lambda: False)())


def use_color(stream: TextIO | None = None) -> bool:
    """ANSI colour only on a terminal, and never with NO_COLOR set (https://no-color.org)."""
    return is_terminal(stream) and not os.environ.get("NO_COLOR")


def ray_init_kwargs(options: ConsoleOptions) -> dict[str, Any]:
    """Arguments for `ray.init` beyond the address: the driver's Ray logger level and the workers' env."""
    if options.verbose:
        return {"log_to_driver": True, "logging_level": logging.INFO, "env_vars": {}}
    return {
        "log_to_driver": True,  # worker warnings and errors still reach the console
        "logging_level": logging.ERROR,  # the driver's "ray" logger: no "Started a local Ray instance" chatter
        "env_vars": {
            # Ray's Python loggers in workers and actors (the PlacementGroupCleaner polls a State API that a
            # minimal install lacks, warning every few seconds). Not RAY_BACKEND_LOG_LEVEL: each worker's C++
            # logging announces that variable with a line of its own.
            "RAY_LOGGER_LEVEL": "error",
            # Ray Train turns every print() in a worker into an INFO record of the root logger, which no
            # redirect of stdout can hold back; off, prints are plain stdout again (still forwarded to the driver).
            "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        },
    }


def apply_driver_settings(options: ConsoleOptions) -> None:
    """Process-wide settings that must precede `ray.init` on the driver."""
    if not use_color():
        # Ray's own switch for the coloured "(Actor pid=...)" prefixes of forwarded worker lines.
        os.environ["RAY_COLOR_PREFIX"] = "0"


def ray_train_log_level(options: ConsoleOptions) -> str:
    """Ray Train's `LoggingConfig.log_level`: INFO echoes every rank's `TrainingReport(...)`."""
    return "INFO" if options.verbose else "WARNING"


def apply_worker_settings(options: ConsoleOptions) -> None:
    """On each worker, before DeepSpeed starts: the libraries' own logger levels."""
    if options.verbose:
        return
    for name in NOISY_WORKER_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from ray.train.v2._internal.execution import context as train_context

        # Ray Train 2.60 logs "Reporting training result ...: TrainingReport(...)" at INFO through
        # logging.getLogger(__file__), outside the "ray.train" hierarchy its LoggingConfig governs.
        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:  # another Ray version: nothing to quieten
        pass
    import warnings

    # torch.distributed deprecation notices raised inside DeepSpeed, once per rank: not actionable for users.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")


@contextlib.contextmanager
def held_stdout(options: ConsoleOptions) -> Iterator[None]:
    """Hold back what a library prints to stdout (quiet mode only); replay it on stderr if the block fails."""
    if options.verbose:
        yield
        return
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    except BaseException:
        sys.stderr.write(buffer.getvalue())
        raise


class TrainingProgress:
    """The driver's single progress display, fed by the records rank 0 appends to `metrics.jsonl`.

    On a terminal: a tqdm bar (steps, loss in bits/dim, rate, ETA). Otherwise: a line every `every_s` seconds
    with rate and ETA, printed only once a rate is known (no "eta ?"). Rates and ETAs come from the records'
    own timestamps, so they do not depend on how often the file is polled.
    """

    def __init__(
        self,
        metrics_path: str | Path,
        total_steps: int,
        every_s: float = 10.0,
        stream: TextIO | None = None,
        terminal: bool | None = None,
    ):
        self.path = Path(metrics_path)
        self.total = total_steps
        self.every_s = every_s
        self.stream = stream or sys.stdout
        self.terminal = is_terminal(self.stream) if terminal is None else terminal
        self.offset = self.path.stat().st_size if self.path.exists() else 0  # only this launch's records
        self.first: tuple[int, float] | None = None  # (step, time) of the first record seen
        self.last_record: dict[str, Any] | None = None
        self.last_print = 0.0
        self.lines_printed = 0
        self._bar = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- records -> display

    def rate(self) -> float:
        """Steps per second since the first record seen; NaN until two records span some time."""
        if self.first is None or self.last_record is None:
            return float("nan")
        steps = self.last_record["step"] - self.first[0]
        seconds = self.last_record["time"] - self.first[1]
        return steps / seconds if steps > 0 and seconds > 0 else float("nan")

    def line(self) -> str:
        record = self.last_record or {}
        step = record.get("step", 0)
        parts = [f"step {step}/{self.total}"]
        if isinstance(record.get("bits_per_dim"), (int, float)):
            parts.append(f"train bits/dim {record['bits_per_dim']:.3f}")
        rate = self.rate()
        if math.isfinite(rate):
            parts.append(f"{rate:.2f} step/s")
            parts.append(f"eta {format_duration((self.total - step) / rate)}")
        return " | ".join(parts)

    def feed(self, record: dict[str, Any], now: float | None = None) -> None:
        if "step" not in record or "time" not in record or "loss" not in record:
            return  # e.g. the end-of-run probe record
        now = time.time() if now is None else now
        if self.first is None:
            self.first = (record["step"], record["time"])
        self.last_record = record
        if self.terminal:
            self._update_bar(record)
            return
        finished = record["step"] >= self.total
        if math.isfinite(self.rate()) and (finished or now - self.last_print >= self.every_s):
            self.stream.write(self.line() + "\n")
            self.stream.flush()
            self.lines_printed += 1
            self.last_print = now

    def _update_bar(self, record: dict[str, Any]) -> None:
        from tqdm import tqdm

        if self._bar is None:
            self._bar = tqdm(total=self.total, initial=0, unit="step", file=self.stream, dynamic_ncols=True)
        self._bar.n = record["step"]
        if isinstance(record.get("bits_per_dim"), (int, float)):
            self._bar.set_postfix_str(f"train bits/dim {record['bits_per_dim']:.3f}", refresh=False)
        self._bar.refresh()

    def poll(self) -> None:
        """Read the records appended since the last poll (whole lines only)."""
        if not self.path.exists():
            return
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n")
        if end < 0:
            return
        self.offset += end + 1
        for raw in data[: end + 1].splitlines():
            try:
                self.feed(json.loads(raw))
            except (json.JSONDecodeError, TypeError):
                continue

    # -- background thread

    def start(self, interval_s: float = 0.5) -> TrainingProgress:
        def loop() -> None:
            while not self._stop.wait(interval_s):
                self.poll()

        self._thread = threading.Thread(target=loop, name="tarflow-progress", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.poll()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
