"""Conversion between fedgluon's payloads / states and Flower records (the only Flower-aware code
for payloads, DESIGN §1).

* A payload message ``{layer: TensorPayload}`` becomes an ``ArrayRecord`` with one ``Array`` per
  (layer, key) named ``"<layer>/<key>"`` plus a ``ConfigRecord`` with ``"<layer>/codec"``,
  ``"<layer>/shape"`` and ``"<layer>/meta/<name>"``. Arrays are NumPy ``.npy`` bytes that Flower
  reads with ``allow_pickle=False``; nothing a client sends is ever unpickled.
* Client state (nested dicts of tensors) becomes an ``ArrayRecord`` keyed by ``/``-joined paths.

:func:`records_to_message` never raises anything but :class:`compressors.PayloadError`, so a
hostile reply is rejected like any malformed payload.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from torch import Tensor

from compressors import Message, PayloadError, TensorPayload

SEP = "/"


def message_to_records(message: Message) -> tuple[ArrayRecord, ConfigRecord]:
    arrays, config = ArrayRecord(), ConfigRecord()
    for layer, p in message.items():
        config[f"{layer}{SEP}codec"] = p.codec
        config[f"{layer}{SEP}shape"] = [int(s) for s in p.shape]
        for key, value in p.meta.items():
            config[f"{layer}{SEP}meta{SEP}{key}"] = int(value) if isinstance(value, (int, np.integer)) else float(value)
        for key, a in p.arrays.items():
            arrays[f"{layer}{SEP}{key}"] = Array(np.ascontiguousarray(a))
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
            message[layer].arrays[name] = arrays[key].numpy()
        return message
    except PayloadError:
        raise
    except Exception as err:  # noqa: BLE001 - anything a hostile reply triggers becomes a rejection
        raise PayloadError("*", "records", f"{type(err).__name__}: {err}") from None


def tensors_to_record(tensors: Mapping[str, Tensor]) -> ArrayRecord:
    return ArrayRecord({k: Array(t.detach().cpu().contiguous().numpy()) for k, t in tensors.items()})


def record_to_tensors(record: ArrayRecord) -> dict[str, Tensor]:
    return {k: torch.from_numpy(np.array(record[k].numpy())) for k in record.keys()}


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
