"""Atomic file writes: a temporary file in the destination folder, fsynced, then renamed over the final name.

A reader (a resumed run, an export, a second evaluation) sees either the old file or the whole new one, never a
half-written one; a full disk or a kill mid-write leaves at most a `.NAME.PID.tmp` file, removed on error. A write
that fails for a reason the user must act on (`is_storage_error`) becomes one line naming the path.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temp_path(path: str | Path, suffix: str = "") -> Path:
    """The temporary name `atomic_path` uses: hidden, per process, with `suffix` (some writers insist on one)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")


@contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path`, on error it is removed.

    `suffix` keeps writers that append an extension happy (np.savez adds `.npz` unless the name has it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path, suffix)
    try:
        yield tmp
        with open(tmp, "rb") as f:  # flush the data to disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


# Errors of the file system the user can act on (free space, fix permissions, choose another folder): one line
# naming the path, not a traceback.
STORAGE_ERRNOS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EEXIST,
}


def is_storage_error(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in STORAGE_ERRNOS


def storage_error_line(error: OSError) -> str:
    """`No space left on device: /runs/x/.config.yaml.123.tmp`: the OS's reason and the path it names."""
    where = error.filename or ""
    if error.filename2:
        where += f" -> {error.filename2}"
    reason = error.strerror or str(error)
    return f"{reason}: {where}" if where else reason
