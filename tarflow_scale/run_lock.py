"""One process at a time per output folder (a run directory, an evaluation's or a sampler's output): the folder is
created, proven writable and locked by a file naming its holder (host, pid, start time, command).

    with lock_output_dir(out, f"--out {out}"):   # OutputDirError (a ConfigError: exit code 2) naming the holder
        ...write into out...

The lock is a file created by hard-linking a complete temporary file to `<folder>/.tarflow.lock`: the link fails if the
name exists, atomically on local disks and NFS alike, and the file always holds a whole record to name the holder.
(flock/fcntl locks record no holder to print, and on NFS mounted with `nolock`, common on clusters, they lock
only within one host; filelock's SoftFileLock records no command or start time and takes over silently.)

A lock left by a killed process is stale: on its host, a pid that no longer runs (or runs a later process: the
start time in /proc differs) is taken over with a warning, so re-running a crashed command resumes. A lock from
another host cannot be checked from here: it is refused, with the command that removes it if the user is sure.
Only the process that took the lock holds it: Ray workers and DataLoader processes write into the folder freely.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shlex
import socket
import sys
import uuid
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from .config import ConfigError

LOCK_NAME = ".tarflow.lock"


class OutputDirError(ConfigError):
    """An output folder that cannot be used: not creatable or writable, or locked by another process."""


@dataclass(frozen=True)
class LockHolder:
    """What `.lock` records about the process holding a folder."""

    host: str
    pid: int
    started: str  # UTC, ISO 8601
    command: str
    token: str  # unique per lock taken: a release removes only its own file
    pid_start: int | None = None  # the process's start time in clock ticks since boot (/proc/PID/stat), Linux only

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host} (since {self.started}: {self.command})"


def _process_start(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat: when the process started, in clock ticks since boot; None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _is_running(holder: LockHolder) -> bool:
    """On this host: does the holder's process still run? A reused pid (another start time) does not count."""
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    start = _process_start(holder.pid)
    return holder.pid_start is None or start is None or start == holder.pid_start


def _read_holder(path: Path) -> LockHolder | None:
    """The record in a lock file; None when the file is gone or holds no readable record."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return LockHolder(**data)
    except (OSError, ValueError, TypeError):  # FileNotFoundError included: the holder has just released it
        return None


class OutputLock:
    """The lock on one folder; `acquire()` takes it or raises OutputDirError naming the holder."""

    def __init__(self, folder: str | Path, label: str, command: str | None = None):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.label = label  # how messages name the folder, e.g. "run_dir=/runs/x" or "--out /evals/y"
        self.command = command if command is not None else shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
        self.holder: LockHolder | None = None  # ours, once taken
        self.created = False  # the folder was made for this lock: a failed command removes it again if still empty

    def _record(self) -> LockHolder:
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        pid = os.getpid()
        return LockHolder(socket.gethostname(), pid, now, self.command, uuid.uuid4().hex, _process_start(pid))

    def acquire(self) -> OutputLock:
        mine = self._record()
        tmp = self.folder / f"{LOCK_NAME}.{mine.host}.{mine.pid}.{mine.token[:8]}.tmp"
        try:
            tmp.write_text(json.dumps(asdict(mine)) + "\n", encoding="utf-8")
            for _ in range(3):  # a stale lock removed, then the link retried
                try:
                    os.link(tmp, self.path)
                except FileExistsError:
                    # NFS: a retried link whose first reply was lost fails although it worked; the count shows it.
                    if os.stat(tmp).st_nlink != 2:
                        self._remove_if_stale()
                        continue
                self.holder = mine
                return self
        except OSError as e:
            raise OutputDirError(f"{self.label} is not writable: {e.strerror or e}") from None
        finally:
            tmp.unlink(missing_ok=True)
        raise OutputDirError(f"{self.label}: could not take {self.path}: other processes keep taking it")

    def _remove_if_stale(self) -> None:
        """Remove the existing lock file if its holder is gone; raise OutputDirError naming a live or remote one."""
        holder = _read_holder(self.path)
        if holder is None:
            if not self.path.exists():
                return  # released meanwhile: take it
            raise OutputDirError(
                f"{self.label} is locked by {self.path}, which names no holder; if no process uses the folder, "
                f"remove it (rm {shlex.quote(str(self.path))}) and re-run"
            )
        if holder.host != socket.gethostname():
            raise OutputDirError(
                f"{self.label} is in use by {holder.describe()}; this host cannot tell whether it still runs. "
                f"If you are sure it does not, remove the lock (rm {shlex.quote(str(self.path))}) and re-run"
            )
        if _is_running(holder):
            raise OutputDirError(
                f"{self.label} is in use by {holder.describe()}; wait for it to finish or stop it, or choose "
                "another folder"
            )
        # The holder died without releasing (a kill, a crash). Takers of the same stale file serialise on its
        # flock, and only the one that still finds that very file under the name removes it.
        with contextlib.suppress(FileNotFoundError), open(self.path, "rb") as f:
            with _flocked(f):
                if os.path.samestat(os.fstat(f.fileno()), os.stat(self.path)) and _read_holder(self.path) == holder:
                    self.path.unlink()
                    warnings.warn(
                        f"{self.label}: taking over the lock of {holder.describe()}, which no longer runs",
                        stacklevel=4,
                    )

    def release(self) -> None:
        """Remove the lock file if it is still ours (someone may have removed it by hand and taken it since)."""
        if self.holder is not None:
            if _read_holder(self.path) == self.holder:
                self.path.unlink(missing_ok=True)
            self.holder = None

    def __enter__(self) -> OutputLock:
        return self if self.holder is not None else self.acquire()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release()
        if exc_type is not None and self.created:
            with contextlib.suppress(OSError):  # not empty: something worth keeping was written
                self.folder.rmdir()


@contextlib.contextmanager
def _flocked(f):
    try:
        import fcntl

        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    except (ImportError, OSError):  # no flock here (another OS, a file system without it): the race is tiny
        yield
        return
    try:
        yield
    finally:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def prepare_output_dir(folder: str | Path, label: str) -> Path:
    """Create `folder` (and its parents) and prove it writable, before any work is done for it; OutputDirError
    naming `label` otherwise (a file in the way, a read-only file system, a full disk, no permission)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputDirError(f"{label} is a file, not a folder")
    probe = folder / f".write_test.{socket.gethostname()}.{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok\n")
        probe.unlink()
    except OSError as e:
        raise OutputDirError(f"{label} is not writable: {e.strerror or e}") from None
    return folder


def lock_output_dir(folder: str | Path, label: str, command: str | None = None) -> OutputLock:
    """Create `folder`, prove it writable and take its lock (released by `release()` or leaving a `with` block;
    a `with` block left by an exception also removes the folder again if this call created it and it is empty).

    `label` names the folder in messages the way the user gave it (`run_dir=/runs/x`, `--out /evals/y`);
    `command` is recorded for whoever finds the folder locked (default: this process's command line).
    """
    created = not Path(folder).exists()
    prepare_output_dir(folder, label)
    lock = OutputLock(folder, label, command)
    lock.created = created
    try:
        return lock.acquire()
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                lock.folder.rmdir()
        raise
