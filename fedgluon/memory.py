"""Bytes held by client and server state: what "compact client state" is measured with.

A state is a nest of dicts, lists and tuples with tensors at the leaves. Tensors that share storage
(in the plain driver a client's ``x_prev`` is the broadcast model itself, shared by every client of
that round: ``Algorithm.finish_client_step``) are counted once, by their storage, so the totals are what the process really holds.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from torch import Tensor
from torch.utils._pytree import tree_leaves  # torch's pytree, the one torch.func flattens with


def tensors_in(obj: Any) -> Iterator[Tensor]:
    """Every tensor in a nest of dicts, lists and tuples."""
    return (leaf for leaf in tree_leaves(obj) if isinstance(leaf, Tensor))


def nbytes(objs: Iterable[Any], seen: set[tuple[str, int]] | None = None) -> int:
    """Bytes of the distinct storages the tensors of ``objs`` use (a storage counted once, also across
    calls that pass the same ``seen`` set)."""
    seen = set() if seen is None else seen
    total = 0
    for obj in objs:
        for t in tensors_in(obj):
            storage = t.untyped_storage()
            key = (str(t.device), storage.data_ptr())
            if key in seen:
                continue
            seen.add(key)
            total += storage.nbytes()
    return total


def client_state_bytes(states: Mapping[int, Any]) -> dict[str, float]:
    """Per-client state size: ``mean``/``max`` bytes of one client alone, and ``total`` bytes of all of
    them together (shared storages once)."""
    alone = [nbytes([s]) for s in states.values()]
    return {"mean": sum(alone) / len(alone) if alone else 0.0, "max": float(max(alone, default=0)),
            "total": float(nbytes(states.values()))}


__all__ = ["client_state_bytes", "nbytes", "tensors_in"]
