"""What the command lines share: argparse types that refuse impossible numbers (argparse's one-line usage error,
exit code 2). The one line an OS error (a full disk, a read-only folder) becomes is atomic.py's."""

from __future__ import annotations

import argparse
from collections.abc import Callable


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
