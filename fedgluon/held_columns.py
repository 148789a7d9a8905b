"""Committed client states kept as views of the block columns they were proposed in.

A block's column step (:mod:`fedgluon.algorithms.columns`) proposes its clients' states as (B, *shape)
columns: in the plain driver a column tree, in the Flower engines the packed reply record. Copying
every client's leaves out of them at each commit, and stacking them back into columns for the next
round, would cost a pass over every state and a Python call per client and leaf. Instead each client's
committed state is a tree of row views of its block's columns, and the next round steps the block on
those very columns when every one of its clients still holds them (:meth:`HeldColumns.source_for`).

Memory stays that of one copy per client. After each round's commits (:meth:`HeldColumns.settle`), a
source whose clients all still hold their views is kept; one that only some still hold (the others
rejected, failed, or replaced by a later round's states while these were not sampled) has those
states copied out (:func:`copied`), so its buffer is freed; one nobody holds is dropped. So a column
buffer is alive only while every row of it is committed.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any, Generic, TypeVar

from torch import Tensor

from .algorithms.columns import shared_leaves

Source = TypeVar("Source")


class HeldColumns(Generic[Source]):
    """Sources of committed states (what the columns are read from again), by client tuple."""

    def __init__(self) -> None:
        self.held: dict[tuple[int, ...], tuple[Source, dict[int, Any]]] = {}
        self.fresh: list[tuple[Source, tuple[int, ...], dict[int, Any]]] = []

    def offer(self, source: Source, clients: Sequence[int], proposed: Mapping[int, Any]) -> None:
        """A round's block step: its source, its clients (in row order) and the proposed states (the
        trees of row views) it made."""
        self.fresh.append((source, tuple(clients), dict(proposed)))

    def settle(self, states: MutableMapping[int, Any]) -> None:
        """After the round's commits: keep the sources whose clients all hold their views, copy out the
        states of those only some hold, forget the rest (module doc)."""
        entries = [(source, clients, trees) for clients, (source, trees) in self.held.items()] + self.fresh
        self.held, self.fresh = {}, []
        for source, clients, trees in entries:
            holding = [j for j, tree in trees.items() if tree is not None and states.get(j) is tree]
            if not holding:
                continue
            if len(holding) == len(clients):
                self.held[clients] = (source, trees)
            else:
                memo: dict[int, Tensor] = {}
                for j in holding:
                    states[j] = self.copy_out(source, trees[j], memo)

    def copy_out(self, source: Source, tree: Any, memo: dict[int, Tensor]) -> Any:
        """A committed state of ``source``'s with storage of its own (:func:`copied`)."""
        return copied(tree, memo)

    def source_for(self, clients: Sequence[int], states: Mapping[int, Any]) -> Source | None:
        """The source whose columns hold the committed states of ``clients`` (in this order), or None
        when they are not all its views."""
        entry = self.held.get(tuple(clients))
        if entry is None:
            return None
        source, trees = entry
        if any(states.get(j) is not trees[j] for j in clients):
            return None
        return source


class HeldTrees(HeldColumns[dict[str, Any]]):
    """The plain driver's store: sources are column trees (:class:`~fedgluon.algorithms.columns.BlockStep`'s
    states), whose :class:`~fedgluon.algorithms.columns.Shared` leaves are tensors of their own (the
    round's model, which other clients' states hold too) and are never copied out."""

    def copy_out(self, source: dict[str, Any], tree: Any, memo: dict[int, Tensor]) -> Any:
        for t in shared_leaves(source):
            memo.setdefault(id(t), t)
        return copied(tree, memo)


def copied(tree: Any, memo: dict[int, Tensor]) -> Any:
    """A copy of a state tree with storage of its own; a tensor held by several trees copied once
    (``memo``: by the tensor's id, and a tensor ``memo`` maps to itself is kept as it is), so shared
    leaves (``x_prev``) stay shared."""
    if isinstance(tree, Tensor):
        if id(tree) not in memo:
            memo[id(tree)] = tree.clone()
        return memo[id(tree)]
    if isinstance(tree, Mapping):
        return {k: copied(v, memo) for k, v in tree.items()}
    return tree
