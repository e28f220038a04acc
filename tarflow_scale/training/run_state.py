"""What a run directory holds between runs, checked on the driver before Ray starts: the checkpoint a run resumes
from, whether the new config may continue it, Ray's checkpoint snapshot, and the stop request of a Ctrl-C.

Every rule here is the same for resume, export and evaluation: the newest *complete* checkpoint of `run_dir`
(tarflow_scale.artifacts.checkpoints.complete_checkpoints) is the one that counts.
"""

from __future__ import annotations

import datetime
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..artifacts.checkpoints import check_trusted, complete_checkpoints, latest_checkpoint, read_run_config
from ..config import ConfigError, RunConfig, dump_config, flatten, to_dict

RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's list of reported checkpoints, in run_dir
STOP_FILE = ".stop_requested"  # the driver writes it on SIGINT/SIGTERM; workers stop at the next step boundary
HISTORY_DIR = "config_history"  # one resolved config per run segment (fresh start or resume)

# Keys that may differ between the checkpoint's config and a resumed run's: they change neither the maths nor the
# data order. `train.num_steps` may only grow (and then the cosine decay is stretched over the new length).
SAFE_TO_CHANGE = (
    "run_dir",
    "train.log_every",
    "train.sample_every",
    "train.num_samples",
    "train.keep_checkpoints",
    "train.num_steps",
    "train.resume_from",
    "train.max_nonfinite_in_a_row",
    "data.max_corrupt_in_a_row",
    "cluster.address",
    "cluster.max_failures",
    "cluster.cpus_per_worker",
    "cluster.autoscale",
    "cluster.startup_timeout_s",
    "eval.",  # the whole evaluation section: tarflow-eval's settings, unused by training
)


class RunStopped(Exception):
    """Training stopped at a step boundary on request (SIGINT/SIGTERM); a final checkpoint was written."""

    def __init__(self, step: int, checkpoint: Path | None):
        where = f"final checkpoint {checkpoint}" if checkpoint else "no checkpoint was written"
        super().__init__(f"stopped at step {step} on request; {where}. Re-run the same command to resume.")
        self.step, self.checkpoint = step, checkpoint


class RunAborted(Exception):
    """Training aborted by a second SIGINT/SIGTERM: no final checkpoint; the newest complete one still counts."""

    def __init__(self, signal_name: str, checkpoint: Path | None = None):
        where = f"the newest complete checkpoint is {checkpoint}" if checkpoint else "no complete checkpoint yet"
        super().__init__(
            f"aborted by a second {signal_name}, without a final checkpoint; {where}. Re-run the same command to "
            "resume from it."
        )
        self.signal_name, self.checkpoint = signal_name, checkpoint


def config_changes(old: RunConfig, new: RunConfig) -> dict[str, tuple[Any, Any]]:
    """Every dotted key whose value differs: key -> (old, new)."""
    a, b = flatten(to_dict(old)), flatten(to_dict(new))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _is_safe(key: str, old: Any, new: Any) -> bool:
    if key == "train.num_steps":
        return isinstance(old, int) and isinstance(new, int) and new >= old
    return any(key == s or (s.endswith(".") and key.startswith(s)) for s in SAFE_TO_CHANGE)


@dataclass
class ResumePlan:
    checkpoint: Path | None  # the newest complete checkpoint of run_dir (or train.resume_from), None: fresh start
    allowed_changes: dict[str, tuple[Any, Any]]  # differences accepted (safe, or named in --allow-config-change)


def resume_source(config: RunConfig) -> Path | None:
    """Where a run resumes from: its own run_dir once that holds a complete checkpoint, else `train.resume_from` (a
    run directory or one checkpoint folder), else None (a fresh start). The driver and the workers both ask."""
    run_dir = Path(config.run_dir)
    if run_dir.is_dir() and complete_checkpoints(run_dir, warn=False):
        return run_dir
    if config.train.resume_from:
        source = Path(config.train.resume_from)
        if not source.is_dir():
            raise ConfigError(f"train.resume_from={source} does not exist")
        return source
    return None


def check_resume(config: RunConfig, allow_changes: tuple[str, ...] = (), trust: bool = False) -> ResumePlan:
    """Find what this run resumes from and refuse a config it cannot continue; raises ConfigError naming every key.

    The checkpoint is the newest intact one (checksums verified; damaged ones skipped with a warning), and it must
    be the user's own unless `trust` (--trust-checkpoint): resuming unpickles it (CheckpointError naming the file).
    A world-size change is refused next (a ZeRO checkpoint resumes only at the same data-parallel size). Other
    differences from the checkpoint's config are refused unless safe or named in `allow_changes`.
    """
    source = resume_source(config)
    if source is None:
        return ResumePlan(None, {})
    checkpoint = latest_checkpoint(source)  # warns about each incomplete or damaged folder it skips
    check_trusted(checkpoint, trust)
    saved = read_run_config(checkpoint)
    if saved.cluster.num_workers != config.cluster.num_workers:
        raise ConfigError(
            f"checkpoint {checkpoint} was written by {saved.cluster.num_workers} ranks but cluster.num_workers="
            f"{config.cluster.num_workers}: a ZeRO checkpoint resumes only at the same world size (set "
            f"cluster.num_workers={saved.cluster.num_workers}, or export it with tarflow-export and start a new run "
            "with train.resume_from pointing at a checkpoint of that size)"
        )
    run_dir = Path(config.run_dir)
    if source != run_dir:  # train.resume_from: another run's weights, a deliberate new start; only world size matters
        return ResumePlan(checkpoint, {})
    unknown = [k for k in allow_changes if k not in flatten(to_dict(config))]
    if unknown:
        raise ConfigError(f"--allow-config-change {unknown[0]}: no such config key")
    changes = config_changes(saved, config)
    refused = {k: v for k, v in changes.items() if not _is_safe(k, *v) and k not in allow_changes}
    if refused:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
        raise ConfigError(
            f"run_dir={run_dir} resumes from {checkpoint.name}, whose config differs: {listed}. Resuming would mix "
            "two runs silently. Use a new run_dir, restore these values, or pass --allow-config-change "
            + " ".join(refused)
        )
    return ResumePlan(checkpoint, changes)


def record_config(config: RunConfig, plan: ResumePlan) -> Path:
    """Write run_dir/config.yaml (atomically, after the checks) and this segment's own copy in config_history/."""
    run_dir = Path(config.run_dir)
    dump_config(config, run_dir / "config.yaml")
    step = read_run_step(plan.checkpoint) if plan.checkpoint else 0
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = run_dir / HISTORY_DIR / f"{stamp}_from_step_{step:08d}.yaml"
    dump_config(config, path)
    return path


def read_run_step(checkpoint: Path) -> int:
    from ..artifacts.checkpoints import COMPLETE_FILE

    try:
        return int(json.loads((checkpoint / COMPLETE_FILE).read_text())["step"])
    except (OSError, ValueError, KeyError):
        return 0


def repair_ray_snapshot(run_dir: Path) -> str | None:
    """Move aside a damaged or empty Ray checkpoint snapshot (Ray would refuse to start with a bare JSON error).

    Without it Ray starts with no checkpoint list, and the workers resume from the newest complete checkpoint of
    run_dir anyway. Returns the warning given, or None when the snapshot is fine or absent.
    """
    path = run_dir / RAY_SNAPSHOT
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
        missing = [
            name
            for name in _snapshot_checkpoint_names(state)
            if not (run_dir / name).is_dir()  # Ray also refuses a snapshot listing deleted folders
        ]
        if not missing:
            return None
        reason = f"it lists missing checkpoints {missing}"
    except (ValueError, UnicodeDecodeError) as e:
        reason = f"it is not valid JSON ({e})"
    aside = path.with_name(f"{path.name}.damaged-{os.getpid()}")
    os.replace(path, aside)
    message = (
        f"Ray's checkpoint snapshot {path} is unusable: {reason}; moved to {aside.name}. Resuming from the newest "
        "complete checkpoint in run_dir instead."
    )
    warnings.warn(message, stacklevel=2)
    return message


def _snapshot_checkpoint_names(state: Any) -> list[str]:
    """Checkpoint folder names a Ray snapshot refers to (the `checkpoint_dir_name` fields, wherever they are)."""
    names: list[str] = []
    if isinstance(state, dict):
        for key, value in state.items():
            if key == "checkpoint_dir_name" and isinstance(value, str):
                names.append(value)
            else:
                names.extend(_snapshot_checkpoint_names(value))
    elif isinstance(state, list):
        for value in state:
            names.extend(_snapshot_checkpoint_names(value))
    elif isinstance(state, str) and state.lstrip().startswith(("{", "[")):
        try:  # Ray nests JSON documents as strings
            names.extend(_snapshot_checkpoint_names(json.loads(state)))
        except ValueError:
            pass
    return names


# ----------------------------------------------------------------------------------------------------------
# Stop requests: the driver writes the file, the workers agree on it at a step boundary


def request_stop(run_dir: str | Path, reason: str) -> None:
    from .. import atomic

    atomic.write_text(Path(run_dir) / STOP_FILE, reason + "\n")


def stop_requested(run_dir: str | Path) -> bool:
    return (Path(run_dir) / STOP_FILE).is_file()


def clear_stop(run_dir: str | Path) -> None:
    (Path(run_dir) / STOP_FILE).unlink(missing_ok=True)
