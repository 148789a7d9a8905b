"""Payloads: what one client sends for one tensor, and the errors a decoder raises.

A :class:`TensorPayload` is plain data — a codec id ``"<structure>/<values>"`` (e.g. ``"topk/fp32"``,
``"randk_seeded/qsgd"``, ``"lowrank/fp16"``), the tensor's shape, NumPy arrays (indices, values,
factors, packed bits) and a few integer/float header fields (seeds, levels). Nothing in it is ever
pickled; the Flower adapter maps it to ``Array``/``ConfigRecord`` entries one to one.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class TensorPayload:
    """One tensor's compressed form (see module doc)."""

    codec: str
    shape: tuple[int, ...]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, int | float] = field(default_factory=dict)

    def nbytes(self) -> int:
        """Bytes of the arrays themselves (no container overhead)."""
        return int(sum(np.asarray(a).nbytes for a in self.arrays.values()))


Message = dict[str, TensorPayload]


@dataclass
class PayloadRows:
    """The payloads of B clients for one tensor: row i of every array, and entry i of every header list,
    are client i's. Every compressor encodes and decodes these (:meth:`compressors.Compressor.encode`);
    a single payload is a block of one (:meth:`of`)."""

    codec: str
    shape: tuple[int, ...]
    arrays: dict[str, np.ndarray]  # each (B, ·)
    meta: dict[str, list[int | float]] = field(default_factory=dict)  # each B entries

    def __len__(self) -> int:
        if self.arrays:
            return next(iter(self.arrays.values())).shape[0]
        return len(next(iter(self.meta.values()))) if self.meta else 0

    def payload(self, i: int) -> TensorPayload:
        """Client i's payload (its arrays are row views, contiguous)."""
        return TensorPayload(self.codec, self.shape, {k: a[i] for k, a in self.arrays.items()},
                             {k: v[i] for k, v in self.meta.items()})

    @classmethod
    def of(cls, payload: TensorPayload, shape: tuple[int, ...] | None = None) -> PayloadRows:
        """One payload as a block of one (array ``a`` as the view ``a[None]``; anything not an array as is,
        for the decoder's checks to reject)."""
        arrays, meta = payload.arrays, payload.meta
        return cls(payload.codec, tuple(payload.shape) if shape is None else shape,
                   {k: a[None] if isinstance(a, np.ndarray) else a for k, a in arrays.items()}
                   if isinstance(arrays, dict) else arrays,
                   {k: [v] for k, v in meta.items()} if isinstance(meta, dict) else meta)

    def take(self, rows: Sequence[int]) -> PayloadRows:
        """These rows (at least one), in the order given: views when they are consecutive."""
        rows = list(rows)
        consecutive = rows == list(range(rows[0], rows[0] + len(rows)))
        pick = slice(rows[0], rows[0] + len(rows)) if consecutive else np.asarray(rows)
        return PayloadRows(self.codec, self.shape, {k: a[pick] for k, a in self.arrays.items()},
                           {k: [v[i] for i in rows] for k, v in self.meta.items()})

    @classmethod
    def concat(cls, parts: list[PayloadRows]) -> PayloadRows:
        """The rows of ``parts`` (one codec and shape) in order, as one block."""
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        return cls(first.codec, first.shape, {k: np.concatenate([p.arrays[k] for p in parts]) for k in first.arrays},
                   {k: [v for p in parts for v in p.meta[k]] for k in first.meta})


class RowMessage(Mapping[str, TensorPayload]):
    """One client's message as row ``row`` of its block's payload group (``layers``: layer → the group's
    :class:`PayloadRows`), as a reply arrives: ``message[layer]`` is that row's payload. The server
    decodes the rows of one group together (:func:`compressors.decode_messages`)."""

    def __init__(self, layers: Mapping[str, PayloadRows], row: int):
        self.layers, self.row = layers, row

    def __getitem__(self, name: str) -> TensorPayload:
        return self.layers[name].payload(self.row)

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)


class PayloadError(ValueError):
    """A payload failed validation; ``layer`` and ``field`` say where."""

    kind = "invalid"

    def __init__(self, layer: str, field: str, reason: str):
        self.layer, self.field, self.reason = layer, field, reason
        super().__init__(f"{self.kind} payload for layer {layer!r}, field {field!r}: {reason}")


class CodecError(PayloadError):
    kind = "unknown or disallowed codec in"


class LayerSetError(PayloadError):
    kind = "wrong layer set in"


class ShapeError(PayloadError):
    kind = "wrong shape in"


class DtypeError(PayloadError):
    kind = "wrong dtype in"


class TruncatedError(PayloadError):
    kind = "truncated or mis-sized array in"


class IndexRangeError(PayloadError):
    kind = "index out of range in"


class DuplicateIndexError(PayloadError):
    kind = "duplicate or unsorted indices in"


class NonFiniteError(PayloadError):
    kind = "non-finite values in"


class RangeError(PayloadError):
    kind = "out-of-range values in"


class SizeError(PayloadError):
    kind = "oversized"


class MetaError(PayloadError):
    kind = "bad header in"
