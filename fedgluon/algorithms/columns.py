"""A block's client step on columns: the states, gradients, estimates, trackers and payloads of a
node's B clients as (B, *shape) tensors from the states record to the reply record.

:meth:`Algorithm.client_block` takes and returns one tree per client, which costs a dict, a tensor
view and a Python call per client and leaf at every stage (unpacking, estimating, error feedback,
proposing, packing): for 100 clients of the 4.6k-parameter MLP about as much as the arithmetic. The
states record already holds them by column (strategies/records.py), so a node whose clients share
one state layout steps them as columns (:meth:`FeedbackUplink.column_block`):

    G_B = vmap(∇ℓ)(X, batches)                      # (B, *shape) per layer, one call
    V_B, est' = estimator(est_B, G_B)               # elementwise estimators only (EMA, MVR, SARAH)
    R_B = C(V_B − g_B) row by row;  g'_B = g_B + R_B # EF21 (Compressor.encode, row by row)
    commits' = commits + 1;  x_prev' = X (one tensor for all rows)

Every row equals the per-client step bitwise (elementwise operations and row-wise selections do not
depend on the rows around them), and the reply record it packs is byte for byte the one
:func:`strategies.records.replies_to_record` makes of ``client_block``'s results (tested). Blocks it
does not cover (other estimators or feedback, mixed state layouts, batches of different shapes, a
non-finite estimate) return None and take the per-client path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from compressors.payload import PayloadRows

from ..blocks import run_slices
from .base import ClientReply


@dataclass
class Shared:
    """A leaf every row of a column tree holds as this one tensor (``x_prev``: the round's model)."""

    tensor: Tensor


@dataclass
class BlockColumns:
    """The committed states of a block's clients (``clients``, in row order) of one layout: ``tree`` is
    their nested dict with (B, *shape) tensors or :class:`Shared` leaves (an empty sub-dict stays
    empty), or None when no client has a state yet."""

    clients: list[int]
    tree: dict[str, Any] | None

    def runs(self, per: int) -> list[BlockColumns]:
        """The block as consecutive runs of ``per`` clients (:func:`fedgluon.blocks.run_slices`), each
        tree's (B, *shape) leaves sliced to its rows (views), :class:`Shared` leaves as they are."""
        return [BlockColumns(self.clients[rows], None if self.tree is None else _rows_of(self.tree, rows))
                for rows in run_slices(len(self.clients), per)]


def _rows_of(tree: dict[str, Any], rows: slice) -> dict[str, Any]:
    return {k: v[rows] if isinstance(v, Tensor) else v if isinstance(v, Shared) else _rows_of(v, rows)
            for k, v in tree.items()}


@dataclass
class BlockStep:
    """A block's replies as columns: per layer the clients' payload rows (layers in message order), the
    proposed states as a column tree (as :class:`BlockColumns`), and one metric value per client."""

    clients: list[int]
    round: int
    payloads: dict[str, PayloadRows]
    states: dict[str, Any]
    loss: list[float]
    grad_evals: list[int]
    samples: list[int] = field(default_factory=list)

    def results(self) -> dict[int, tuple[dict[str, Any], ClientReply]]:
        """What :meth:`Algorithm.client_block` returns for the same clients: per client its proposed
        state (:func:`column_rows`: row views of the columns, shared leaves as the tensor itself) and its
        reply (the payloads' rows, :meth:`PayloadRows.payload`)."""
        trees = column_rows(self.states, len(self.clients))
        return {j: (trees[i], ClientReply(j, self.round, {n: rows.payload(i) for n, rows in self.payloads.items()},
                                          self.loss[i], self.grad_evals[i], self.samples[i]))
                for i, j in enumerate(self.clients)}


def shared_leaves(tree: dict[str, Any]) -> list[Tensor]:
    """The tensors of a column tree's :class:`Shared` leaves."""
    out: list[Tensor] = []
    for value in tree.values():
        if isinstance(value, Shared):
            out.append(value.tensor)
        elif type(value) is dict:
            out += shared_leaves(value)
    return out


def stacked_columns(trees: list[Any]) -> dict[str, Any] | None:
    """The column tree of ``trees`` (the inverse of :func:`column_rows`, copying): a leaf every tree holds
    as one tensor object stays that tensor (:class:`Shared`: ``x_prev``, the round's model), other
    tensor leaves are stacked into (B, *shape) columns; None unless every tree is a dict with the
    first one's keys (in its order), nesting, dtypes and shapes."""
    first = trees[0]
    if not all(type(t) is dict and t.keys() == first.keys() for t in trees):
        return None
    out: dict[str, Any] = {}
    for key, value in first.items():
        column = [t[key] for t in trees]
        if isinstance(value, Tensor):
            if not all(isinstance(t, Tensor) and t.dtype == value.dtype and t.shape == value.shape for t in column):
                return None
            out[key] = Shared(value) if all(t is value for t in column) else torch.stack(column)
        elif type(value) is dict:
            sub = stacked_columns(column)
            if sub is None:
                return None
            out[key] = sub
        else:
            return None
    return out


def column_rows(tree: dict[str, Any], rows: int) -> list[dict[str, Any]]:
    """The ``rows`` trees a column tree holds: row i of every (B, *shape) leaf (a view), a
    :class:`Shared` leaf's tensor itself in every tree, an empty sub-dict as an empty dict."""
    out: list[dict[str, Any]] = [{} for _ in range(rows)]
    for key, value in tree.items():
        if isinstance(value, Shared):
            parts: Any = [value.tensor] * rows
        elif isinstance(value, Tensor):
            parts = value.unbind(0)
        else:
            parts = column_rows(value, rows)
        for node, part in zip(out, parts):
            node[key] = part
    return out


def column_params(tree: dict[str, Any]) -> tuple[dict[str, Tensor] | None, dict[str, Tensor] | None]:
    """A column tree's parameter dict (``x_prev``) as (shared, None) when every leaf is :class:`Shared`,
    (None, stacked) when none is, (None, None) when mixed."""
    leaves = list(tree.values())
    if all(isinstance(t, Shared) for t in leaves):
        return {n: t.tensor for n, t in tree.items()}, None
    if all(isinstance(t, Tensor) for t in leaves):
        return None, dict(tree)
    return None, None
