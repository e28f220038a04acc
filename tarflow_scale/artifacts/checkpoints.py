"""Training checkpoint folders: completeness and integrity, the newest intact one, whether its engine state may be
unpickled, their run config, ZeRO consolidation.

A training checkpoint is a folder Ray Train stores: the DeepSpeed engine state of every rank, `latest` (the
engine's tag), `config.yaml` (the resolved run config), the EMA weights when enabled, and `complete.json`, written
last, listing every file with its size and sha256. It is for resuming; exports (artifacts/exports.py) are for
everything else. Reading its weights never unpickles (artifacts/zero_weights.py); a resume must (DeepSpeed's engine
load), so `check_trusted` admits only folders whose files are the user's own and writable by no one else.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import stat
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import yaml

from .. import atomic
from ..config import RunConfig, from_dict
from .weights import CheckpointError, file_sha256
from .zero_weights import read_zero_weights

CONFIG_FILE = "config.yaml"  # the resolved run config, written into every checkpoint folder
TAG_FILE = "latest"  # DeepSpeed's name of the engine state it saved (e.g. step_00000200)
EMA_FILE = "ema.safetensors"  # EMA weights (when optim.ema_decay > 0), beside the engine state
# Written last into a checkpoint folder, once every rank's files are stored: every file with its size and sha256.
# A folder without it (or whose files have other sizes) is incomplete: a crash, a full disk or a kill mid-save;
# one whose files have other checksums is damaged (a flipped bit, a bad copy, an edit).
COMPLETE_FILE = "complete.json"
# Each rank's checksums of the files it wrote, computed from its local copy before upload (the ranks hash in
# parallel, from the page cache) and merged into COMPLETE_FILE by rank 0, which then removes them.
DIGESTS_PREFIX = "sha256-rank"
_CHECKPOINT_NAME = re.compile(r"checkpoint_(\d+)$")
# Wrappers that prefix parameter names: activation checkpointing and torch.compile.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


class IncompleteCheckpointWarning(UserWarning):
    """A `checkpoint_*` folder was skipped because it is incomplete (or damaged: DamagedCheckpointWarning)."""


class DamagedCheckpointWarning(IncompleteCheckpointWarning):
    """A complete `checkpoint_*` folder was skipped because a file differs from the checksum recorded at save."""


def _listed_files(checkpoint_dir: Path) -> list[Path]:
    """The files a checkpoint consists of: everything but the marker, the rank digests and hidden files."""
    return [
        p
        for p in sorted(checkpoint_dir.rglob("*"))
        if p.is_file() and p.name != COMPLETE_FILE and not p.name.startswith((".", DIGESTS_PREFIX))
    ]


def _hash_files(paths: list[Path]) -> list[str]:
    """sha256 of each file, several at once (hashlib releases the GIL: about 1.5 GB/s per core)."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1, max(len(paths), 1))) as pool:
        return list(pool.map(file_sha256, paths))


def file_records(folder: str | Path) -> dict[str, dict[str, int | str]]:
    """{relative name: {"bytes": size, "sha256": digest}} of the files of a (partial) checkpoint folder."""
    folder = Path(folder)
    paths = _listed_files(folder)
    return {
        p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": digest}
        for p, digest in zip(paths, _hash_files(paths))
    }


def write_rank_digests(folder: str | Path, rank: int) -> Path:
    """A rank's checksums of the files it wrote into `folder` (its local copy, before upload)."""
    records = json.dumps(file_records(folder), indent=1) + "\n"
    return atomic.write_text(Path(folder) / f"{DIGESTS_PREFIX}{rank:05d}.json", records)


def _merged_rank_digests(checkpoint_dir: Path) -> dict[str, dict]:
    """The ranks' digest files merged (a name two ranks wrote differently is left out: it is hashed as stored),
    then removed."""
    merged: dict[str, dict] = {}
    conflicting: set[str] = set()
    for path in sorted(checkpoint_dir.glob(f"{DIGESTS_PREFIX}*.json")):
        try:
            records = json.loads(path.read_text())
        except (OSError, ValueError):
            records = {}  # unreadable: those files are hashed as stored
        for name, record in records.items():
            if name in merged and merged[name] != record:
                conflicting.add(name)
            merged.setdefault(name, record)
        path.unlink()
    return {k: v for k, v in merged.items() if k not in conflicting}


def write_complete_marker(checkpoint_dir: str | Path, step: int, world_size: int) -> Path:
    """Seal a checkpoint folder: every file with its size and sha256 in COMPLETE_FILE (written last, atomically).

    Checksums come from the ranks' digest files (`write_rank_digests`) where present, so a file damaged on its way
    to storage is caught on read; the rest are hashed here. Every file is made read-only for group and others
    (a resume unpickles them: `check_trusted`)."""
    checkpoint_dir = Path(checkpoint_dir)
    reported = _merged_rank_digests(checkpoint_dir)
    paths = _listed_files(checkpoint_dir)
    names = [p.relative_to(checkpoint_dir).as_posix() for p in paths]
    unreported = [p for p, name in zip(paths, names) if name not in reported]
    hashed = dict(zip(unreported, _hash_files(unreported)))
    sizes, sums = {}, {}
    for path, name in zip(paths, names):
        record = reported.get(name) or {"bytes": path.stat().st_size, "sha256": hashed[path]}
        sizes[name], sums[name] = int(record["bytes"]), str(record["sha256"])
        _seal_mode(path)
    record = {"step": step, "world_size": world_size, "files": sizes, "sha256": sums}
    marker = atomic.write_text(checkpoint_dir / COMPLETE_FILE, json.dumps(record, indent=1) + "\n")
    _seal_mode(marker)
    return marker


def _seal_mode(path: Path) -> None:
    """Drop group/other write permission (a file system that refuses chmod leaves it: check_trusted says so)."""
    try:
        mode = path.stat().st_mode
        if mode & 0o022:
            os.chmod(path, stat.S_IMODE(mode) & ~0o022)
    except OSError:
        pass


def incomplete_reason(checkpoint_dir: str | Path) -> str | None:
    """None when `checkpoint_dir` is a complete checkpoint; else why not, in a few words."""
    checkpoint_dir = Path(checkpoint_dir)
    marker = checkpoint_dir / COMPLETE_FILE
    if not marker.is_file():
        return f"no {COMPLETE_FILE} (the save never finished)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        return f"unreadable {COMPLETE_FILE}: {e}"
    for name in (CONFIG_FILE, TAG_FILE):
        if name not in files:
            return f"{name} missing"
    for name, size in files.items():
        path = checkpoint_dir / name
        if not path.is_file():
            return f"{name} missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} expected"
    return None


def checkpoint_step(checkpoint_dir: str | Path) -> int:
    match = _CHECKPOINT_NAME.search(Path(checkpoint_dir).name)
    return int(match.group(1)) if match else -1


def complete_checkpoints(run_dir: str | Path, warn: bool = True) -> list[Path]:
    """The complete `checkpoint_*` folders of a run directory, oldest first; each incomplete one is skipped with
    an IncompleteCheckpointWarning naming it. Resume, export and evaluation all choose from this list."""
    found = []
    for path in sorted(Path(run_dir).glob("checkpoint_*"), key=checkpoint_step):
        if not path.is_dir() or checkpoint_step(path) < 0:
            continue
        reason = incomplete_reason(path)
        if reason is None:
            found.append(path)
        elif warn:
            warnings.warn(f"skipping incomplete checkpoint {path}: {reason}", IncompleteCheckpointWarning, 2)
    return found


# Folders verified by this process: resolved path -> the (name, size, mtime, inode) of its files then. An export or
# evaluation resolves the checkpoint more than once (provenance, then weights); each file is hashed once.
_VERIFIED: dict[str, tuple] = {}


def verified_signatures() -> dict[str, tuple]:
    """The folders this process verified and their files' signatures then, for another process to adopt."""
    return dict(_VERIFIED)


def adopt_verified(signatures: dict[str, tuple]) -> None:
    """Take another process's verifications (the driver's, handed to the training workers): a folder whose files
    still have the recorded (name, size, mtime, inode) here is not hashed again; one that changed since, or that
    reads otherwise on this node, is."""
    for key, signature in signatures.items():
        _VERIFIED.setdefault(key, tuple(tuple(entry) for entry in signature))


def _signature(checkpoint_dir: Path) -> tuple:
    paths = [checkpoint_dir / COMPLETE_FILE, *_listed_files(checkpoint_dir)]
    return tuple((p.name, s.st_size, s.st_mtime_ns, s.st_ino) for p in paths for s in [p.stat()])


def damage_reason(checkpoint_dir: str | Path) -> str | None:
    """None when every file of a complete checkpoint has the sha256 its COMPLETE_FILE records and no file was
    added; else what is wrong, naming the file. Hashes the whole checkpoint (once per process while unchanged)."""
    checkpoint_dir = Path(checkpoint_dir)
    record = json.loads((checkpoint_dir / COMPLETE_FILE).read_text())
    sums = record.get("sha256")
    if not isinstance(sums, dict) or set(sums) != set(record["files"]):
        return f"{checkpoint_dir / COMPLETE_FILE} records no sha256 for every file: its content cannot be verified"
    paths = _listed_files(checkpoint_dir)
    for path in paths:
        if path.relative_to(checkpoint_dir).as_posix() not in sums:
            return f"{path} is not listed in {COMPLETE_FILE}: it was added after the save"
    key, signature = str(checkpoint_dir.resolve()), _signature(checkpoint_dir)
    if _VERIFIED.get(key) == signature:
        return None
    for path, digest in zip(paths, _hash_files(paths)):
        if digest != sums[path.relative_to(checkpoint_dir).as_posix()]:
            return f"{path} differs from the sha256 recorded when it was saved (damaged or modified)"
    _VERIFIED[key] = signature
    return None


def latest_checkpoint(run_or_checkpoint_dir: str | Path) -> Path:
    """A checkpoint folder itself, or the newest intact `checkpoint_*` folder of a run directory, its checksums
    verified: resume, export and evaluation all take this one. A damaged folder of a run directory is skipped with a
    DamagedCheckpointWarning naming the file; one named explicitly (or the only ones there are) is a CheckpointError.
    """
    path = Path(run_or_checkpoint_dir)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if (path / TAG_FILE).is_file() or (path / COMPLETE_FILE).is_file():  # a checkpoint folder itself
        reason = incomplete_reason(path)
        if reason is not None:
            raise CheckpointError(f"checkpoint {path} is incomplete: {reason}")
        reason = damage_reason(path)
        if reason is not None:
            raise CheckpointError(f"checkpoint {path} is damaged: {reason}")
        return path
    candidates = complete_checkpoints(path)
    if not candidates:
        raise CheckpointError(f"{path} holds no complete checkpoint (no checkpoint_* folder with {COMPLETE_FILE})")
    damaged = []
    for candidate in reversed(candidates):
        reason = damage_reason(candidate)
        if reason is None:
            return candidate
        damaged.append(reason)
        warnings.warn(f"skipping damaged checkpoint {candidate}: {reason}", DamagedCheckpointWarning, 2)
    raise CheckpointError(f"{path} holds no intact checkpoint: " + "; ".join(damaged))


def untrusted_reason(checkpoint_dir: str | Path) -> str | None:
    """Why unpickling this checkpoint's files could run someone else's code, or None: every file must be a regular
    file owned by the current user and writable by no one else (checksums say nothing here: whoever can write
    the files can rewrite COMPLETE_FILE too)."""
    checkpoint_dir = Path(checkpoint_dir)
    uid = os.geteuid()
    for path in [checkpoint_dir / COMPLETE_FILE, *sorted(checkpoint_dir.rglob("*"))]:
        if path.name.startswith(".") or path.is_dir():
            continue
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode):
            return f"{path} is not a regular file (a link?)"
        if info.st_uid != uid:
            return f"{path} belongs to {_user(info.st_uid)}, not to you ({_user(uid)})"
        if info.st_mode & 0o022:
            who = "group" if info.st_mode & 0o020 else "others"
            return f"{path} is writable by {who} (mode {stat.filemode(info.st_mode)})"
    return None


def _user(uid: int) -> str:
    try:
        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def check_trusted(checkpoint_dir: str | Path, trust: bool = False) -> None:
    """Refuse to resume from (unpickle) a checkpoint that is not the user's own, unless `trust` (--trust-checkpoint)."""
    reason = None if trust else untrusted_reason(checkpoint_dir)
    if reason is not None:
        raise CheckpointError(
            f"resuming from {checkpoint_dir} unpickles its DeepSpeed engine state, which runs any code planted in it, "
            f"and {reason}. Pass --trust-checkpoint to tarflow-train if you trust it, or start from its weights "
            f"alone with train.init_from={checkpoint_dir} (read without unpickling)"
        )


def read_run_config(checkpoint_dir: str | Path) -> RunConfig:
    """The resolved run config a checkpoint folder was written with (its config.yaml)."""
    path = Path(checkpoint_dir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{checkpoint_dir} has no {CONFIG_FILE}: not a tarflow_scale training checkpoint")
    return from_dict(RunConfig, yaml.safe_load(path.read_text()))


def checkpoint_tag(checkpoint_dir: str | Path) -> str:
    """The engine-state tag of a checkpoint folder ("" when it has none)."""
    path = Path(checkpoint_dir) / TAG_FILE
    return path.read_text().strip() if path.is_file() else ""


def strip_wrapper_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Parameter names as a plain TarFlow has them (without activation-checkpointing / torch.compile prefixes)."""
    out = {}
    for key, value in state.items():
        for prefix in _WRAPPER_PREFIXES:
            key = key.replace(prefix, "")
        out[key] = value
    return out


def consolidate(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """Full fp32 state dict from a checkpoint of any ZeRO stage, its checksums verified; read without unpickling
    (artifacts/zero_weights.py: the same tensors as DeepSpeed's zero_to_fp32)."""
    state = read_zero_weights(latest_checkpoint(checkpoint_dir))
    return {k: v.contiguous() for k, v in strip_wrapper_prefixes(state).items()}


def read_ema_weights(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """The EMA weights saved beside a checkpoint's engine state (CheckpointError naming the folder if absent)."""
    from safetensors.torch import load_file

    path = Path(checkpoint_dir) / EMA_FILE
    if not path.is_file():
        raise CheckpointError(f"{checkpoint_dir} has no EMA weights ({EMA_FILE}); train with optim.ema_decay>0")
    return load_file(path)
