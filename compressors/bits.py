"""Bit accounting (docs/DESIGN.md §2 "Bits"): raw counts per message, every convention derived from them.

A :class:`BitCount` stores what was sent, not a convention: value bits (at the width the codec
actually uses), the number of indices with the ``⌈log2 d⌉`` and bitmask alternatives, seeds,
scalars (norms, scales), flags, and how many layers fell back to dense. Counts add up over layers,
clients and rounds. The conventions:

| convention | bits                                                | used by |
| ---------- | --------------------------------------------------- | ------- |
| values     | value + scalar + seed + flag bits (indices free)    | EF21 code |
| log2d      | values + Σ k_i ⌈log2 d_i⌉                           | "ideal" index coding |
| int32      | values + 32 per index                               | Flower DASHA/MARINA baseline (with fp32 values) |
| coo64      | values + 64 · ndim_i per index (PyTorch sparse COO) | |
| bitmask    | values + d_i per sparse layer                       | FLSim |
"""

from __future__ import annotations

from dataclasses import dataclass, fields

CONVENTIONS = ("values", "log2d", "int32", "coo64", "bitmask")


@dataclass(frozen=True)
class BitCount:
    """Raw counts of one message (or a sum of messages)."""

    value_bits: int = 0
    n_values: int = 0
    n_indices: int = 0
    index_bits_log2: int = 0
    coo_bits: int = 0
    bitmask_bits: int = 0
    seed_bits: int = 0
    scalar_bits: int = 0
    flag_bits: int = 0
    dense_fallbacks: int = 0

    def __add__(self, other: BitCount) -> BitCount:
        return BitCount(*[a + b for a, b in zip(self.counts(), other.counts())])

    def counts(self) -> tuple[int, ...]:
        """The raw counts in field order."""
        return tuple(getattr(self, name) for name in _FIELDS)

    def __radd__(self, other: object) -> BitCount:  # sum() starts from 0
        if other == 0:
            return self
        return NotImplemented

    @property
    def base(self) -> int:
        return self.value_bits + self.scalar_bits + self.seed_bits + self.flag_bits

    def total(self, convention: str = "int32") -> int:
        """Bits under one of :data:`CONVENTIONS`."""
        extra = {"values": 0, "log2d": self.index_bits_log2, "int32": 32 * self.n_indices,
                 "coo64": self.coo_bits, "bitmask": self.bitmask_bits}
        if convention not in extra:
            raise ValueError(f"bit convention must be one of {list(CONVENTIONS)}, got {convention!r}")
        return self.base + extra[convention]


_FIELDS = tuple(f.name for f in fields(BitCount))


def dense_bits(numel: int, width: int = 32) -> BitCount:
    """A dense tensor of ``numel`` values at ``width`` bits (e.g. a broadcast model)."""
    return BitCount(value_bits=numel * width, n_values=numel)
