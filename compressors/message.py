"""Layer-wise compression of a whole message (a dict of tensors), validated decoding and bits.

Layers are processed in sorted-name order, and layer ``i`` of a message gets the seed
``derive_seed(*seed_parts, i)`` where ``seed_parts`` is e.g. ``(run_seed, client_id, round)``, so
every draw is reproducible on any device and in any scheduling order (docs/DESIGN.md §2).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from .bits import BitCount
from .operators import Compressor, Context, State
from .sparse import SparseRows, SparseTensor
from .payload import LayerSetError, Message, PayloadError, PayloadRows, RangeError, SizeError, TensorPayload

DEFAULT_MAX_BYTES_FACTOR = 4  # a payload may be at most this many times its dense fp32 size (+ 1 KiB)


def compress_message(compressor: Compressor, tensors: Mapping[str, Tensor], seed_parts: tuple[int, ...],
                     states: Mapping[str, State] | None = None) -> tuple[Message, dict[str, State]]:
    """Compress every tensor; returns the message and the new per-layer compressor states."""
    message, new_states = {}, {}
    for i, name in enumerate(sorted(tensors)):
        ctx = Context(seed_parts=(*seed_parts, i), state=(states or {}).get(name))
        payload, state = compressor.compress(tensors[name], ctx)
        message[name] = payload
        if state is not None:
            new_states[name] = state
    return message, new_states


def compress_message_rows(compressor: Compressor, tensors: Mapping[str, Tensor]) -> dict[str, PayloadRows] | None:
    """:func:`compress_message` of B clients at once: ``tensors[name]`` is (B, *shape), row i client i's.
    Client i's message is ``{name: rows[name].payload(i)}``, equal to compressing its tensors alone
    (the compressors that support rows draw no seeds). None when a layer is not supported
    (:meth:`Compressor.compress_rows`): then compress client by client."""
    out = {}
    for name in sorted(tensors):
        rows = compressor.compress_rows(tensors[name])
        if rows is None:
            return None
        out[name] = rows
    return out


def split_rows(rows: Mapping[str, PayloadRows]) -> list[Message]:
    """The B per-client messages of :func:`compress_message_rows`' result."""
    names = list(rows)
    count = len(rows[names[0]]) if names else 0
    return [{n: rows[n].payload(i) for n in names} for i in range(count)]


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
                raise SizeError(name, "arrays", f"{nbytes} bytes for a tensor of "
                                                f"{4 * int(torch.Size(shapes[name]).numel())} dense bytes")
            total += nbytes
        out[name] = compressor.decompress(payload, shape=tuple(shapes[name]), layer=name, device=device, dtype=dtype,
                                        sparse=sparse)
        if max_abs is not None:
            _check_range(name, out[name], max_abs)
    if max_bytes is not None and total > max_bytes:
        raise SizeError("*", "message", f"{total} bytes exceeds the cap of {max_bytes}")
    return out


def decode_messages(compressor: Compressor, messages: Mapping[int, Any], shapes: Mapping[str, tuple], *,
                    device: torch.device | str | None = None, dtype: torch.dtype = torch.float32, sparse: bool = False,
                    max_abs: float | None = None
                    ) -> Iterator[tuple[int, dict[str, Tensor | SparseTensor] | PayloadError]]:
    """:func:`decode_message` of many clients' messages: yields ``(j, decoded)`` or ``(j, error)`` for each
    ``j`` in ``messages``' order, the same results and the same errors as decoding them one by one.

    The layers :meth:`Compressor.decompress_block` handles (top-k, rand-k with raw values) are
    checked and decoded for all clients at once, up front, each client's layer a row of one
    :class:`~compressors.sparse.SparseRows` (dense when not ``sparse``). Messages that fail a block
    check, and all of them when a layer has no block decoder, go through :func:`decode_message` one at
    a time as they are reached, so a consumer that drops what it cannot keep never holds every
    dense decoded message at once."""
    expected = set(shapes)
    regular = [j for j, m in messages.items() if isinstance(m, Mapping) and len(m) == len(expected) and set(m) == expected]
    layers: dict[str, SparseRows] = {}
    slow: set[int] = set()
    for name in sorted(shapes):
        shape = tuple(shapes[name])
        block = compressor.decompress_block([messages[j][name] for j in regular], shape, device=device, dtype=dtype,
                                            max_nbytes=max_layer_bytes(shape)) if regular else None
        if block is None:
            regular, layers = [], {}
            break
        layers[name], ok = block
        if max_abs is not None and layers[name].values.shape[1]:  # a row over the bound fails in decode_message
            ok = ok & (layers[name].values.abs().amax(dim=1) <= max_abs).cpu().numpy()
        slow.update(j for j, good in zip(regular, ok.tolist()) if not good)
    row = {j: i for i, j in enumerate(regular) if j not in slow}
    for j in messages:
        if j in row:
            i = row[j]
            yield j, {n: rows.tensor(i) if sparse else rows.tensor(i).dense() for n, rows in layers.items()}
            continue
        try:
            decoded = decode_message(compressor, messages[j], shapes, device=device, dtype=dtype, sparse=sparse,
                                     max_abs=max_abs)
        except PayloadError as err:
            yield j, err
        else:
            yield j, decoded


def _check_range(name: str, tensor: Tensor | SparseTensor, max_abs: float) -> None:
    values = tensor.values if isinstance(tensor, SparseTensor) else tensor
    if values.numel() and float(values.abs().max()) > max_abs:
        raise RangeError(name, "values", f"|v| up to {float(values.abs().max()):.4g}, the bound is {max_abs:.4g}")


def message_bits(compressor: Compressor, message: Mapping[str, TensorPayload]) -> BitCount:
    """Raw bit counts of a (valid) message: :meth:`Compressor.message_bits`."""
    return compressor.message_bits(message)
