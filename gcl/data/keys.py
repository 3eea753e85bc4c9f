"""Stable int64 keys for ids of any type, the same in every process and run."""

from __future__ import annotations

import hashlib

import numpy as np


def stable_keys(values: np.ndarray) -> np.ndarray:
    """int64 keys for ids: integers as they are, anything else by a stable 63-bit hash."""
    values = np.asarray(values)
    if values.dtype.kind in "iu":
        return values.astype(np.int64)
    out = np.empty(len(values), dtype=np.int64)
    for i, v in enumerate(values):
        digest = hashlib.blake2b(str(v).encode(), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF
    return out
