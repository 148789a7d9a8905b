"""Conversion between fedgluon's payloads / states and Flower records (the only Flower-aware code
for payloads, DESIGN §1).

* A payload message ``{layer: TensorPayload}`` becomes an ``ArrayRecord`` with one ``Array`` per
  (layer, key) named ``"<layer>/<key>"`` plus a ``ConfigRecord`` with ``"<layer>/codec"``,
  ``"<layer>/shape"`` and ``"<layer>/meta/<name>"``. Arrays are NumPy ``.npy`` bytes that Flower
  reads with ``allow_pickle=False``; nothing a client sends is ever unpickled.
* Client state (nested dicts of tensors) becomes an ``ArrayRecord`` keyed by ``/``-joined paths.
* Every ``Array`` holds raw little-endian bytes (``stype = "fedgluon.raw"``) of a dtype from a fixed
  list of numeric types, checked against its shape on reading (:func:`from_array`). Flower's default
  ``.npy`` encoding parses a Python-literal header per array (``ast``), which cost several ms per
  client of a block; raw bytes cost a copy.

:func:`records_to_message` never raises anything but :class:`compressors.PayloadError`, so a
hostile reply is rejected like any malformed payload.
"""

from __future__ import annotations

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


def to_array(a: np.ndarray | Tensor) -> Array:
    """A NumPy array or tensor as a raw-bytes Flower ``Array`` (module docstring)."""
    name = None
    if isinstance(a, Tensor):
        t = a.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            name, t = "bfloat16", t.view(torch.int16)
        a = t.numpy()
    name = name or a.dtype.name
    if name not in DTYPES:
        raise TypeError(f"cannot send an array of dtype {a.dtype}; allowed: {sorted(DTYPES)}")
    data = np.ascontiguousarray(a, dtype=DTYPES[name]).tobytes()
    return Array(dtype=name, shape=tuple(int(s) for s in a.shape), stype=RAW, data=data)


def from_array(arr: Array) -> np.ndarray:
    """The NumPy array of a raw-bytes ``Array`` (a writable copy); ``ValueError`` on anything else."""
    if not isinstance(arr, Array) or arr.stype != RAW:
        raise ValueError(f"expected an Array with stype {RAW!r}, got {getattr(arr, 'stype', type(arr).__name__)!r}")
    dtype = DTYPES.get(arr.dtype) if isinstance(arr.dtype, str) else None
    if dtype is None:
        raise ValueError(f"array dtype must be one of {sorted(DTYPES)}, got {arr.dtype!r}")
    shape = tuple(arr.shape)
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ValueError(f"array shape must be non-negative integers, got {shape!r}")
    if not isinstance(arr.data, bytes) or len(arr.data) != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"array of shape {shape} and dtype {arr.dtype} needs {math.prod(shape) * dtype.itemsize} "
                         f"bytes, got {len(arr.data) if isinstance(arr.data, bytes) else type(arr.data).__name__}")
    return np.frombuffer(arr.data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _tensor(arr: Array) -> Tensor:
    t = torch.from_numpy(from_array(arr))
    return t.view(torch.bfloat16) if arr.dtype == "bfloat16" else t


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
    """Nested client state → ArrayRecord (keys are ``/``-joined paths; parameter names contain no ``/``)."""
    return tensors_to_record(_flatten(state or {}))


def record_to_state(record: ArrayRecord) -> dict[str, Any] | None:
    flat = record_to_tensors(record)
    if not flat:
        return None
    state: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split(SEP)
        node = state
        for p in parents:
            node = node.setdefault(p, {})
        if leaf:
            node[leaf] = value
    return state
