"""Test helper: read and rewrite the packed ``replies`` record of a node's reply (strategies/records.py),
the way a hostile or broken node could."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

from strategies.records import ALIGN, DTYPES, RAW, from_json_array, json_array


class PackedEdit:
    def __init__(self, content):
        self.content = content
        record = content.array_records["replies"]
        self.layout = from_json_array(record["layout"])
        self.data = bytearray(record["data"].data)

    def row(self, j: int) -> int:
        """Client j's row in the block (its index in the metric lists)."""
        return self.layout["clients"].index(j)

    def group(self, j: int, section: str) -> tuple[dict, int]:
        """The ``payloads`` or ``states`` group holding client j, and j's position in it."""
        r = self.row(j)
        group = next(g for g in self.layout[section] if r in g["rows"])
        return group, group["rows"].index(r)

    def layers(self, j: int) -> tuple[dict, int]:
        """The payload layers of client j's group (columns: one row per client of the group), and j's row."""
        group, i = self.group(j, "payloads")
        return group["layers"], i

    def array(self, ref) -> np.ndarray:
        name, shape, offset = ref
        return np.frombuffer(bytes(self.data), dtype=DTYPES[name], count=int(np.prod(shape)),
                             offset=offset).reshape(shape).copy()

    def append(self, a: np.ndarray | bytes, name: str | None = None, shape=None) -> list:
        """Append an array (or raw bytes claimed to be ``name`` of ``shape``) and return its reference."""
        self.data += bytes(-len(self.data) % ALIGN)
        offset = len(self.data)
        if isinstance(a, np.ndarray):
            name, shape, a = a.dtype.name, list(a.shape), np.ascontiguousarray(a).tobytes()
        self.data += a
        return [name, list(shape), offset]

    def save(self) -> None:
        self.content["replies"] = ArrayRecord({"layout": json_array(self.layout), "data": Array(
            dtype="uint8", shape=(len(self.data),), stype=RAW, data=bytes(self.data))})
