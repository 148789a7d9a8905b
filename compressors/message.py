"""Layer-wise compression of a whole message (a dict of tensors), validated decoding and bits.

Layers are processed in sorted-name order, and layer ``i`` of a message gets the seed
``derive_seed(*seed_parts, i)`` where ``seed_parts`` is e.g. ``(run_seed, client_id, round)``, so
every draw is reproducible on any device and in any scheduling order (docs/DESIGN.md §2).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .bits import BitCount
from .operators import Compressor, Context, State
from .payload import LayerSetError, Message, PayloadError, PayloadRows, RangeError, SizeError, TensorPayload
from .sparse import SparseRows, SparseTensor

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
    rows, new_states = {}, [{} for _ in seed_parts]
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
