"""Bytes held by client and server state: what "compact client state" is measured with.

A state is a nest of dicts, lists and tuples with tensors at the leaves. What a set of tensors holds is,
per storage, the union of the bytes they span: tensors that share memory are counted once, a view for
its own range. So the totals are what the process really holds.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from torch import Tensor
from torch.utils._pytree import tree_leaves  # torch's pytree, the one torch.func flattens with


def tensors_in(obj: Any) -> Iterator[Tensor]:
    """Every tensor in a nest of dicts, lists and tuples."""
    return (leaf for leaf in tree_leaves(obj) if isinstance(leaf, Tensor))


def nbytes(objs: Iterable[Any]) -> int:
    """Bytes the tensors of ``objs`` span, each byte counted once: per storage, the union of the byte
    ranges its tensors span (a view's range, not its whole storage's)."""
    spans: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for obj in objs:
        for t in tensors_in(obj):
            if t.numel() == 0:
                continue
            size = t.element_size()
            start = int(t.storage_offset()) * size
            end = start + size * (1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride())))
            spans.setdefault((str(t.device), t.untyped_storage().data_ptr()), []).append((start, end))
    total = 0
    for ranges in spans.values():
        reach = -1
        for start, end in sorted(ranges):
            total += max(0, end - max(start, reach))
            reach = max(reach, end)
    return total


def client_state_bytes(table: Any) -> dict[str, float]:
    """Per-client state size of a :class:`fedgluon.clients.table.ClientStateTable`: ``mean``/``max`` bytes of
    one client's row (every row has the schema's size), and ``total`` bytes of the table, its
    ``commits``/``seen`` columns and the broadcast models it keeps for ``X_prev``."""
    row = float(table.bytes_per_client)
    total = nbytes([table.columns, table.commits, table.seen, table.models])
    return {"mean": row, "max": row, "total": float(total)}


__all__ = ["client_state_bytes", "nbytes", "tensors_in"]
