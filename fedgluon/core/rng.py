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


SCALAR_BELOW = 12  # derive_seeds of at most this many rows calls derive_seed row by row (measured crossover)

# NumPy's SeedSequence constants (numpy/random/bit_generator.pyx), for the vectorised derive_seeds
_MASK = 0xFFFF_FFFF
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_L, _MIX_R, _POOL = 0xCA01F9DD, 0x4973F715, 4


def derive_seeds(*parts: int | str | Sequence[int] | np.ndarray) -> np.ndarray:
    """:func:`derive_seed` of many tuples at once: each part is shared (an int or purpose name) or one
    non-negative integer per row (a sequence of N); returns the N seeds as int64, equal to
    ``[derive_seed(*row) for row in rows]``.

    NumPy's ``SeedSequence(entropy).generate_state(2)`` vectorised over rows: the entropy words
    (32-bit pieces of each part, one for 0) are hashed into a pool of 4 words (``hashmix``), the
    pool words mixed with each other and with the remaining words (``mix``), and two output words
    drawn from the pool. Rows whose values need more than one word, and fewer than
    ``SCALAR_BELOW + 1`` rows (where the array calls cost more than they save), go through
    :func:`derive_seed`. Tests compare the two on random tuples."""
    columns = [np.asarray(p, dtype=np.int64) if not isinstance(p, (int, str, np.integer)) else None for p in parts]
    n = next((len(c) for c in columns if c is not None), 1)
    if any(c is not None and (c.ndim != 1 or len(c) != n) for c in columns):
        raise ValueError("per-row seed parts must be 1-D and of one length")
    if n <= SCALAR_BELOW or any(c is not None and ((c < 0).any() or (c > _MASK).any()) for c in columns):
        if any(c is not None and (c < 0).any() for c in columns):
            raise ValueError(f"seed parts must be non-negative, got {parts}")
        rows = zip(*[c.tolist() if c is not None else [p] * n for c, p in zip(columns, parts)])
        return np.array([derive_seed(*row) for row in rows], dtype=np.int64)
    entropy: list[int | np.ndarray] = []
    for c, p in zip(columns, parts):
        if c is not None:
            entropy.append(c.astype(np.uint64))
            continue
        assert isinstance(p, (int, str, np.integer))  # a shared part (no column)
        value = purpose_code(p) if isinstance(p, str) else int(p)
        if value < 0:
            raise ValueError(f"seed parts must be non-negative, got {parts}")
        entropy += _words(value)
    const = _INIT_A

    def hashmix(value):
        nonlocal const
        value = value ^ const
        const = (const * _MULT_A) & _MASK
        value = (value * const) & _MASK
        return value ^ (value >> 16)

    def mix(x, y):
        r = (_MIX_L * x - _MIX_R * y) & _MASK
        return r ^ (r >> 16)

    zeros = np.zeros(n, dtype=np.uint64)
    pool = [zeros + hashmix(entropy[i] if i < len(entropy) else 0) for i in range(_POOL)]
    for src in range(_POOL):
        for dst in range(_POOL):
            if src != dst:
                pool[dst] = mix(pool[dst], hashmix(pool[src]))
    for word in entropy[_POOL:]:
        for dst in range(_POOL):
            pool[dst] = mix(pool[dst], hashmix(word))
    out, const = [], _INIT_B
    for i in range(2):
        value = pool[i % _POOL] ^ const
        const = (const * _MULT_B) & _MASK
        value = (value * const) & _MASK
        out.append(value ^ (value >> 16))
    return (((out[0] << np.uint64(31)) ^ out[1]) & np.uint64(0x7FFF_FFFF_FFFF_FFFF)).astype(np.int64)


def _words(value: int) -> list[int]:
    """The 32-bit words of a non-negative integer, least significant first (one word for 0)."""
    words = [value & _MASK]
    while value > _MASK:
        value >>= 32
        words.append(value & _MASK)
    return words


def generator(*parts: int | str) -> torch.Generator:
    """A CPU generator seeded from ``derive_seed(*parts)``."""
    return torch.Generator(device="cpu").manual_seed(derive_seed(*parts))
