"""Committed client states kept as the columns their block's reply brought them in.

A node's reply packs its clients' proposed states by column (strategies/records.py). When the server
commits every one of them, it keeps the committed states as views of that reply's buffer instead of
copying each leaf of each client out, and the next round sends the block its states as the same
columns (:meth:`BlockReplies.states_record`: the reply's state layout and the bytes it came in,
which the server reads where they lie and never writes into)
instead of packing them again. A block of 100 clients of the 4.6k-parameter MLP: ≈ 4 ms of copies
and 5 ms of packing per round off the server's serial work.

Memory stays that of one copy per client: after each round's commits (:meth:`StateColumns.settle`),
a reply whose clients all still hold its views is kept; one that only some of them still hold (some
rejected, failed, or replaced by a later round's states while the others were not sampled) has
those states copied out, so its buffer is freed; one nobody holds is dropped. So a buffer is alive
only while every row of its states is committed.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

from flwr.app import ArrayRecord
from torch import Tensor

from .records import BlockReplies


class StateColumns:
    """The replies whose proposed states are committed as views of their buffers, by client tuple."""

    def __init__(self) -> None:
        self.held: dict[tuple[int, ...], tuple[BlockReplies, dict[int, Any]]] = {}
        self.fresh: list[tuple[BlockReplies, dict[int, Any]]] = []

    def offer(self, replies: BlockReplies, proposed: Mapping[int, Any]) -> None:
        """A round's block reply (parsed with ``views=True``) and the proposed states parsed from it."""
        self.fresh.append((replies, dict(proposed)))

    def settle(self, states: MutableMapping[int, Any]) -> None:
        """After the round's commits: keep the replies whose clients all hold their views, copy out the
        states of those only some hold, forget the rest (module doc)."""
        entries = list(self.held.values()) + self.fresh
        self.held, self.fresh = {}, []
        for replies, trees in entries:
            holding = [j for j, tree in trees.items() if tree is not None and states.get(j) is tree]
            if not holding:
                continue
            if len(holding) == len(replies.clients):
                self.held[tuple(replies.clients)] = (replies, trees)
            else:
                memo: dict[int, Tensor] = {}
                for j in holding:
                    states[j] = copied(trees[j], memo)

    def record_for(self, clients: Sequence[int], states: Mapping[int, Any]) -> ArrayRecord | None:
        """The states record of ``clients`` (in this order) from the reply they came in, or None when
        their committed states are not all that reply's."""
        entry = self.held.get(tuple(clients))
        if entry is None:
            return None
        replies, trees = entry
        if any(states.get(j) is not trees[j] for j in clients):
            return None
        return replies.states_record()


def copied(tree: Any, memo: dict[int, Tensor]) -> Any:
    """A copy of a state tree with storage of its own; a tensor held by several trees copied once
    (``memo``: by the tensor's id), so shared leaves (``x_prev``) stay shared."""
    if isinstance(tree, Tensor):
        if id(tree) not in memo:
            memo[id(tree)] = tree.clone()
        return memo[id(tree)]
    if isinstance(tree, Mapping):
        return {k: copied(v, memo) for k, v in tree.items()}
    return tree
