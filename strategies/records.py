"""Conversion between fedgluon's payloads / states and Flower records (the only Flower-aware code
for payloads, docs/DESIGN.md §1).

A node simulates a block of clients (fedgluon/blocks.py), so what travels is packed per *block* and
by *column*: every Flower ``Array`` and record entry costs tens of µs to build and to read, and so
does every per-client array of a hand-made layout, which made them the main cost of a block. A
:class:`Packer` record holds two Arrays:

* ``layout`` — UTF-8 JSON describing the block; each array in it is a reference
  ``[dtype, shape, offset]`` into
* ``data`` — the arrays' raw little-endian bytes, concatenated, each starting at a multiple of 8.

Clients whose states (or payloads) have the same layout — leaf paths, dtypes and shapes (codecs,
shapes, header keys and array kinds) — form a *group* ``{"rows": [...], ...}``, rows being the
clients' positions in the block's ``clients`` list; in a group each leaf (payload array) is one
*column*, a (rows, *shape) array whose row i is the i-th client's. A leaf every client of the group
holds as one tensor (``x_prev``: the round's model) is written once, flagged ``shared``.

* server → node (:func:`states_to_record`): ``{"clients": [j...], "states": [{"rows", "leaves":
  [[path, ref, shared], ...] | null}]}`` — the sampled clients' committed states (paths
  ``/``-joined; an empty sub-dict is its path with a trailing ``/`` and no array);
* node → server (:func:`replies_to_record`): ``{"clients", "client", "round", "loss", "grad_evals",
  "samples"`` (one list entry per client) ``, "payloads": [{"rows", "layers": {layer: {"codec",
  "shape", "meta": {key: [value per row]}, "arrays": {key: column ref}}}}], "states": [...]}``.

The model travels as an ``ArrayRecord`` with one ``Array`` per tensor (:func:`tensors_to_record`).

Every ``Array`` holds raw little-endian bytes (``stype = "fedgluon.raw"``) of a dtype from a fixed
list of numeric types, checked against its shape (and references against the data's bounds and
alignment, columns against their group's row count) on reading; nothing a client sends is ever
unpickled. Server-side reading (:class:`BlockReplies`): a malformed layout, metric list or group
``rows`` rejects the whole block; a malformed payload or state group rejects the clients of that
group; everything else (metric values, codecs, indices, values, ids, rounds) is checked per client.
Proposed states are copied out of the block's buffer leaf by leaf (shared leaves once, shared
again), or, for the strategy, parsed as views of it: strategies/columns.py keeps those only while
every client of the block holds them, and sends them back as the same columns.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import Tensor

from compressors import Message, PayloadError, TensorPayload
from fedgluon.algorithms.base import ClientReply
from fedgluon.algorithms.columns import BlockColumns, BlockStep, Shared
from fedgluon.state_schema import StateSchema
from fedgluon.state_schema import leaves as state_leaves

from .shared import SharedFiles, min_bytes

SEP = "/"
RAW = "fedgluon.raw"
# dtype names an Array may carry -> little-endian NumPy dtype (bfloat16 travels as its int16 bit pattern)
DTYPES = {name: np.dtype(name).newbyteorder("<") for name in
          ("bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "int64", "float16", "float32", "float64")}
DTYPES["bfloat16"] = np.dtype("<i2")


FLOATS = ("float16", "float32", "float64", "bfloat16")
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
    """``a`` as a tensor sharing its memory (bfloat16 travels as its bits). A read-only ``a`` (a view of
    received bytes, :class:`Unpacker` with ``copy=False``) gives a tensor nobody may write into: torch
    has no read-only tensors and warns about it once per process, which is silenced here."""
    if a.flags.writeable:
        t = torch.from_numpy(a)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if name == "bfloat16" else t


class RawArray(Array):
    """A raw-bytes Flower ``Array`` that pickles its bytes as a NumPy buffer. Flower's simulation engine
    moves messages to and from its Ray actors with pickle protocol 5, which hands NumPy buffers to
    Ray's object store out of band but copies ``bytes`` through the pickle stream, several times per
    hop (``python -m benchmarks.bench_transport``). Unpickling rebuilds a ``RawArray`` holding the
    same bytes, so nothing downstream sees a difference, and what it unpickles is the array's dtype
    name, shape, stype and raw bytes (no object of the sender's choosing).

    Flower's own serialisation (deployment runs over gRPC) writes an object's ``__qualname__`` into its
    header and inflates by that name in processes that never import fedgluon, so a ``RawArray``
    presents itself as ``Array`` there and is inflated as one (tested)."""

    __qualname__ = "Array"

    def __reduce__(self):
        return _array_from_buffer, (self.dtype, tuple(self.shape), self.stype,
                                    np.frombuffer(self.data, dtype=np.uint8))


def _array_from_buffer(dtype: str, shape: tuple[int, ...], stype: str, buffer: np.ndarray) -> Array:
    return RawArray(dtype=dtype, shape=shape, stype=stype, data=buffer.tobytes())


def array_record(arrays: Mapping[str, Array]) -> ArrayRecord:
    """An ``ArrayRecord`` holding these very Arrays (``ArrayRecord(dict)`` would copy each into a plain
    ``Array``, losing :class:`RawArray`'s pickling)."""
    record = ArrayRecord()
    for key, array in arrays.items():
        record[key] = array
    return record


def to_array(a: np.ndarray | Tensor) -> Array:
    """A NumPy array or tensor as a raw-bytes Flower ``Array`` (module docstring)."""
    name, shape, data = _raw(a)
    return RawArray(dtype=name, shape=shape, stype=RAW, data=data)


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
    return array_record({k: to_array(t) for k, t in tensors.items()})


def record_to_tensors(record: ArrayRecord) -> dict[str, Tensor]:
    return {k: _tensor(record[k]) for k in record.keys()}


ALIGN = 8  # every array of a packed record starts at a multiple of 8 bytes (views of any dtype are aligned)
Ref = list  # [dtype name, shape, offset]


STACK_BELOW = 1 << 16  # Packer.add_rows stacks rows smaller than this many bytes


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
        ref = self.seen[key] = [name, list(b.shape), self._write([b])]
        return ref

    def _write(self, arrays: list[np.ndarray]) -> int:
        """Append C-contiguous arrays back to back (copied once, by record()'s join), padded to the next
        multiple of ALIGN; returns the offset of the first."""
        offset = self.size
        self.chunks += [memoryview(b.reshape(-1)).cast("B") for b in arrays if b.size]
        nbytes = sum(b.nbytes for b in arrays)
        pad = -nbytes % ALIGN
        if pad:
            self.chunks.append(bytes(pad))
        self.size += nbytes + pad
        return offset

    def add_rows(self, rows: Sequence[np.ndarray | Tensor]) -> Ref:
        """Arrays of one dtype and shape written back to back: a reference to the (len(rows), *shape)
        array they form. Small rows are stacked first (one call instead of one per row); large ones
        are not copied before record()'s join."""
        first = rows[0]
        if len(rows) == 1:  # a view with a leading axis of one
            return self.add(first.unsqueeze(0) if isinstance(first, Tensor) else first[None])
        if first.nbytes < STACK_BELOW:
            return self.add(torch.stack(list(rows)) if isinstance(first, Tensor) else np.stack(rows))
        converted = [_little_endian(a) for a in rows]
        name, first = converted[0]
        if any(n != name or b.shape != first.shape for n, b in converted):
            raise ValueError("the rows of a column must share one dtype and shape")
        return [name, [len(rows), *first.shape], self._write([b for _, b in converted])]

    def add_column_parts(self, parts: Sequence[np.ndarray | Tensor]) -> Ref:
        """(rows_i, *shape) arrays of one dtype written back to back as one (Σ rows_i, *shape) column: the
        reference and bytes :meth:`add_rows` gives all their rows."""
        converted = [_little_endian(a) for a in parts]
        name, first = converted[0]
        if any(n != name or b.ndim == 0 or b.shape[1:] != first.shape[1:] for n, b in converted):
            raise ValueError("the parts of a column must share one dtype and row shape")
        rows = sum(b.shape[0] for _, b in converted)
        return [name, [rows, *first.shape[1:]], self._write([b for _, b in converted])]

    def record(self, layout: Any, files: SharedFiles | None = None) -> ArrayRecord:
        """The packed record; with ``files`` (and at least ``shared.min_bytes()``) its bytes go to a file
        in host shared memory and the record names it (strategies/shared.py), unless that fails."""
        if files is not None and self.size >= min_bytes():
            name = files.write(self.chunks, self.size)
            if name is not None:
                return file_record(layout, name, self.size)
        return packed_record(layout, b"".join(self.chunks))


def packed_record(layout: Any, data: bytes) -> ArrayRecord:
    """A packed record: the layout as JSON and the data its references point into (module doc)."""
    return array_record({"layout": json_array(layout),
                         "data": RawArray(dtype="uint8", shape=(len(data),), stype=RAW, data=data)})


def file_record(layout: Any, name: str, size: int) -> ArrayRecord:
    """A packed record whose data is the file ``name`` (``size`` bytes) of the run's shared directory."""
    return array_record({"layout": json_array(layout), "file": json_array({"name": name, "size": int(size)})})


def json_array(value: Any) -> Array:
    """``value`` as JSON text in a uint8 ``Array`` (a record's layout, a file reference)."""
    return to_array(np.frombuffer(json.dumps(value).encode(), dtype=np.uint8))


def from_json_array(array: Any) -> Any:
    """Inverse of :func:`json_array`; ``ValueError`` on anything but an array of JSON text."""
    return json.loads(from_array(array).tobytes().decode())


def _memory(a: np.ndarray | Tensor) -> tuple:
    """Where an array's elements lie (two arrays with the same key hold the same values)."""
    if isinstance(a, Tensor):
        return ("torch", str(a.device), a.data_ptr(), str(a.dtype), tuple(a.shape), a.stride())
    return ("numpy", a.__array_interface__["data"][0], a.dtype.str, a.shape, a.strides)


class Unpacker:
    """Reads a :class:`Packer` record: the parsed layout, and arrays by reference. ``ValueError`` on
    anything malformed.

    By default the arrays are views of one writable copy of the data (a node steps its clients'
    states in place; a record that names a file of ``files`` is mapped copy-on-write instead,
    :mod:`strategies.shared`). With ``copy=False`` they are read-only views of the bytes as received
    (or of the file, mapped read-only), with no copy at all: the server's side of a block's reply,
    whose proposed states it only reads (commits, re-sends as they came, checkpoints;
    ``tests/test_records.py`` checks a run leaves every reply's bytes as they were) and whose
    payloads it copies out before decoding (:class:`BlockReplies`).
    NumPy refuses writes into read-only views; a tensor made of one (:func:`_as_tensor`) would not,
    so nothing outside this module gets one it could write into except those proposed states."""

    def __init__(self, record: Any, copy: bool = True, files: SharedFiles | None = None):
        if not isinstance(record, ArrayRecord) or set(record.keys()) not in ({"layout", "data"}, {"layout", "file"}):
            raise ValueError("expected an ArrayRecord with the Arrays 'layout' and 'data' (or 'file')")
        self.layout = from_json_array(record["layout"])
        self.data: bytes | None = None  # as received (a copy=True unpacker's buffer may since have been written into)
        self.file: tuple[str, int] | None = None  # or the shared file it came in: (name, size)
        if "file" in record:
            self.file = file_ref(record["file"])
            if files is None:
                raise ValueError("this record is a file in host shared memory, and none was expected here")
            self.buffer = files.map_private(*self.file) if copy else files.map(*self.file)
            return
        data = record["data"]
        if not isinstance(data, Array) or data.stype != RAW or not isinstance(data.data, bytes):
            raise ValueError("packed data must be a raw-bytes Array")
        self.data = data.data
        self.buffer = np.frombuffer(data.data, dtype=np.uint8)
        if copy:
            self.buffer = self.buffer.copy()

    def record(self, layout: Any) -> ArrayRecord:
        """A record of ``layout`` over this record's data as it came (its bytes, or its shared file)."""
        return packed_record(layout, self.data) if self.file is None else file_record(layout, *self.file)

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


def file_ref(array: Any) -> tuple[str, int]:
    """The (name, size) a record's ``file`` entry holds; ``ValueError`` if it is anything else."""
    try:
        ref = from_json_array(array)
    except (TypeError, ValueError) as err:
        raise ValueError(f"a shared file reference must be JSON: {err}") from None
    if not isinstance(ref, dict) or set(ref) != {"name", "size"}:
        raise ValueError(f"a shared file reference is {{'name', 'size'}}, got {ref!r}")
    name, size = ref["name"], ref["size"]
    if not isinstance(name, str) or not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ValueError(f"a shared file reference needs a name and a size in bytes, got {ref!r}")
    return name, size


def states_to_record(states: Mapping[int, Mapping[str, Any] | None], files: SharedFiles | None = None) -> ArrayRecord:
    """The committed states of a block's sampled clients, for the server → node message (a file of
    ``files`` where they are large enough, :meth:`Packer.record`)."""
    packer = Packer()
    trees = list(states.values())
    return packer.record({"clients": [int(j) for j in states], "states": _pack_trees(packer, trees)}, files)


def record_to_states(record: Any, files: SharedFiles | None = None) -> dict[int, dict[str, Any] | None]:
    """Inverse of :func:`states_to_record` (node side; the leaves are views of the record's buffer)."""
    unpacker = Unpacker(record, files=files)
    clients = _clients(unpacker.layout)
    trees = _unpack_trees(unpacker, unpacker.layout.get("states"), len(clients))
    for tree in trees:
        if isinstance(tree, Exception):
            raise tree
    return dict(zip(clients, trees))  # type: ignore[arg-type]


def record_to_columns(record: Any, files: SharedFiles | None = None) -> BlockColumns | None:
    """The states record of a block whose clients all have one layout, as columns (node side: views of
    the record's buffer, a shared leaf as :class:`~fedgluon.algorithms.columns.Shared`), or None when
    they come in several groups or out of order (the node then takes :func:`record_to_states`).
    ``ValueError`` on a malformed record, as :func:`record_to_states`."""
    unpacker = Unpacker(record, files=files)
    clients = _clients(unpacker.layout)
    groups = _groups(unpacker.layout.get("states"), len(clients), "leaves")
    if len(groups) != 1 or groups[0][0] != list(range(len(clients))):
        return None
    group = _TreeGroup(unpacker, len(clients), groups[0][1])
    if group.error is not None:
        raise group.error
    if group.empty:
        return BlockColumns(clients, None)
    values = [None if c is None else Shared(_as_tensor(c[0], c[1])) if c[2] is not None else _as_tensor(c[0], c[1])
              for c in group.columns]
    return BlockColumns(clients, group.build(values))


def step_to_record(steps: BlockStep | Sequence[BlockStep], files: SharedFiles | None = None) -> ArrayRecord:
    """A block's replies made on columns (:mod:`fedgluon.algorithms.columns`), one step or the steps of its
    consecutive runs (``Algorithm.column_runs``), as one packed record: byte for byte what
    :func:`replies_to_record` makes of the same replies client by client (each column written as the
    runs' parts back to back)."""
    steps = [steps] if isinstance(steps, BlockStep) else list(steps)
    first = steps[0]
    if any(s.payloads.keys() != first.payloads.keys() or s.round != first.round
           or any((r.codec, r.shape) != (first.payloads[n].codec, first.payloads[n].shape) for n, r in s.payloads.items())
           for s in steps):
        raise ValueError("the runs of a block step must have one round and one payload layout")
    packer = Packer()
    clients = [j for s in steps for j in s.clients]
    m = len(clients)
    layout: dict[str, Any] = {"clients": [int(j) for j in clients]}
    values = {"client": clients, "round": [first.round] * m, "loss": [v for s in steps for v in s.loss],
              "grad_evals": [v for s in steps for v in s.grad_evals], "samples": [v for s in steps for v in s.samples]}
    layout.update({key: [kind(v) for v in values[key]] for key, kind in METRICS.items()})
    layout["payloads"] = [{"rows": list(range(m)), "layers": {
        layer: {"codec": rows.codec, "shape": [int(d) for d in rows.shape], "meta": {},
                "arrays": {key: packer.add_column_parts([s.payloads[layer].arrays[key] for s in steps])
                           for key in rows.arrays}}
        for layer, rows in first.payloads.items()}}]
    leaves: list[list[Any]] = []
    _column_leaves(packer, [s.states for s in steps], "", leaves)
    layout["states"] = [{"rows": list(range(m)), "leaves": leaves}]
    return packer.record(layout, files)


def _column_leaves(packer: Packer, trees: Sequence[Mapping[str, Any]], prefix: str, out: list[list[Any]]) -> None:
    """:func:`_pack_uniform_trees`'s leaves of the column trees of a block's runs (one tree per run, each
    with the first one's keys), in the first one's flattening order."""
    first = trees[0]
    if any(t.keys() != first.keys() for t in trees):
        raise ValueError("the runs of a block step must have one state layout")
    for key, value in first.items():
        column = [t[key] for t in trees]
        if isinstance(value, Shared):
            if any(not isinstance(c, Shared) or c.tensor is not value.tensor for c in column):
                raise ValueError(f"state leaf {prefix}{key} is shared in one run and not in all")
            out.append([f"{prefix}{key}", packer.add(value.tensor), True])
        elif isinstance(value, Tensor):
            out.append([f"{prefix}{key}", packer.add_column_parts(column), False])
        elif value:
            _column_leaves(packer, column, f"{prefix}{key}{SEP}", out)
        else:
            out.append([f"{prefix}{key}{SEP}", None, False])


METRICS = {"client": int, "round": int, "loss": float, "grad_evals": int, "samples": int}


def replies_to_record(results: Mapping[int, tuple[Mapping[str, Any] | None, Any]],
                      files: SharedFiles | None = None) -> ArrayRecord:
    """A block's replies ``{j: (proposed state, ClientReply)}`` as one packed record (module doc)."""
    packer = Packer()
    replies = [reply for _, reply in results.values()]
    layout: dict[str, Any] = {"clients": [int(j) for j in results]}
    layout.update({key: [kind(getattr(r, key)) for r in replies] for key, kind in METRICS.items()})
    layout["payloads"] = _pack_payloads(packer, [r.message for r in replies])
    layout["states"] = _pack_trees(packer, [state for state, _ in results.values()])
    return packer.record(layout, files)


# ---------------------------------------------------------------------- columns of a block's trees
def _pack_trees(packer: Packer, trees: Sequence[Mapping[str, Any] | None]) -> list[dict[str, Any]]:
    """:func:`_pack_uniform_trees` when it applies, else :func:`_pack_grouped_trees` (same layout)."""
    return _pack_uniform_trees(packer, trees) or _pack_grouped_trees(packer, trees)


class _Mismatch(Exception):
    """A tree or payload whose layout is not the first one's (the uniform fast paths give up)."""


def _tree_reader(tree: Mapping[str, Any]) -> Callable[[Any, list[Any]], None]:
    """A function appending a tree's leaves to a list in ``tree``'s flattening order (None for an empty
    sub-dict), or raising :class:`_Mismatch` when its keys (order included) or nesting differ from
    ``tree``'s; leaves' kinds, dtypes and shapes are the caller's to check. Compiled once per block, it
    costs one key-tuple comparison per dict and one lookup per leaf."""
    keys = tuple(tree)
    parts: list[tuple[str, Any]] = []
    for key, value in tree.items():
        if isinstance(value, Tensor):
            parts.append((key, None))
        elif type(value) is dict:
            parts.append((key, _tree_reader(value) if value else _EMPTY))
        else:  # other leaf kinds (never in a state) take the grouped path
            raise _Mismatch(key)

    def read(node: Any, out: list[Any]) -> None:
        if type(node) is not dict or tuple(node) != keys:
            raise _Mismatch(keys)
        for key, sub in parts:
            value = node[key]
            if sub is None:
                out.append(value)
            elif sub is _EMPTY:
                if type(value) is not dict or value:
                    raise _Mismatch(key)
                out.append(None)
            else:
                sub(value, out)
    return read


_EMPTY = object()  # _tree_reader's mark of an empty sub-dict


def _pack_uniform_trees(packer: Packer, trees: Sequence[Mapping[str, Any] | None]) -> list[dict[str, Any]] | None:
    """:func:`_pack_grouped_trees`'s layout for the usual block — two or more trees, every one with the
    first one's paths (in its order), dtypes and shapes, so one group — read by one compiled reader per
    block and checked column by column instead of flattened and keyed tree by tree; None (nothing
    written) for any other block."""
    if len(trees) < 2 or type(trees[0]) is not dict:
        return None
    try:
        read = _tree_reader(trees[0])
        rows: list[list[Any]] = []
        for tree in trees:
            leaves: list[Any] = []
            read(tree, leaves)
            rows.append(leaves)
    except _Mismatch:
        return None
    columns = list(zip(*rows))
    for column in columns:
        first = column[0]
        if first is not None and not all(isinstance(t, Tensor) for t in column):
            return None
        if first is not None and len({(t.dtype, t.shape) for t in column}) != 1:
            return None
    leaves = []
    for (path, _), column in zip(state_leaves(trees[0]), columns):
        first = column[0]
        if first is None:
            leaves.append([path, None, False])
        elif all(a is first for a in column):  # x_prev: the round model, held by every tree
            leaves.append([path, packer.add(first), True])
        else:
            leaves.append([path, packer.add_rows(column), False])
    return [{"rows": list(range(len(trees))), "leaves": leaves}]


def _pack_grouped_trees(packer: Packer, trees: Sequence[Mapping[str, Any] | None]) -> list[dict[str, Any]]:
    """Trees (client states) grouped by their leaf paths, dtypes and shapes; per group, each leaf is one
    column ``[path, ref, shared]``: the group's leaves stacked (a (rows, *shape) array), or, when every
    tree of the group holds one tensor there that the block holds more than once (``x_prev``), that
    tensor once (``shared``; written once for the whole block). Two leaves are one column when their
    paths, dtypes and shapes agree (torch and NumPy dtypes never compare equal)."""
    groups: dict[Any, tuple[list[int], list[list[Any]]]] = {}
    held: Counter[int] = Counter()  # how many leaves of the block are each tensor object
    for i, tree in enumerate(trees):
        if tree is None:
            groups.setdefault(None, ([], []))[0].append(i)
            continue
        leaves = list(state_leaves(tree))
        values = [t for _, t in leaves]
        held.update(map(id, values))
        sig = tuple([(p, None if t is None else (t.dtype, t.shape)) for p, t in leaves])
        rows, members = groups.setdefault(sig, ([], []))
        rows.append(i)
        members.append(values)
    held.pop(id(None), None)
    out = []
    for sig, (rows, members) in groups.items():
        if sig is None:
            out.append({"rows": rows, "leaves": None})
            continue
        leaves = []
        for (path, kind), column in zip(sig, zip(*members)):
            first = column[0]
            if kind is None:
                leaves.append([path, None, False])
            elif held[id(first)] > 1 and all(a is first for a in column):  # x_prev: the round model
                leaves.append([path, packer.add(first), True])
            else:
                leaves.append([path, packer.add_rows(column), False])
        out.append({"rows": rows, "leaves": leaves})
    return out


def _pack_payloads(packer: Packer, messages: Sequence[Message]) -> list[dict[str, Any]]:
    """:func:`_pack_uniform_payloads` when it applies, else :func:`_pack_grouped_payloads` (same layout)."""
    return _pack_uniform_payloads(packer, messages) or _pack_grouped_payloads(packer, messages)


def _pack_uniform_payloads(packer: Packer, messages: Sequence[Message]) -> list[dict[str, Any]] | None:
    """:func:`_pack_grouped_payloads`'s layout for the usual block — two or more messages with the first
    one's layers (in its order), codecs, shapes, header keys and array kinds, so one group — checked
    layer by layer and column by column; None (nothing written) for any other block."""
    if len(messages) < 2:
        return None
    names = tuple(messages[0])
    if any(tuple(m) != names for m in messages):
        return None
    checked = []
    for layer in names:
        payloads = [m[layer] for m in messages]
        first = payloads[0]
        codec, shape, meta, kinds = first.codec, tuple(first.shape), tuple(first.meta), tuple(first.arrays)
        if any(p.codec != codec or tuple(p.shape) != shape or tuple(p.meta) != meta or tuple(p.arrays) != kinds
               for p in payloads):
            return None
        columns = {key: [p.arrays[key] for p in payloads] for key in kinds}
        if any(len({(a.dtype, a.shape) for a in column}) != 1 for column in columns.values()):
            return None
        checked.append((layer, first, payloads, columns))
    layers = {layer: {"codec": first.codec, "shape": [int(d) for d in first.shape],
                      "meta": {key: [_number_of(p.meta[key]) for p in payloads] for key in first.meta},
                      "arrays": {key: packer.add_rows(column) for key, column in columns.items()}}
              for layer, first, payloads, columns in checked}
    return [{"rows": list(range(len(messages))), "layers": layers}]


def _pack_grouped_payloads(packer: Packer, messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Messages grouped by layer set, codecs, shapes, header keys and array kinds; per group and layer
    the arrays are columns (rows, ·) and each header key a list of the rows' values."""
    groups: dict[Any, tuple[list[int], list[Message]]] = {}
    for i, message in enumerate(messages):
        sig = tuple([(layer, p.codec, tuple(p.shape), tuple(p.meta), tuple([(k, a.dtype, a.shape) for k, a in p.arrays.items()]))
                     for layer, p in message.items()])
        rows, members = groups.setdefault(sig, ([], []))
        rows.append(i)
        members.append(message)
    out = []
    for rows, members in groups.values():
        layers = {}
        for layer, first in members[0].items():
            payloads = [m[layer] for m in members]
            layers[layer] = {"codec": first.codec, "shape": [int(d) for d in first.shape],
                             "meta": {key: [_number_of(p.meta[key]) for p in payloads] for key in first.meta},
                             "arrays": {key: packer.add_rows([p.arrays[key] for p in payloads]) for key in first.arrays}}
        out.append({"rows": rows, "layers": layers})
    return out


def _number_of(v: Any) -> int | float:
    return int(v) if isinstance(v, (int, np.integer)) else float(v)


def _clients(layout: Any) -> list[int]:
    clients = layout.get("clients") if isinstance(layout, dict) else None
    if not isinstance(clients, list) or not all(type(j) is int for j in clients) or len(set(clients)) != len(clients):
        raise ValueError("a block record's layout has a list of distinct client ids under 'clients'")
    return clients


def _groups(groups: Any, count: int, key: str) -> list[tuple[list[int], Any]]:
    """The (rows, body) of each group, checked: rows are distinct indices below ``count``."""
    if not isinstance(groups, list):
        raise ValueError("groups must be a list")
    seen: set[int] = set()
    out = []
    for g in groups:
        if not isinstance(g, dict) or set(g) != {"rows", key}:
            raise ValueError(f"a group is {{'rows': [...], {key!r}: ...}}")
        rows = g["rows"]
        if (not isinstance(rows, list) or not rows or not all(type(r) is int and 0 <= r < count for r in rows)
                or seen.intersection(rows) or len(set(rows)) != len(rows)):
            raise ValueError(f"group rows must be distinct indices below {count}, got {rows!r}")
        seen.update(rows)
        out.append((rows, g[key]))
    return out


def _writable(a: np.ndarray) -> np.ndarray:
    """``a``, or a copy of it where it is a read-only view (payload arrays go on to decoders that may
    make tensors of them and compute in place)."""
    return a if a.flags.writeable else a.copy()


def _column(unpacker: Unpacker, ref: Any, rows: int) -> np.ndarray:
    a = unpacker.array(ref)
    if a.ndim == 0 or a.shape[0] != rows:
        raise ValueError(f"a column of {rows} rows has shape {a.shape}")
    return a


def _unpack_trees(unpacker: Unpacker, groups: Any, count: int) -> list[dict[str, Any] | None | Exception]:
    """Inverse of :func:`_pack_trees` (leaves are views of the record's buffer): one tree per row, None
    where there was none, or the ValueError that made its group unreadable."""
    out: list[dict[str, Any] | None | Exception] = [None] * count
    for rows, leaves in _groups(groups, count, "leaves"):
        group = _TreeGroup(unpacker, len(rows), leaves)
        for i, r in enumerate(rows):
            out[r] = group.error or group.tree(i)
    return out


class _TreeGroup:
    """One group of :func:`_pack_trees`, its columns read and checked once (``error`` if malformed);
    :meth:`tree` builds the tree of its i-th row."""

    def __init__(self, unpacker: Unpacker, m: int, leaves: Any, schema: StateSchema | None = None):
        self.error: ValueError | None = None
        self.finite: np.ndarray | None = None  # with a schema: per row, whether every floating-point leaf is finite
        # per leaf: None (an empty sub-dict) or (dtype name, array, shared key): a column (rows, ...) whose
        # rows become views of one tensor (``unbind``) on first use, or, with a key, one shared array
        self.columns: list[tuple[str, np.ndarray, str | None] | None] = []
        self.rows: list[Sequence[Tensor] | None] | None = None
        self.views: dict[str, Tensor] = {}  # shared columns as tensors, made once
        self.copies: dict[str, Tensor] = {}
        try:
            self._read(unpacker, m, leaves, schema)
            if schema is not None:
                self.finite = self._finite_rows(m)
        except ValueError as err:
            self.error = err

    def _read(self, unpacker: Unpacker, m: int, leaves: Any, schema: StateSchema | None) -> None:
        self.empty = leaves is None and schema is None
        if self.empty:
            return
        if schema is not None and (not isinstance(leaves, list) or len(leaves) != len(schema.leaves)):
            size = len(leaves) if isinstance(leaves, list) else 0
            raise ValueError(f"the proposed state has {size} leaves, the client-state schema {len(schema.leaves)}")
        if not isinstance(leaves, list) or not all(isinstance(e, list) and len(e) == 3 and isinstance(e[0], str)
                                                   and isinstance(e[2], bool) for e in leaves):
            raise ValueError("a packed state is a list of [path, reference, shared]")
        if schema is not None:
            _check_layout(schema, leaves, m)
        paths = []
        for path, ref, is_shared in leaves:
            if ref is None:
                self.columns.append(None)
            else:
                a = unpacker.array(ref) if is_shared else _column(unpacker, ref, m)
                _as_tensor(ref[0], a)  # torch takes every dtype _checked allows; were it not, the block is rejected here
                self.columns.append((ref[0], a, json.dumps(ref) if is_shared else None))
            paths.append((path, ref is not None))
        self.build = _builder(_skeleton(paths))

    def _finite_rows(self, m: int) -> np.ndarray:
        """Per row, whether its floating-point leaves hold no NaN/Inf: one NumPy pass over each column (a
        shared leaf, one array for every row, fails every row; bfloat16, carried as int16, is non-finite
        where its exponent bits are all set). NumPy's ``isfinite`` runs ~25x faster here than torch's."""
        ok = np.ones(m, dtype=bool)
        for column in self.columns:
            if column is None or column[0] not in FLOATS:
                continue
            a = column[1] if column[2] is None else column[1][None]
            rows = a.reshape(a.shape[0], -1)
            finite = (rows.view(np.uint16) & 0x7F80) != 0x7F80 if column[0] == "bfloat16" else np.isfinite(rows)
            ok &= finite.all(axis=1)
        return ok

    def _row_views(self) -> list[Sequence[Tensor] | None]:
        if self.rows is None:  # one unbind per column: a C++ loop instead of a tensor per row and leaf
            self.rows = [_as_tensor(c[0], c[1]).unbind(0) if c is not None and c[2] is None else None
                         for c in self.columns]
        return self.rows

    def tree(self, i: int, copy: bool = False, shared: dict[str, Tensor] | None = None) -> dict[str, Any] | None:
        """Row i's tree, its leaves views of the record's buffer; with ``copy`` each leaf is a copy of its
        own (so a committed state never keeps the block's buffer alive), and a shared column is copied
        once into ``shared`` (by reference) and shared by every tree that holds it."""
        if self.error is not None:
            raise self.error
        if self.finite is not None and not bool(self.finite[i]):
            raise ValueError("the proposed state holds NaN or Inf")
        if self.empty:
            return None
        values: list[Tensor | None] = []
        for column, rows in zip(self.columns, self._row_views()):
            if column is None:
                values.append(None)
            elif rows is not None:
                values.append(rows[i].clone() if copy else rows[i])
            else:  # one tensor for every tree that holds it (a copy of it with ``copy``)
                name, a, key = column
                store = (shared if shared is not None else self.copies) if copy else self.views
                if key not in store:
                    store[key] = _as_tensor(name, a.copy() if copy else a)
                values.append(store[key])
        return self.build(values)


def _check_layout(schema: StateSchema, leaves: list[list[Any]], m: int) -> None:
    """ValueError unless a state group's well-formed leaves ``[[path, [dtype, shape, offset] or None,
    shared], ...]`` describe states of the client-state schema (columns of ``m`` rows, shared leaves one
    row's shape); read from the layout alone, before any of the group's bytes."""
    entries = []
    for path, ref, shared in leaves:
        if ref is None:
            entries.append((path, None, ()))
            continue
        if not (isinstance(ref, list) and len(ref) == 3 and isinstance(ref[1], list)):
            raise ValueError(f"state leaf {path[:200]!r} has a malformed reference")
        shape = tuple(ref[1]) if shared else tuple(ref[1][1:])
        if not shared and (not ref[1] or ref[1][0] != m):
            raise ValueError(f"state leaf {path[:200]!r} is not a column of {m} rows")
        entries.append((path, ref[0], shape))
    why = schema.layout_mismatch(entries)
    if why:
        raise ValueError(why)


def _skeleton(paths: list[tuple[str, bool]]) -> list[tuple[tuple[str, ...], str, bool]]:
    """(parents, leaf, has array) per path, checked once per group: a path never runs through a leaf, an
    empty sub-dict (trailing separator) has no array and a leaf has one."""
    out, leaves, dicts = [], set(), set()
    for path, has_array in paths:
        *parents, leaf = path.split(SEP)
        for depth in range(len(parents)):
            dicts.add(tuple(parents[:depth + 1]))
        if leaf:
            if not has_array:
                raise ValueError(f"state leaf {path!r} has no array")
            leaves.add((*parents, leaf))
        elif has_array:
            raise ValueError(f"state path {path!r} names a sub-dict but has an array")
        out.append((tuple(parents), leaf, has_array))
    if leaves & dicts:
        raise ValueError(f"state path {SEP.join(sorted(leaves & dicts)[0])!r} runs through a leaf")
    return out


def _builder(skeleton: list[tuple[tuple[str, ...], str, bool]]) -> Callable[[list[Any]], dict[str, Any]]:
    """A function of a row's leaf values (in the skeleton's order) that builds its tree: the skeleton's
    nesting resolved once per group into (key, leaf position or sub-builder) pairs, so a row costs one
    dict per sub-dict and one lookup per leaf."""
    nested: dict[str, Any] = {}
    for n, (parents, leaf, _) in enumerate(skeleton):
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
        if leaf:
            node[leaf] = n
    return _compiled(nested)


def _compiled(node: dict[str, Any]) -> Callable[[list[Any]], dict[str, Any]]:
    items = [(k, v if isinstance(v, int) else _compiled(v)) for k, v in node.items()]
    return lambda values: {k: values[v] if type(v) is int else v(values) for k, v in items}


def _integer(value: Any, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise PayloadError("*", key, f"must be an integer, got {value!r}")
    return value


def _number(value: Any, key: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise PayloadError("*", key, f"must be a number, got {value!r}")
    return float(value)


class BlockReplies:
    """Server side of :func:`replies_to_record`: ``parse(j)`` gives client j's (ClientReply, proposed
    state) or raises a :class:`PayloadError` naming what is wrong. A malformed layout (client list,
    metric lists, group rows, references) rejects the whole block (``error``); a malformed payload or
    state group rejects the clients of that group; a bad metric or payload value its client alone.

    The reply's bytes are read where they lie, never copied whole (:class:`Unpacker` with
    ``copy=False``): payload arrays are copied out, and the proposed states are copies of their own,
    or with ``views`` read-only views of the reply's bytes (which they then keep alive: the caller
    copies them out where it keeps only some, see ``strategies.columns.StateColumns``);
    :meth:`states_record` sends them back to the block as those same bytes."""

    def __init__(self, record: Any, views: bool = False, files: SharedFiles | None = None,
                 schema: StateSchema | None = None):
        self.error: PayloadError | None = None
        self.views = views
        self.shared: dict[str, Tensor] = {}
        try:
            self.unpacker = Unpacker(record, copy=False, files=files)  # read-only: states are copied or only read
            layout = self.unpacker.layout
            self.clients = _clients(layout)
            self.row = {j: i for i, j in enumerate(self.clients)}
            m = len(self.clients)
            self.metrics = {key: layout.get(key) for key in METRICS}
            for key, values in self.metrics.items():
                if not isinstance(values, list) or len(values) != m:
                    raise ValueError(f"metric {key!r} must be a list of {m} values")
            self.messages = self._messages(layout.get("payloads"), m)
            self.state_of: dict[int, tuple[_TreeGroup, int]] = {}
            for rows, leaves in _groups(layout.get("states"), m, "leaves"):
                group = _TreeGroup(self.unpacker, len(rows), leaves, schema)
                self.state_of.update({r: (group, i) for i, r in enumerate(rows)})
        except Exception as err:  # noqa: BLE001 - anything a hostile reply triggers becomes a rejection
            self.error = PayloadError("*", "records", f"{type(err).__name__}: {err}")

    def parse(self, j: int) -> tuple[ClientReply, dict[str, Any] | None]:
        if self.error is not None:
            raise self.error
        r = self.row.get(j)
        if r is None:
            raise PayloadError("*", "reply", f"no entry for client {j} in its block's reply")
        message = self.messages[r]
        if isinstance(message, PayloadError):
            raise message
        reply = ClientReply(client=_integer(self.metrics["client"][r], "client"),
                            round=_integer(self.metrics["round"][r], "round"), message=message,
                            loss=_number(self.metrics["loss"][r], "loss"),
                            grad_evals=_integer(self.metrics["grad_evals"][r], "grad_evals"),
                            samples=_integer(self.metrics["samples"][r], "samples"))
        return reply, self._state(r)

    def _state(self, r: int) -> dict[str, Any] | None:
        where = self.state_of.get(r)
        if where is None:
            raise PayloadError("*", "state", "no proposed state")
        group, i = where
        try:
            return group.tree(i, copy=not self.views, shared=self.shared)
        except ValueError as err:
            raise PayloadError("*", "state", str(err)) from None

    def states_record(self) -> ArrayRecord:
        """The proposed states of this block's clients (in its ``clients`` order) as a
        :func:`states_to_record` record, made of the reply's own state groups and its data as received
        (no copy: the states are what the node proposed, and the server never writes into them): what
        the node needs next round when the server committed every one of them."""
        if self.error is not None:
            raise self.error
        return self.unpacker.record({"clients": self.clients, "states": self.unpacker.layout["states"]})

    def _messages(self, groups: Any, m: int) -> list[Message | PayloadError]:
        out: list[Message | PayloadError] = [PayloadError("*", "payload", "no payload")] * m
        for rows, layers in _groups(groups, m, "layers"):
            try:
                messages = self._group_messages(layers, len(rows))
            except PayloadError as err:
                messages = [err] * len(rows)
            for r, message in zip(rows, messages):
                out[r] = message
        return out

    def _group_messages(self, layers: Any, m: int) -> list[Message]:
        if not isinstance(layers, dict):
            raise PayloadError("*", "payload", f"must be a mapping of layers, got {type(layers).__name__}")
        columns = {}
        for layer, p in layers.items():
            if not isinstance(p, dict) or set(p) != {"codec", "shape", "meta", "arrays"}:
                raise PayloadError(layer, "payload", "expected the entries codec, shape, meta and arrays")
            shape, meta, arrays = p["shape"], p["meta"], p["arrays"]
            if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
                raise PayloadError(layer, "shape", f"must be a list of integers, got {shape!r}")
            if not isinstance(meta, dict) or not isinstance(arrays, dict):
                raise PayloadError(layer, "arrays", "meta and arrays must be mappings")
            if not all(isinstance(v, list) and len(v) == m for v in meta.values()):
                raise PayloadError(layer, "meta", f"each header entry must list {m} values")
            try:
                cols = {str(key): _writable(_column(self.unpacker, ref, m)) for key, ref in arrays.items()}
            except ValueError as err:
                raise PayloadError(layer, "arrays", str(err)) from None
            columns[layer] = (p["codec"], tuple(shape), meta, cols)
        return [{layer: TensorPayload(codec, shape, {key: a[r, ...] for key, a in cols.items()},
                                      {key: values[r] for key, values in meta.items()})
                 for layer, (codec, shape, meta, cols) in columns.items()} for r in range(m)]
