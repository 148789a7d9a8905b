"""Conversion between fedgluon's payloads / states and Flower records (the only Flower-aware code
for payloads, DESIGN §1).

A node simulates a block of clients (fedgluon/blocks.py), so what travels is packed per *block*, not
per client: every Flower ``Array`` and record entry costs tens of µs to build and to read, which made
per-client records the main cost of a block. A :class:`Packer` record holds two Arrays:

* ``layout`` — UTF-8 JSON describing every client of the block; each array in it is a reference
  ``[dtype, shape, offset]`` into
* ``data`` — the arrays' raw little-endian bytes, concatenated, each starting at a multiple of 8;
  the same memory added twice (``x_prev``: the round's model, which every client of a block keeps)
  is written once and referenced twice.

The server → node message carries the sampled clients' committed states
(:func:`states_to_record`: ``{"states": {j: [[path, ref], ...] | null}}``); the node's reply carries,
per client, its metrics, payload and proposed state (:func:`replies_to_record`: ``{"clients": {j:
{"client", "round", "loss", "grad_evals", "samples", "payload": {layer: {"codec", "shape", "meta",
"arrays": {key: ref}}}, "state": [[path, ref], ...] | null}}}``). The model travels as an ``ArrayRecord``
with one ``Array`` per tensor (:func:`tensors_to_record`).

Every ``Array`` holds raw little-endian bytes (``stype = "fedgluon.raw"``) of a dtype from a fixed
list of numeric types, checked against its shape (and references against the data's bounds and
alignment) on reading; nothing a client sends is ever unpickled. Server-side reading
(:class:`BlockReplies`) turns anything malformed in client j's entry into a
:class:`compressors.PayloadError` for j alone; a malformed layout or data rejects the whole block.
Committed states are copied out of the block's buffer, one buffer per client (references several
states share, once, shared again), so a committed state never keeps the whole block's buffer alive.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import Tensor

from compressors import Message, PayloadError, TensorPayload
from fedgluon.algorithms.base import ClientReply

SEP = "/"
RAW = "fedgluon.raw"
# dtype names an Array may carry -> little-endian NumPy dtype (bfloat16 travels as its int16 bit pattern)
DTYPES = {name: np.dtype(name).newbyteorder("<") for name in
          ("bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "int64", "float16", "float32", "float64")}
DTYPES["bfloat16"] = np.dtype("<i2")


TORCH_NAMES = {torch.bool: "bool", torch.uint8: "uint8", torch.int8: "int8", torch.uint16: "uint16",
               torch.int16: "int16", torch.uint32: "uint32", torch.int32: "int32", torch.int64: "int64",
               torch.float16: "float16", torch.float32: "float32", torch.float64: "float64",
               torch.bfloat16: "bfloat16"}


def _raw(a: np.ndarray | Tensor) -> tuple[str, tuple[int, ...], bytes]:
    """(dtype name, shape, little-endian bytes) of an array or tensor of an allowed dtype."""
    name, b = _little_endian(a)
    return name, tuple(b.shape), b.tobytes()


def _little_endian(a: np.ndarray | Tensor) -> tuple[str, np.ndarray]:
    """(dtype name, a C-contiguous little-endian array of the values), without a copy when ``a``
    already is one (a CPU tensor shares its memory)."""
    if isinstance(a, Tensor):
        name = TORCH_NAMES.get(a.dtype)
        if name is None:
            raise TypeError(f"cannot send a tensor of dtype {a.dtype}; allowed: {sorted(DTYPES)}")
        t = a.detach().cpu().contiguous()
        a = (t.view(torch.int16) if name == "bfloat16" else t).numpy()
    else:
        name = a.dtype.name
        if name not in DTYPES:
            raise TypeError(f"cannot send an array of dtype {a.dtype}; allowed: {sorted(DTYPES)}")
    if a.dtype != DTYPES[name] or not a.flags.c_contiguous:  # big-endian or strided
        a = np.ascontiguousarray(a, dtype=DTYPES[name])
    return name, a


def _checked(name: Any, shape: Any) -> tuple[np.dtype, tuple[int, ...]]:
    """(dtype, shape) of an array header, or ``ValueError``."""
    dtype = DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise ValueError(f"array dtype must be one of {sorted(DTYPES)}, got {name!r}")
    shape = tuple(shape) if isinstance(shape, (tuple, list)) else None
    if shape is None or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ValueError(f"array shape must be non-negative integers, got {shape!r}")
    return dtype, shape


def _unraw(name: Any, shape: Any, data: Any) -> np.ndarray:
    """Inverse of :func:`_raw` (a writable copy); ``ValueError`` on bad input."""
    dtype, shape = _checked(name, shape)
    size = math.prod(shape) * dtype.itemsize
    if not isinstance(data, bytes) or len(data) < size:
        raise ValueError(f"array of shape {shape} and dtype {name} needs {size} bytes, "
                         f"got {len(data) if isinstance(data, bytes) else type(data).__name__}")
    return np.frombuffer(data, dtype=dtype, count=math.prod(shape)).reshape(shape).astype(dtype.newbyteorder("="))


def _as_tensor(name: str, a: np.ndarray) -> Tensor:
    t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if name == "bfloat16" else t


def to_array(a: np.ndarray | Tensor) -> Array:
    """A NumPy array or tensor as a raw-bytes Flower ``Array`` (module docstring)."""
    name, shape, data = _raw(a)
    return Array(dtype=name, shape=shape, stype=RAW, data=data)


def from_array(arr: Array) -> np.ndarray:
    """The NumPy array of a raw-bytes ``Array`` (a writable copy); ``ValueError`` on anything else."""
    if not isinstance(arr, Array) or arr.stype != RAW:
        raise ValueError(f"expected an Array with stype {RAW!r}, got {getattr(arr, 'stype', type(arr).__name__)!r}")
    out = _unraw(arr.dtype, arr.shape, arr.data)
    if len(arr.data) != out.nbytes:
        raise ValueError(f"array of shape {out.shape} and dtype {arr.dtype} needs {out.nbytes} bytes, got {len(arr.data)}")
    return out


def _tensor(arr: Array) -> Tensor:
    return _as_tensor(arr.dtype, from_array(arr))


def tensors_to_record(tensors: Mapping[str, Tensor]) -> ArrayRecord:
    return ArrayRecord({k: to_array(t) for k, t in tensors.items()})


def record_to_tensors(record: ArrayRecord) -> dict[str, Tensor]:
    return {k: _tensor(record[k]) for k in record.keys()}


ALIGN = 8  # every array of a packed record starts at a multiple of 8 bytes (views of any dtype are aligned)
Ref = list  # [dtype name, shape, offset]


class Packer:
    """Arrays appended to one byte buffer, each referenced by ``[dtype, shape, offset]`` (module doc)."""

    def __init__(self) -> None:
        self.chunks: list[bytes | memoryview] = []  # views keep their arrays alive until record()
        self.size = 0
        self.seen: dict[tuple, Ref] = {}  # the same memory (e.g. x_prev, the broadcast model every client
        # of a round keeps) is written once and referenced by every state that holds it

    def add(self, a: np.ndarray | Tensor) -> Ref:
        key = _memory(a)
        if key in self.seen:
            return self.seen[key]
        name, b = _little_endian(a)
        ref = [name, list(b.shape), self.size]
        data = memoryview(b.reshape(-1)).cast("B") if b.size else b""  # copied once, by record()'s join
        pad = -b.nbytes % ALIGN
        self.chunks += [data, bytes(pad)] if pad else [data]
        self.size += b.nbytes + pad
        self.seen[key] = ref
        return ref

    def tree(self, state: Mapping[str, Any] | None) -> list[list[Any]] | None:
        """A nested state as ``[[path, ref], ...]`` (paths ``/``-joined; an empty sub-dict is the path
        with a trailing ``/`` and no array), None for no state."""
        if state is None:
            return None
        out: list[list[Any]] = []
        for path, t in _flatten(state):
            out.append([path, None if t is None else self.add(t)])
        return out

    def record(self, layout: Any) -> ArrayRecord:
        text = np.frombuffer(json.dumps(layout).encode(), dtype=np.uint8)
        return ArrayRecord({"layout": to_array(text), "data": Array(dtype="uint8", shape=(self.size,), stype=RAW,
                                                                    data=b"".join(self.chunks))})


def _memory(a: np.ndarray | Tensor) -> tuple:
    """Where an array's elements lie (two arrays with the same key hold the same values)."""
    if isinstance(a, Tensor):
        return ("torch", str(a.device), a.data_ptr(), str(a.dtype), tuple(a.shape), a.stride())
    return ("numpy", a.__array_interface__["data"][0], a.dtype.str, a.shape, a.strides)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Tensor | None]]:
    out: list[tuple[str, Tensor | None]] = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out += _flatten(value, path + SEP) if value else [(path + SEP, None)]
        else:
            out.append((path, value))
    return out


class Unpacker:
    """Reads a :class:`Packer` record: the parsed layout, and arrays by reference (views of one
    writable copy of the data). ``ValueError`` on anything malformed."""

    def __init__(self, record: Any):
        if not isinstance(record, ArrayRecord) or set(record.keys()) != {"layout", "data"}:
            raise ValueError("expected an ArrayRecord with the Arrays 'layout' and 'data'")
        self.layout = json.loads(from_array(record["layout"]).tobytes().decode())
        data = record["data"]
        if not isinstance(data, Array) or data.stype != RAW or not isinstance(data.data, bytes):
            raise ValueError("packed data must be a raw-bytes Array")
        self.buffer = np.frombuffer(data.data, dtype=np.uint8).copy()

    def array(self, ref: Any) -> np.ndarray:
        """The array ``ref`` points at (a view of the buffer)."""
        if not isinstance(ref, list) or len(ref) != 3:
            raise ValueError(f"an array reference is [dtype, shape, offset], got {ref!r}")
        name, shape, offset = ref
        dtype, shape = _checked(name, shape)
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0 or offset % ALIGN:
            raise ValueError(f"array offset must be a non-negative multiple of {ALIGN}, got {offset!r}")
        size = math.prod(shape) * dtype.itemsize
        if offset + size > self.buffer.size:
            raise ValueError(f"array of shape {shape} and dtype {name} needs {size} bytes at offset {offset}, "
                             f"the data has {self.buffer.size}")
        a = self.buffer[offset:offset + size].view(dtype).reshape(shape)
        return a if dtype.isnative else a.astype(dtype.newbyteorder("="))

    def tree(self, entries: Any, copy: bool = False, shared: dict[str, np.ndarray | None] | None = None
             ) -> dict[str, Any] | None:
        """Inverse of :meth:`Packer.tree`; with ``copy`` the leaves are views of one new buffer of their
        own (so a committed state does not keep the block's buffer alive), except references listed in
        ``shared`` (``json.dumps(ref)`` → its copy, None until first copied): those are copied once and
        shared by every state that refers to them."""
        if entries is None:
            return None
        if not isinstance(entries, list) or not all(isinstance(e, list) and len(e) == 2 and isinstance(e[0], str)
                                                    for e in entries):
            raise ValueError("a packed state is a list of [path, reference]")
        leaves = [(path, ref[0] if isinstance(ref, list) and ref else None, None if ref is None else self.array(ref))
                  for path, ref in entries]
        if copy:
            keys = [json.dumps(ref) if shared and ref is not None else None for _, ref in entries]
            common = {i for i, key in enumerate(keys) if key in (shared or {})}
            own = np.empty(sum(a.nbytes + (-a.nbytes % ALIGN) for i, (_, _, a) in enumerate(leaves)
                               if a is not None and i not in common), np.uint8)
            offset, moved = 0, []
            for i, (path, name, a) in enumerate(leaves):
                if i in common:
                    assert shared is not None and a is not None
                    if shared[keys[i]] is None:
                        shared[keys[i]] = a.copy()  # type: ignore[index]
                    a = shared[keys[i]]
                elif a is not None:
                    view = own[offset:offset + a.nbytes].view(a.dtype).reshape(a.shape)
                    view[...] = a
                    offset += a.nbytes + (-a.nbytes % ALIGN)
                    a = view
                moved.append((path, name, a))
            leaves = moved
        state: dict[str, Any] = {}
        for path, name, a in leaves:
            *parents, leaf = path.split(SEP)
            node = state
            for p in parents:
                node = node.setdefault(p, {})
                if not isinstance(node, dict):
                    raise ValueError(f"state path {path!r} runs through a leaf")
            if leaf:
                if a is None:
                    raise ValueError(f"state leaf {path!r} has no array")
                node[leaf] = _as_tensor(name, a)
            elif a is not None:
                raise ValueError(f"state path {path!r} names a sub-dict but has an array")
        return state


def states_to_record(states: Mapping[int, Mapping[str, Any] | None]) -> ArrayRecord:
    """The committed states of a block's sampled clients, for the server → node message."""
    packer = Packer()
    return packer.record({"states": {str(j): packer.tree(state) for j, state in states.items()}})


def record_to_states(record: Any) -> dict[int, dict[str, Any] | None]:
    """Inverse of :func:`states_to_record` (node side; the leaves are views of the record's buffer)."""
    unpacker = Unpacker(record)
    states = unpacker.layout.get("states") if isinstance(unpacker.layout, dict) else None
    if not isinstance(states, dict):
        raise ValueError("a states record's layout is {\"states\": {client: state}}")
    return {int(j): unpacker.tree(entries) for j, entries in states.items()}


def _payload_layout(packer: Packer, message: Message) -> dict[str, Any]:
    return {layer: {"codec": p.codec, "shape": [int(s) for s in p.shape],
                    "meta": {k: int(v) if isinstance(v, (int, np.integer)) else float(v) for k, v in p.meta.items()},
                    "arrays": {key: packer.add(a) for key, a in p.arrays.items()}}
            for layer, p in message.items()}


def replies_to_record(results: Mapping[int, tuple[Mapping[str, Any] | None, Any]]) -> ArrayRecord:
    """A block's replies ``{j: (proposed state, ClientReply)}`` as one packed record (module doc)."""
    packer = Packer()
    clients = {}
    for j, (state, reply) in results.items():
        clients[str(j)] = {"client": int(reply.client), "round": int(reply.round), "loss": float(reply.loss),
                           "grad_evals": int(reply.grad_evals), "samples": int(reply.samples),
                           "payload": _payload_layout(packer, reply.message), "state": packer.tree(state)}
    return packer.record({"clients": clients})


def _shared_references(entries: Any) -> dict[str, None]:
    """The state references that several entries (or leaves) of a block hold, as ``json.dumps(ref)``:
    typically every client's ``x_prev``, the model of the round they computed at."""
    counts: Counter[str] = Counter()
    for entry in entries:
        state = entry.get("state") if isinstance(entry, dict) else None
        if isinstance(state, list):
            counts.update(json.dumps(leaf[1]) for leaf in state if isinstance(leaf, list) and len(leaf) == 2
                          and leaf[1] is not None)
    return {key: None for key, n in counts.items() if n > 1}


def _integer(entry: Mapping[str, Any], key: str) -> int:
    value = entry.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise PayloadError("*", key, f"must be an integer, got {value!r}")
    return value


def _number(entry: Mapping[str, Any], key: str) -> float:
    value = entry.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise PayloadError("*", key, f"must be a number, got {value!r}")
    return float(value)


class BlockReplies:
    """Server side of :func:`replies_to_record`: ``parse(j)`` gives client j's (ClientReply, proposed
    state) or raises a :class:`PayloadError` naming what is wrong; a block whose record is malformed
    raises it for every client (``error``)."""

    def __init__(self, record: Any):
        self.error: PayloadError | None = None
        try:
            self.unpacker = Unpacker(record)
            clients = self.unpacker.layout.get("clients") if isinstance(self.unpacker.layout, dict) else None
            if not isinstance(clients, dict):
                raise ValueError("a replies record's layout is {\"clients\": {client: entry}}")
            self.clients: dict[str, Any] = clients
            self.shared = _shared_references(clients.values())
        except Exception as err:  # noqa: BLE001 - anything a hostile reply triggers becomes a rejection
            self.error = PayloadError("*", "records", f"{type(err).__name__}: {err}")

    def parse(self, j: int) -> tuple[ClientReply, dict[str, Any] | None]:
        if self.error is not None:
            raise self.error
        try:
            entry = self.clients.get(str(j))
            if not isinstance(entry, dict):
                raise PayloadError("*", "reply", f"no entry for client {j} in its block's reply")
            reply = ClientReply(client=_integer(entry, "client"), round=_integer(entry, "round"),
                                message=self._message(entry.get("payload")), loss=_number(entry, "loss"),
                                grad_evals=_integer(entry, "grad_evals"), samples=_integer(entry, "samples"))
            return reply, self.unpacker.tree(entry.get("state"), copy=True, shared=self.shared)
        except PayloadError:
            raise
        except Exception as err:  # noqa: BLE001 - anything a hostile reply triggers becomes a rejection
            raise PayloadError("*", "reply", f"{type(err).__name__}: {err}") from None

    def _message(self, payload: Any) -> Message:
        if not isinstance(payload, dict):
            raise PayloadError("*", "payload", f"must be a mapping of layers, got {type(payload).__name__}")
        message: dict[str, TensorPayload] = {}
        for layer, p in payload.items():
            if not isinstance(p, dict) or set(p) != {"codec", "shape", "meta", "arrays"}:
                raise PayloadError(layer, "payload", "expected the entries codec, shape, meta and arrays")
            shape, meta, arrays = p["shape"], p["meta"], p["arrays"]
            if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
                raise PayloadError(layer, "shape", f"must be a list of integers, got {shape!r}")
            if not isinstance(meta, dict) or not isinstance(arrays, dict):
                raise PayloadError(layer, "arrays", "meta and arrays must be mappings")
            try:
                decoded = {str(key): self.unpacker.array(ref) for key, ref in arrays.items()}
            except ValueError as err:
                raise PayloadError(layer, "arrays", str(err)) from None
            message[layer] = TensorPayload(p["codec"], tuple(shape), decoded, dict(meta))
        return message
