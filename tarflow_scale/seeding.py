"""Stable seeds derived from tuples of parts (Python's hash() is salted per process)."""

from __future__ import annotations

import hashlib


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any tuple of parts; the same in every process and Python run."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1
