"""Layer-wise compression of a whole message (a dict of tensors) and its validated decoding.

Layers are processed in sorted-name order, and layer ``i`` of a message gets the seed
``derive_seed(*seed_parts, i)`` where ``seed_parts`` is e.g. ``(run_seed, client_id, round)``, so
every draw is reproducible on any device and in any scheduling order (docs/DESIGN.md §2).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from compressors.operators import Compressor, Context, State
from compressors.payload import (
    LayerSetError,
    Message,
    PayloadError,
    PayloadRows,
    RangeError,
    RowMessage,
    SizeError,
    TensorPayload,
)
from compressors.sparse import SparseRows, SparseTensor
from fedgluon.core.text import shown

DEFAULT_MAX_BYTES_FACTOR = 4  # a payload may be at most this many times its dense fp32 size (+ 1 KiB)


def contexts(compressor: Compressor, seed_parts: Sequence[tuple[int, ...]], layer: int, name: str,
             states: Sequence[Mapping[str, State] | None] | None) -> list[Context] | None:
    """Each row's :class:`Context` for layer number ``layer`` (sorted-name order) called ``name``: seed
    ``derive_seed(*seed_parts[i], layer)`` and state ``states[i][name]``; None when the compressor reads
    neither (deterministic, stateless)."""
    if not compressor.draws:
        return None
    states = states if states is not None else [None] * len(seed_parts)
    return [Context(seed_parts=(*p, layer), state=(s or {}).get(name)) for p, s in zip(seed_parts, states)]


def compress_block(compressor: Compressor, tensors: Mapping[str, Tensor], seed_parts: Sequence[tuple[int, ...]],
                   states: Sequence[Mapping[str, State] | None] | None = None
                   ) -> tuple[dict[str, PayloadRows], list[dict[str, State]]]:
    """Compress every layer of B clients: ``tensors[name]`` is (B, *shape), row i client i's, whose seeds
    come from ``seed_parts[i]`` and states from ``states[i]``; returns the payload rows per layer (sorted
    names) and each client's new compressor states (the layers that have one)."""
    rows: dict[str, PayloadRows] = {}
    new_states: list[dict[str, State]] = [{} for _ in seed_parts]
    for i, name in enumerate(sorted(tensors)):
        rows[name], layer_states = compressor.encode(tensors[name], contexts(compressor, seed_parts, i, name,
                                                                                     states))
        for new, state in zip(new_states, layer_states):
            if state is not None:
                new[name] = state
    return rows, new_states


def compress_message(compressor: Compressor, tensors: Mapping[str, Tensor], seed_parts: tuple[int, ...],
                     states: Mapping[str, State] | None = None) -> tuple[Message, dict[str, State]]:
    """:func:`compress_block` of one client: its message and new per-layer compressor states."""
    rows, new_states = compress_block(compressor, {n: t.unsqueeze(0) for n, t in tensors.items()}, [seed_parts],
                                      [states])
    return {n: r.payload(0) for n, r in rows.items()}, new_states[0]


def max_layer_bytes(shape: tuple[int, ...]) -> int:
    """The most bytes of arrays a payload for a tensor of ``shape`` may carry."""
    return DEFAULT_MAX_BYTES_FACTOR * 4 * int(torch.Size(shape).numel()) + 1024


def decode_message(compressor: Compressor, message: Mapping[str, TensorPayload], shapes: Mapping[str, tuple],
                   *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                   max_bytes: int | None = None, sparse: bool = False,
                   max_abs: float | None = None) -> dict[str, Tensor | SparseTensor]:
    """Validate and decode a message against the expected layer shapes; raises a PayloadError.

    Checks: the layer set, each payload's codec/shape/arrays/header/indices/finiteness, and sizes
    (each layer at most ``DEFAULT_MAX_BYTES_FACTOR``× its dense fp32 size, the message at most
    ``max_bytes`` when given); with ``max_abs``, every decoded value ``|v| <= max_abs``
    (:class:`~compressors.payload.RangeError`). With ``sparse``, sparse layers come back as
    :class:`~compressors.sparse.SparseTensor`.
    """
    if not isinstance(message, Mapping):
        raise LayerSetError("*", "message", f"expected a mapping of layers, got {type(message).__name__}")
    names = set(message)
    expected = set(shapes)
    if names != expected:
        missing, extra = sorted(expected - names), sorted(map(str, names - expected))
        raise LayerSetError("*", "layers", f"missing {missing}, unexpected {extra}")
    total = 0
    out = {}
    for name in sorted(shapes):
        payload = message[name]
        if isinstance(payload, TensorPayload):
            nbytes = payload.nbytes() if isinstance(payload.arrays, dict) else 0
            if nbytes > max_layer_bytes(shapes[name]):
                dense = 4 * int(torch.Size(shapes[name]).numel())
                raise SizeError(name, "arrays", f"{nbytes} bytes for a tensor of {dense} dense bytes")
            total += nbytes
        out[name] = compressor.decompress(payload, shape=tuple(shapes[name]), layer=name, device=device, dtype=dtype,
                                        sparse=sparse)
        if max_abs is not None:
            _check_range(name, out[name], max_abs)
    if max_bytes is not None and total > max_bytes:
        raise SizeError("*", "message", f"{total} bytes exceeds the cap of {max_bytes}")
    return out


CHUNK_BYTES = 64 * 2 ** 20  # the most dense bytes one call of decode_messages decodes at once


UNREADABLE = (ValueError, TypeError, ArithmeticError)
"""What a client's value that defeats a check may make decoding raise besides PayloadError (an integer too
wide to print or to convert, a wrong type): :func:`decode_messages` makes it that message's PayloadError, so
a bad message never stops the others. Anything else is fedgluon's own bug and propagates."""


def decode_messages(compressor: Compressor, messages: Mapping[int, Any], shapes: Mapping[str, tuple], *,
                    device: torch.device | str | None = None, dtype: torch.dtype = torch.float32, sparse: bool = False,
                    max_abs: float | None = None
                    ) -> Iterator[tuple[int, dict[str, Tensor | SparseTensor] | PayloadError]]:
    """:func:`decode_message` of many clients' messages: yields ``(j, decoded)`` or ``(j, error)`` for each
    ``j`` in ``messages``' order, the same results and the same errors as decoding them one by one.

    Messages that are rows of payload groups (:class:`~compressors.payload.RowMessage`: blocks' replies
    as they arrive) are checked and decoded a chunk of rows at a time, rows of every group of one
    layout stacked (:func:`_chunks`), one :meth:`Compressor.decode_rows` per layer: every row at once
    when the decoded layers are sparse, else as many rows as :data:`CHUNK_BYTES` of dense tensors hold,
    so a consumer that drops what it cannot keep never holds every dense decoded message at once. A
    chunk that fails any check is decoded message by message, which gives each bad message its own
    error."""
    chunk_of = _chunks(compressor, messages, shapes, sparse)
    pending: dict[int, dict[str, Tensor | SparseTensor] | None] = {}
    options: dict[str, Any] = {"device": device, "dtype": dtype, "sparse": sparse, "max_abs": max_abs}
    for j in messages:
        if j in chunk_of and j not in pending:
            chunk = chunk_of[j]
            try:
                pending.update(zip(chunk, _decode_chunk(compressor, [messages[i] for i in chunk], shapes, **options)))
            except UNREADABLE:
                pending.update(dict.fromkeys(chunk))  # None: one by one below
        decoded = pending.pop(j, None)
        if decoded is None:
            try:
                decoded = decode_message(compressor, messages[j], shapes, **options)
            except PayloadError as err:
                yield j, err
                continue
            except UNREADABLE as err:  # a check this module lacks: still that message's rejection, not a crash
                why = f"cannot be decoded ({type(err).__name__}: {shown(err, 200, as_repr=False)})"
                yield j, PayloadError("*", "payload", why)
                continue
        yield j, decoded


def _chunks(compressor: Compressor, messages: Mapping[int, Any], shapes: Mapping[str, tuple],
            sparse: bool) -> dict[int, list[int]]:
    """Client → the chunk of rows it is decoded with: rows of payload groups whose layers have the same
    codecs, shapes, array dtypes and row shapes and header keys (:func:`_layout`: so their rows stack
    without a conversion, and a block of one client's group joins the others), every row at once when
    the decoded layers are sparse, else :data:`CHUNK_BYTES` of dense tensors at a time."""
    layouts: dict[int, tuple | None] = {}
    classes: dict[tuple, list[int]] = {}
    for j, m in messages.items():
        if isinstance(m, RowMessage):
            key = id(m.layers)
            if key not in layouts:
                layouts[key] = _layout(m.layers, shapes)
            layout = layouts[key]
            if layout is not None:
                classes.setdefault(layout, []).append(j)
    dense = sum(torch.Size(s).numel() * 4 for s in shapes.values() if not (sparse and compressor.sparse_rows(tuple(s))))
    size = max(1, CHUNK_BYTES // dense) if dense else len(messages)
    out: dict[int, list[int]] = {}
    for js in classes.values():
        for start in range(0, len(js), size):
            chunk = js[start:start + size]
            out.update(dict.fromkeys(chunk, chunk))
    return out


def _layout(layers: Mapping[str, PayloadRows], shapes: Mapping[str, tuple]) -> tuple | None:
    """What rows of ``layers`` must share to be stacked with other groups' rows; None when they cannot be
    (another layer set, arrays that are not NumPy arrays): those are decoded one by one."""
    if set(layers) != set(shapes):
        return None
    out = []
    for name in sorted(shapes):
        rows = layers[name]
        if not isinstance(rows.arrays, dict) or not isinstance(rows.meta, dict) or \
                not all(isinstance(a, np.ndarray) and a.ndim >= 1 for a in rows.arrays.values()):
            return None
        out.append((name, rows.codec, tuple(rows.shape), tuple(sorted(rows.meta)),
                    tuple(sorted((k, a.dtype.str, a.shape[1:]) for k, a in rows.arrays.items()))))
    return tuple(out)


def _runs(messages: Sequence[RowMessage]) -> list[tuple[Mapping[str, PayloadRows], list[int]]]:
    """The messages as runs of consecutive rows of one group each, in order: ``(group layers, rows)``."""
    runs: list[tuple[Mapping[str, PayloadRows], list[int]]] = []
    for m in messages:
        if runs and runs[-1][0] is m.layers and runs[-1][1][-1] + 1 == m.row:
            runs[-1][1].append(m.row)
        else:
            runs.append((m.layers, [m.row]))
    return runs


def _decode_chunk(compressor: Compressor, messages: Sequence[RowMessage], shapes: Mapping[str, tuple], *,
                  device: torch.device | str | None, dtype: torch.dtype, sparse: bool,
                  max_abs: float | None) -> list[dict[str, Tensor | SparseTensor]]:
    """Rows of payload groups decoded together; a PayloadError when any of them fails a check."""
    out: list[dict[str, Tensor | SparseTensor]] = [{} for _ in messages]
    runs = _runs(messages)
    for name in sorted(shapes):
        shape = tuple(shapes[name])
        block = PayloadRows.concat([layers[name].take(rows) for layers, rows in runs])  # row i: message i's
        nbytes = sum(a.nbytes for a in block.arrays.values())
        if nbytes > len(messages) * max_layer_bytes(shape):
            raise SizeError(name, "arrays", "a row is over the size bound")
        decoded = compressor.decode_rows(block, shape=shape, layer=name, device=device, dtype=dtype, sparse=sparse)
        values = decoded.values if isinstance(decoded, SparseRows) else decoded.reshape(len(messages), -1)
        # not (|v| <= bound): a NaN, which compares False, is over it too (finite factors can multiply to NaN)
        if max_abs is not None and values.shape[1] and not bool((values.abs().amax(dim=1) <= max_abs).all()):
            raise RangeError(name, "values", f"a row is over the bound {max_abs:.4g}")
        for i, d in enumerate(out):
            d[name] = decoded.tensor(i) if isinstance(decoded, SparseRows) else decoded[i]
    return out


def _check_range(name: str, tensor: Tensor | SparseTensor, max_abs: float) -> None:
    values = tensor.values if isinstance(tensor, SparseTensor) else tensor
    if values.numel() and not float(values.abs().max()) <= max_abs:  # NaN included
        raise RangeError(name, "values", f"|v| up to {float(values.abs().max()):.4g}, the bound is {max_abs:.4g}")
