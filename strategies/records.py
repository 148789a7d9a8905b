"""Conversion between fedgluon's payloads / states and Flower records (the only Flower-aware code
for payloads, DESIGN §1).

* A payload message ``{layer: TensorPayload}`` becomes an ``ArrayRecord`` with one ``Array`` per
  (layer, key) named ``"<layer>/<key>"`` plus a ``ConfigRecord`` with ``"<layer>/codec"``,
  ``"<layer>/shape"`` and ``"<layer>/meta/<name>"``.
* Client state (nested dicts of tensors) becomes an ``ArrayRecord`` of two Arrays: a JSON layout
  ``[[path, dtype, shape], ...]`` and the leaves' bytes concatenated (:func:`state_to_record`).
* Every ``Array`` holds raw little-endian bytes (``stype = "fedgluon.raw"``) of a dtype from a fixed
  list of numeric types, checked against its shape on reading (:func:`from_array`); nothing a client
  sends is ever unpickled. Flower's default ``.npy`` encoding parses a Python-literal header per array
  (``ast``), which cost several ms per client of a block; raw bytes cost a copy.

:func:`records_to_message` never raises anything but :class:`compressors.PayloadError`, so a
hostile reply is rejected like any malformed payload.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from torch import Tensor

from compressors import Message, PayloadError, TensorPayload

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
    return name, tuple(a.shape), a.tobytes()


def _unraw(name: Any, shape: Any, data: Any, offset: int = 0) -> np.ndarray:
    """Inverse of :func:`_raw` on ``data[offset:]`` (a writable copy); ``ValueError`` on bad input."""
    dtype = DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise ValueError(f"array dtype must be one of {sorted(DTYPES)}, got {name!r}")
    shape = tuple(shape) if isinstance(shape, (tuple, list)) else None
    if shape is None or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ValueError(f"array shape must be non-negative integers, got {shape!r}")
    size = math.prod(shape) * dtype.itemsize
    if not isinstance(data, bytes) or len(data) < offset + size:
        raise ValueError(f"array of shape {shape} and dtype {name} needs {size} bytes at offset {offset}, "
                         f"got {len(data) if isinstance(data, bytes) else type(data).__name__}")
    return np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=offset).reshape(shape).astype(
        dtype.newbyteorder("="))


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


def message_to_records(message: Message) -> tuple[ArrayRecord, ConfigRecord]:
    arrays, config = ArrayRecord(), ConfigRecord()
    for layer, p in message.items():
        config[f"{layer}{SEP}codec"] = p.codec
        config[f"{layer}{SEP}shape"] = [int(s) for s in p.shape]
        for key, value in p.meta.items():
            config[f"{layer}{SEP}meta{SEP}{key}"] = int(value) if isinstance(value, (int, np.integer)) else float(value)
        for key, a in p.arrays.items():
            arrays[f"{layer}{SEP}{key}"] = to_array(a)
    return arrays, config


def records_to_message(arrays: Any, config: Any) -> Message:
    """Rebuild a payload message from a reply's records; any malformation is a PayloadError."""
    try:
        if not isinstance(arrays, ArrayRecord) or not isinstance(config, ConfigRecord):
            raise PayloadError("*", "records", "reply must carry an ArrayRecord 'payload' and a ConfigRecord "
                                                "'payload.header'")
        message: dict[str, TensorPayload] = {}
        for key, value in config.items():
            layer, _, rest = str(key).partition(SEP)
            p = message.setdefault(layer, TensorPayload("", (), {}, {}))
            if rest == "codec":
                p.codec = value  # type: ignore[assignment]
            elif rest == "shape":
                if not isinstance(value, list) or not all(isinstance(s, int) for s in value):
                    raise PayloadError(layer, "shape", f"must be a list of integers, got {value!r}")
                p.shape = tuple(value)
            elif rest.startswith(f"meta{SEP}"):
                p.meta[rest[5:]] = value  # type: ignore[assignment]
            else:
                raise PayloadError(layer, str(key), "unexpected header entry")
        for key in arrays.keys():
            layer, _, name = str(key).partition(SEP)
            if layer not in message:
                raise PayloadError(layer, name, "array for a layer without a header")
            message[layer].arrays[name] = from_array(arrays[key])
        return message
    except PayloadError:
        raise
    except Exception as err:  # noqa: BLE001 - anything a hostile reply triggers becomes a rejection
        raise PayloadError("*", "records", f"{type(err).__name__}: {err}") from None


def tensors_to_record(tensors: Mapping[str, Tensor]) -> ArrayRecord:
    return ArrayRecord({k: to_array(t) for k, t in tensors.items()})


def record_to_tensors(record: ArrayRecord) -> dict[str, Tensor]:
    return {k: _tensor(record[k]) for k in record.keys()}


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, path + SEP))
            if not value:
                out[path + SEP] = torch.zeros(0)  # keep empty sub-dicts
        else:
            out[path] = value
    return out


def state_to_record(state: Mapping[str, Any] | None) -> ArrayRecord:
    """Nested client state → an ArrayRecord of two Arrays: ``layout`` (UTF-8 JSON list of
    ``[path, dtype, shape]``, paths ``/``-joined; parameter names contain no ``/``) and ``data`` (the
    leaves' raw bytes, concatenated). Two Arrays per client instead of one per leaf: each Flower
    ``Array`` costs tens of µs to build."""
    layout, chunks = [], []
    for path, t in _flatten(state or {}).items():
        name, shape, data = _raw(t)
        layout.append([path, name, list(shape)])
        chunks.append(data)
    text = np.frombuffer(json.dumps(layout).encode(), dtype=np.uint8)
    return ArrayRecord({"layout": to_array(text),
                        "data": Array(dtype="uint8", shape=(sum(map(len, chunks)),), stype=RAW, data=b"".join(chunks))})


def record_to_state(record: ArrayRecord) -> dict[str, Any] | None:
    """Inverse of :func:`state_to_record`; ``ValueError`` when the record is malformed."""
    layout = json.loads(from_array(record["layout"]).tobytes().decode())
    data = record["data"]
    if not isinstance(data, Array) or data.stype != RAW or not isinstance(data.data, bytes):
        raise ValueError("state data must be a raw-bytes Array")
    if not isinstance(layout, list) or not all(isinstance(e, list) and len(e) == 3 and isinstance(e[0], str)
                                               for e in layout):
        raise ValueError("state layout must be a list of [path, dtype, shape]")
    if not layout:
        return None
    state: dict[str, Any] = {}
    offset = 0
    for path, name, shape in layout:
        a = _unraw(name, shape, data.data, offset)
        offset += a.nbytes
        *parents, leaf = path.split(SEP)
        node = state
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"state path {path!r} runs through a leaf")
        if leaf:
            node[leaf] = _as_tensor(name, a)
    if offset != len(data.data):
        raise ValueError(f"state data has {len(data.data)} bytes, its layout describes {offset}")
    return state
