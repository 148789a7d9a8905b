"""The wire format between the server and a node: Flower records derived from the client-state schema.

A node steps a block of clients (fedgluon/clients/blocks.py) over its rows of the client-state table, so what
travels is one Flower ``Array`` per *column*, never one per client:

* server → node (:func:`rows_to_record`): ``states`` holds the block's rows, one array per state
  path ``(B, *shape)`` plus ``@commits`` and ``@seen`` ((B,) int64), and ``prev`` the broadcast models
  the rows' ``seen`` rounds point at (``<round>/<name>``), when the algorithm needs ``X_prev``.
* node → server (:func:`results_to_records`): per run ``r`` of the block's step
  (``Algorithm.step_block``), the ``replies`` ArrayRecord holds ``r/s/<path>`` (the proposed state
  columns) and ``r/p/<group>/<layer>/<key>`` (payload arrays, row i the group's i-th client), and the
  ``meta`` ConfigRecord holds ``r/clients``, the metric lists (``r/loss``, ``r/grad_evals``,
  ``r/samples``), the failed rows (``r/failed``, ``r/why``), each group's ``rows`` and, per layer,
  its ``codec``, ``shape`` and header lists.

Every ``Array`` holds raw little-endian bytes (``stype = "fedgluon.raw"``) of a dtype from a fixed list;
nothing a node sends is ever unpickled. :func:`read_replies` checks what docs/DESIGN.md §3 ("Flower apps and
transport", "Client state") says, before it copies anything: the number of arrays and their total size
(:func:`max_reply_bytes`), each state column's dtype, shape and byte size against the schema (a mismatch
rejects the clients of that run); then it scans the state columns for NaN/Inf row by row (that client alone
is rejected). The compressors' decoders check the payload arrays in the server step.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from torch import Tensor

from compressors.message import max_layer_bytes
from compressors.payload import PayloadRows, RowMessage
from fedgluon.algorithms import ClientReply
from fedgluon.algorithms.block import BlockResult, Proposal
from fedgluon.clients.table import ClientRows, ClientStateTable, flatten, nest
from fedgluon.core.text import MAX_CLIENT_TEXT, shown

RAW = "fedgluon.raw"
# dtype names an Array may carry -> little-endian NumPy dtype (bfloat16 travels as its int16 bit pattern)
NUMPY = ("bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "int64", "float16", "float32", "float64")
DTYPES = {name: np.dtype(name).newbyteorder("<") for name in NUMPY}
DTYPES["bfloat16"] = np.dtype("<i2")
TORCH_NAMES = {getattr(torch, name): name for name in (*NUMPY, "bfloat16")}
GROUPS = ("dense", "uplink")  # the payload groups an algorithm may ask for (Algorithm.reply_group)
MAX_PARTS = 8  # the most arrays one layer's payload rows may have (indices, values, factors, bits)


class WireError(ValueError):
    """A record does not have the layout the reader expects."""


# ---------------------------------------------------------------------------------------------- arrays
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


class RawArray(Array):
    """A raw-bytes Flower ``Array`` that holds its values as a flat ``uint8`` NumPy array, not ``bytes``, which
    it may share with the tensor it was made from (docs/DESIGN.md §3, "Flower apps and transport"); the reader
    (:func:`_view`) takes the array itself. ``data`` makes the bytes only for Flower's gRPC serialisation, which
    writes an object's ``__qualname__`` into its header: a ``RawArray`` presents itself as ``Array`` there.
    Unpickling (Ray's out-of-band buffers) rebuilds one from its dtype name, shape, stype and buffer (no object
    of the sender's choosing)."""

    __qualname__ = "Array"

    def __init__(self, dtype: str, shape: tuple[int, ...], stype: str, values: np.ndarray) -> None:
        self.__dict__.update(dtype=dtype, shape=shape, stype=stype, values=values)

    @property
    def data(self) -> bytes:
        if "_bytes" not in self.__dict__:
            self.__dict__["_bytes"] = self.__dict__["values"].tobytes()
        return self.__dict__["_bytes"]

    @data.setter
    def data(self, value: bytes) -> None:
        self.__dict__.update(values=np.frombuffer(value, dtype=np.uint8), _bytes=value)

    def __reduce__(self):
        return _raw_array, (self.dtype, tuple(self.shape), self.stype, self.__dict__["values"])


def _raw_array(dtype: str, shape: tuple[int, ...], stype: str, values: np.ndarray) -> RawArray:
    return RawArray(dtype, shape, stype, values)  # checked by its reader (_view), like any Array


def to_array(a: np.ndarray | Tensor) -> Array:
    """A NumPy array or tensor as a raw-bytes Flower ``Array`` sharing its memory when it is a C-contiguous
    little-endian CPU array already (:class:`RawArray`)."""
    name, b = _little_endian(a)
    return RawArray(name, tuple(b.shape), RAW, b.reshape(-1).view(np.uint8))


def array_record(arrays: Mapping[str, Array]) -> ArrayRecord:
    """An ``ArrayRecord`` holding these very Arrays (``ArrayRecord(dict)`` would copy each into a plain
    ``Array``, losing :class:`RawArray`'s pickling)."""
    record = ArrayRecord()
    for key, array in arrays.items():
        record[key] = array
    return record


def _view(arr: Any, dtype: str | None = None, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A read-only NumPy view of a raw ``Array``'s bytes, its header checked first (``dtype`` and
    ``shape`` when given, else any allowed ones) and its byte count against them; WireError otherwise."""
    if not isinstance(arr, Array) or arr.stype != RAW:
        raise WireError(f"expected an Array with stype {RAW!r}, got {getattr(arr, 'stype', type(arr).__name__)!r}")
    if not isinstance(arr.dtype, str) or arr.dtype not in DTYPES or (dtype is not None and arr.dtype != dtype):
        raise WireError(f"array dtype {str(arr.dtype)[:20]!r}, expected {dtype or sorted(DTYPES)}")
    got = tuple(arr.shape) if isinstance(arr.shape, (list, tuple)) else None
    if got is None or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in got) or \
            (shape is not None and got != shape):
        raise WireError(f"array shape {str(arr.shape)[:60]}, expected {shape if shape is not None else 'sizes'}")
    size = math.prod(got) * DTYPES[arr.dtype].itemsize
    buffer = arr.__dict__.get("values") if isinstance(arr, RawArray) else arr.data
    if isinstance(buffer, np.ndarray):
        ok = buffer.dtype == np.uint8 and buffer.ndim == 1 and buffer.flags.c_contiguous and buffer.nbytes == size
    else:
        ok = isinstance(buffer, bytes) and len(buffer) == size
    if not ok:
        raise WireError(f"array of shape {got} and dtype {arr.dtype} needs {size} bytes")
    try:  # NumPy refuses more than 32 or 64 dimensions, and sizes past its index range even when empty
        view = np.frombuffer(buffer, dtype=DTYPES[arr.dtype], count=math.prod(got)).reshape(got)
    except ValueError as err:
        raise WireError(f"array shape {str(got)[:60]}: {err}") from None
    view.flags.writeable = False  # the sender's memory, when it is in this process
    return view


def _tensor(arr: Any, dtype: str | None = None, shape: tuple[int, ...] | None = None) -> Tensor:
    """:func:`_view` as a tensor sharing the received bytes (read-only: nobody writes into it; torch
    warns about read-only memory once, which is silenced here)."""
    a = _view(arr, dtype, shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(a) if a.dtype.isnative else torch.from_numpy(a.astype(a.dtype.newbyteorder("=")))
    return t.view(torch.bfloat16) if arr.dtype == "bfloat16" else t


def tensors_to_record(tensors: Mapping[str, Tensor]) -> ArrayRecord:
    return array_record({k: to_array(t) for k, t in tensors.items()})


def record_to_tensors(record: ArrayRecord) -> dict[str, Tensor]:
    return {k: _tensor(record[k]) for k in record.keys()}


# ---------------------------------------------------------------------------------------------- server → node
def rows_to_record(rows: ClientRows) -> tuple[ArrayRecord, ArrayRecord]:
    """A block's committed rows as the ``states`` and ``prev`` records (module docstring)."""
    arrays = {p: to_array(t) for p, t in flatten(rows.tree).items()}
    arrays.update({"@commits": to_array(rows.commits), "@seen": to_array(rows.seen)})
    prev = {f"{r}/{n}": to_array(t) for r, model in rows.models.items() for n, t in model.items()}
    return array_record(arrays), array_record(prev)


def record_to_rows(clients: Sequence[int], states: ArrayRecord, prev: ArrayRecord) -> ClientRows:
    """The node's side of :func:`rows_to_record` (tensors sharing the received bytes)."""
    columns = {k: _tensor(states[k]) for k in states.keys() if not k.startswith("@")}
    models: dict[int, dict[str, Tensor]] = {}
    for key in prev.keys():
        r, _, name = key.partition("/")
        models.setdefault(int(r), {})[name] = _tensor(prev[key])
    return ClientRows(list(clients), nest(columns), _tensor(states["@commits"]).clone(),
                      _tensor(states["@seen"]).clone(), models)


# ---------------------------------------------------------------------------------------------- node → server
def results_to_records(results: Sequence[BlockResult],
                       derived: tuple[str, ...] = ()) -> tuple[ArrayRecord, ConfigRecord]:
    """A block's run results as the ``replies`` and ``meta`` records (module docstring); state paths under
    a ``derived`` prefix do not travel (the server computes them: ``Algorithm.derive_state``)."""
    arrays: dict[str, Array] = {}
    meta = ConfigRecord({"runs": len(results)})
    for r, res in enumerate(results):
        meta[f"{r}/clients"] = list(res.clients)
        meta[f"{r}/round"] = res.round
        meta[f"{r}/loss"] = [float(x) for x in res.loss]
        meta[f"{r}/grad_evals"] = [int(x) for x in res.grad_evals]
        meta[f"{r}/samples"] = [int(x) for x in res.samples]
        meta[f"{r}/failed"] = sorted(res.failed)
        meta[f"{r}/why"] = [str(res.failed[i]) for i in sorted(res.failed)]
        arrays.update({f"{r}/s/{p}": to_array(t) for p, t in res.proposal(derived).columns.items()})
        meta[f"{r}/groups"] = sorted(res.groups)
        for g, group in res.groups.items():
            meta[f"{r}/p/{g}/rows"] = list(group.rows)
            meta[f"{r}/p/{g}/layers"] = list(group.layers)
            for n, rows in group.layers.items():
                key = f"{r}/p/{g}/{n}"
                meta[f"{key}/codec"], meta[f"{key}/shape"] = rows.codec, list(rows.shape)
                meta[f"{key}/arrays"], meta[f"{key}/meta"] = list(rows.arrays), list(rows.meta)
                arrays.update({f"{key}/{k}": to_array(a) for k, a in rows.arrays.items()})
                meta.update({f"{key}/m/{k}": list(v) for k, v in rows.meta.items()})
    return array_record(arrays), meta


@dataclass
class BlockRead:
    """What the server reads of one block's reply, or of a phase's replies (:meth:`merge`): its clients'
    replies, the proposed state columns of each run (:data:`fedgluon.sim.federation.Proposal`), failed and
    rejected clients with their reasons, those failed by a runtime error code (``died``: the worker died),
    and the node's Ray node id and device (where it computed its gradients, the Ray GPU ids it held)."""

    replies: dict[int, ClientReply] = field(default_factory=dict)
    proposed: list[Proposal] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)
    died: dict[int, str] = field(default_factory=dict)
    ray_node: str = ""
    device: tuple[str, str] | None = None

    def merge(self, other: BlockRead) -> None:
        """Add ``other``'s clients (their replies, proposals, failures and rejections) to these."""
        self.failed.update(other.failed)
        self.died.update(other.died)
        self.replies.update(other.replies)
        self.proposed.extend(other.proposed)
        self.rejected.update(other.rejected)


def read_replies(arrays: Any, meta: Any, clients: Sequence[int], round_: int, table: ClientStateTable,
                 shapes: Mapping[str, tuple[int, ...]], derived: tuple[str, ...] = ()) -> BlockRead:
    """One block's reply (``clients``: the block's clients the server sent; ``shapes``: the model's;
    ``derived``: the state paths the server computes, which must not come), checked as the module
    docstring says. A reply whose layout cannot be read rejects every client of the block;
    a run whose state columns do not fit the schema rejects the clients of that run."""
    out = BlockRead()
    try:
        if not isinstance(arrays, ArrayRecord) or not isinstance(meta, ConfigRecord):
            raise WireError("the reply lacks its 'replies' or 'meta' record")
        passed: list[str] = []  # prefixes of rejected runs and payload groups, left unread in both records
        meta = _Noted(meta, passed)
        runs = _int(meta.get("runs"), "runs", 0, len(clients))
        bound = len(clients) * (len(table.columns) + len(GROUPS) * len(shapes) * MAX_PARTS)
        if len(arrays) > bound:  # before reading any of them: a reply of 200,000 arrays is refused here
            raise WireError(f"the reply holds {len(arrays)} arrays, more than a block of {len(clients)} may")
        size, most = sum(_declared_bytes(a) for a in arrays.values()), max_reply_bytes(table, shapes, len(clients))
        if size > most:
            raise WireError(f"the reply holds {size} bytes of arrays, more than the {most} a block of "
                            f"{len(clients)} clients may")
        keys = list(arrays)  # the one walk over the arrays' keys
        stated = Counter(r for r, _, rest in (k.partition("/") for k in keys) if rest.startswith("s/"))
        arrays = _Noted(arrays, passed)
        expected = table.travelling(derived)
        wanted, seen = set(clients), set()
        for r in range(runs):
            js = [_int(j, "clients", 0, table.num_clients - 1) for j in _list(meta, f"{r}/clients", most=len(clients))]
            if not js or len(set(js)) != len(js) or not set(js) <= wanted - seen or js != sorted(js):
                raise WireError(f"run {r}'s clients {str(js)[:80]} are not sorted new clients of {list(clients)[:20]}")
            seen.update(js)
            try:
                _read_run(arrays, meta, r, js, round_, expected, shapes, stated[str(r)], out)
            except _Reject as err:
                out.rejected.update(dict.fromkeys(js, str(err)))
                passed.append(f"{r}/")
        extra = arrays.unasked(keys) + meta.unasked(list(meta.record))
        if extra:
            raise WireError(f"{len(extra)} key(s) the server does not expect, e.g. {shown(extra[:3], 120)}")
        for j in wanted - seen:
            out.failed[j] = "the node's reply does not cover this client"
        for j in out.rejected:  # a row the node calls failed but whose state is bad: rejected, counted once
            out.failed.pop(j, None)
    except WireError as err:
        return BlockRead(rejected=dict.fromkeys(clients, f"reply: {err}"))
    return out


def _read_run(arrays: _Noted, meta: _Noted, r: int, js: list[int], round_: int,
              expected: Mapping[str, Tensor], shapes: Mapping[str, tuple[int, ...]], stated: int,
              out: BlockRead) -> None:
    """Run ``r`` of a block's reply (its clients ``js``; ``expected``: the state columns that travel;
    ``stated``: how many ``r/s/`` arrays the reply holds)."""
    b = len(js)
    if _int(meta.get(f"{r}/round"), "round", 0, 2 ** 62) != round_:
        raise WireError(f"run {r} is for round {meta.get(f'{r}/round')}, expected {round_}")
    loss = [_number(x, "loss") for x in _list(meta, f"{r}/loss", b)]
    evals = [_int(x, "grad_evals", 0, 2 ** 31) for x in _list(meta, f"{r}/grad_evals", b)]
    samples = [_int(x, "samples", 0, 2 ** 62) for x in _list(meta, f"{r}/samples", b)]
    failed = [_int(i, "failed", 0, b - 1) for i in _list(meta, f"{r}/failed", most=b, unique=True)]
    why = _list(meta, f"{r}/why", len(failed))
    out.failed.update({js[i]: shown(w, MAX_CLIENT_TEXT, as_repr=False) for i, w in zip(failed, why)})
    try:  # the state columns, checked against the schema before any byte is read
        columns = {p: _tensor(arrays[f"{r}/s/{p}"], _dtype_name(c.dtype), (b, *c.shape[1:]))
                   for p, c in expected.items()}
        if stated != len(columns):
            raise WireError("state columns the schema does not have")
    except KeyError as err:
        raise _Reject(f"state: no column {str(err)[:100]}") from None
    except WireError as err:
        raise _Reject(f"state: {err}") from None
    bad = _non_finite_rows(columns, b)
    out.rejected.update({js[i]: "state: NaN/Inf in a proposed state column" for i in bad})
    out.proposed.append(Proposal(js, columns))
    groups = _list(meta, f"{r}/groups", most=len(GROUPS), unique=True)
    taken: set[int] = set(failed) | set(bad)
    for g in groups:
        if g not in GROUPS:
            raise WireError(f"unknown payload group {shown(g, 40)}")
        rows = [_int(i, "rows", 0, b - 1) for i in _list(meta, f"{r}/p/{g}/rows", most=b, unique=True)]
        if not rows:  # a group is listed for its clients: an empty one could only hide unread keys
            raise WireError(f"run {r}'s payload group {g!r} lists no rows")
        try:
            names = _list(meta, f"{r}/p/{g}/layers", most=len(shapes), unique=True)
            if not all(isinstance(n, str) for n in names):
                raise WireError("layer names must be strings")
            layers = {n: _payload_rows(arrays, meta, f"{r}/p/{g}/{n}", len(rows), shapes.get(n)) for n in names}
        except WireError as err:
            out.rejected.update({js[i]: f"payload: {err}" for i in rows if i not in taken})
            taken.update(rows)
            meta.passed.append(f"{r}/p/{g}/")  # the list both records share
            continue
        for pos, i in enumerate(rows):
            if i in taken:
                continue
            taken.add(i)
            out.replies[js[i]] = ClientReply(js[i], round_, RowMessage(layers, pos),
                                             loss[i], evals[i], samples[i], group=g)
    for i in set(range(b)) - taken:
        out.failed[js[i]] = "the node sent neither a payload nor a failure for this client"


class _Reject(WireError):
    """A run whose state columns do not fit: its clients are rejected, the rest of the block is read."""


class _Noted:
    """A record whose reads are noted: the keys a reply holds beyond those the reader asked for (outside the
    prefixes in ``passed``, which a reply's two records share: a rejected run or payload group, left unread)
    are :meth:`unasked`."""

    def __init__(self, record: Any, passed: list[str]) -> None:
        self.record, self.asked, self.passed = record, set[str](), passed

    def __getitem__(self, key: str) -> Any:
        self.asked.add(key)
        return self.record[key]

    def get(self, key: str, default: Any = None) -> Any:
        self.asked.add(key)
        return self.record.get(key, default)

    def unasked(self, keys: Sequence[str]) -> list[str]:
        passed = tuple(self.passed)
        return [k for k in keys if k not in self.asked and not (passed and k.startswith(passed))]


def _payload_rows(arrays: _Noted, meta: _Noted, key: str, rows: int,
                  layer_shape: tuple[int, ...] | None) -> PayloadRows:
    codec, shape = meta.get(f"{key}/codec"), meta.get(f"{key}/shape")
    if not isinstance(codec, str) or not isinstance(shape, list) or layer_shape is None:
        raise WireError(f"{key[:80]}: not a layer of the model, or no codec or shape")
    max_bytes = max_layer_bytes(tuple(layer_shape))
    names = _list(meta, f"{key}/arrays", most=MAX_PARTS, unique=True)
    shape_t = tuple(_int(d, "shape", 0, 2 ** 40) for d in shape)
    got = {}
    for k in names:
        a = _view(arrays.get(f"{key}/{k}"))
        if a.ndim < 1 or a.shape[0] != rows or a.nbytes > rows * max_bytes:
            raise WireError(f"{key}/{k}: {a.shape} is not {rows} rows of at most {max_bytes} bytes")
        got[str(k)] = a
    heads = {str(k): _list(meta, f"{key}/m/{k}", rows) for k in _list(meta, f"{key}/meta", most=MAX_PARTS, unique=True)}
    return PayloadRows(codec, shape_t, got, heads)


def _declared_bytes(arr: Any) -> int:
    """The bytes an ``Array``'s header declares (its data is checked against them before it is read)."""
    shape = getattr(arr, "shape", None)
    if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise WireError(f"array shape {str(shape)[:60]} is not sizes")
    dtype = getattr(arr, "dtype", None)
    return math.prod(shape) * (DTYPES[dtype].itemsize if isinstance(dtype, str) and dtype in DTYPES else 8)


def max_reply_bytes(table: ClientStateTable, shapes: Mapping[str, tuple[int, ...]], clients: int) -> int:
    """The most bytes of arrays a block reply of ``clients`` clients may hold: their proposed state rows
    (the schema's size) and a payload per client with every layer at its bound
    (:func:`compressors.message.max_layer_bytes`). A deployment's transport cap can be set from it."""
    return clients * (table.schema.nbytes + sum(max_layer_bytes(tuple(s)) for s in shapes.values()))


def _non_finite_rows(columns: Mapping[str, Tensor], b: int) -> list[int]:
    """Rows holding a NaN/Inf in any floating-point column, one NumPy pass per column (``np.isfinite``
    over a (B, d) float32 column is faster than ``torch.isfinite``: BENCHMARKS.md)."""
    bad = np.zeros(b, dtype=bool)
    for t in columns.values():
        if t.is_floating_point() and t.numel():
            a = (t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()).reshape(b, -1)
            if t.dtype == torch.bfloat16:  # exponent bits all ones: Inf or NaN
                bad |= ((a & 0x7F80) == 0x7F80).any(axis=1)
            else:
                bad |= ~np.isfinite(a).all(axis=1)
    return np.flatnonzero(bad).tolist()


def _dtype_name(dtype: torch.dtype) -> str:
    return TORCH_NAMES[dtype]


def _list(meta: _Noted, key: str, length: int | None = None, *, most: int | None = None,
          unique: bool = False) -> list[Any]:
    """``meta[key]`` as a list: of ``length`` entries, or at most ``most``, without repeats when ``unique``
    (a list of ids the server loops over must not make it loop more than the block allows)."""
    value = meta.get(key)
    if not isinstance(value, list) or (length is not None and len(value) != length):
        raise WireError(f"{shown(key, 80)} must be a list{'' if length is None else f' of {length}'}")
    if most is not None and len(value) > most:
        raise WireError(f"{shown(key, 80)} lists {len(value)} entries, at most {most} allowed")
    if unique:
        try:
            distinct = len(set(value))
        except TypeError:  # an unhashable entry (a list): compare their text
            distinct = len({shown(v, 80) for v in value})
        if distinct != len(value):
            raise WireError(f"{shown(key, 80)} repeats an entry")
    return value


def _int(value: Any, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise WireError(f"{what} must be an integer in [{low}, {high}], got {shown(value, 40)}")
    return value


def _number(value: Any, what: str) -> float:
    """A number sent as a metric (a loss, say) as a float. NaN and ±Inf pass here: a failed row, or a phase
    after the first, has no loss, and the federation rejects an accepted client's non-finite loss on its
    own (:func:`fedgluon.sim.federation._non_finite_losses`), so one client's value never rejects its
    block-mates."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise WireError(f"{what} must be a number, got {shown(value, 40)}")
    try:
        return float(value)
    except OverflowError:  # an int beyond float's range
        raise WireError(f"{what} must be a float, got {shown(value, 40)}") from None


