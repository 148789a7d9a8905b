"""Explicit, device-independent randomness (docs/DESIGN.md §2 "Randomness").

Every random draw in fedgluon comes from a CPU ``torch.Generator`` whose seed is derived from a
tuple of integers such as ``(run_seed, client_id, round, purpose)``, so results depend neither on
the device nor on the order in which clients are scheduled.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import torch

# Stable small integers for the purposes of draws (never reuse or renumber an entry).
PURPOSES = {"sample": 1, "compress": 2, "refresh": 3, "sketch": 4, "partition": 5, "init": 6,
            "quantise": 7, "powersgd": 8, "fault": 9, "participants": 10, "downlink": 11}


def purpose_code(purpose: str | int) -> int:
    """The integer code of a named purpose (unknown names are hashed with CRC32, stable across runs)."""
    if isinstance(purpose, int):
        return purpose
    return PURPOSES.get(purpose, zlib.crc32(purpose.encode()) + 1000)


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from integers/purpose names via NumPy's ``SeedSequence`` (well mixed, stable)."""
    entropy = [purpose_code(p) if isinstance(p, str) else int(p) for p in parts]
    if any(e < 0 for e in entropy):
        raise ValueError(f"seed parts must be non-negative, got {parts}")
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & 0x7FFF_FFFF_FFFF_FFFF


def derive_seeds(*parts: int | str | Sequence[int] | np.ndarray) -> np.ndarray:
    """:func:`derive_seed` of many tuples at once: each part is shared (an int or purpose name) or one
    non-negative integer per row (a sequence of N); returns the N seeds as int64,
    ``[derive_seed(*row) for row in rows]`` (NumPy's ``SeedSequence`` per row)."""
    columns = [np.asarray(p, dtype=np.int64) if not isinstance(p, (int, str, np.integer)) else None for p in parts]
    n = next((len(c) for c in columns if c is not None), 1)
    if any(c is not None and (c.ndim != 1 or len(c) != n) for c in columns):
        raise ValueError("per-row seed parts must be 1-D and of one length")
    rows = zip(*[c.tolist() if c is not None else [p] * n for c, p in zip(columns, parts)])
    return np.array([derive_seed(*row) for row in rows], dtype=np.int64)


def generator(*parts: int | str) -> torch.Generator:
    """A CPU generator seeded from ``derive_seed(*parts)``."""
    return torch.Generator(device="cpu").manual_seed(derive_seed(*parts))
