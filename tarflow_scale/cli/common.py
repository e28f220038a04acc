"""What the command lines share: argparse types that refuse impossible numbers (argparse's one-line usage error,
exit code 2), and the one line an OS error (a full disk, a read-only folder) becomes."""

from __future__ import annotations

import argparse
import errno
from collections.abc import Callable

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


def int_at_least(minimum: int) -> Callable[[str], int]:
    """argparse `type=`: an integer >= minimum, e.g. `type=int_at_least(1)` for a batch size."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int >= {minimum}"  # argparse names the type in some messages
    return parse


def is_storage_error(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in STORAGE_ERRNOS


def storage_error_line(error: OSError) -> str:
    """`No space left on device: /runs/x/.config.yaml.123.tmp`: the OS's reason and the path it names."""
    where = error.filename or ""
    if error.filename2:
        where += f" -> {error.filename2}"
    reason = error.strerror or str(error)
    return f"{reason}: {where}" if where else reason
