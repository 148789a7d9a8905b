"""A block's client step on columns: the states, gradients, estimates, trackers and payloads of a
node's B clients as (B, *shape) tensors from the states record to the reply record.

:meth:`Algorithm.client_block` takes and returns one tree per client, which costs a dict, a tensor
view and a Python call per client and leaf at every stage (unpacking, estimating, error feedback,
proposing, packing): for 100 clients of the 4.6k-parameter MLP about as much as the arithmetic. The
states record already holds them by column (strategies/records.py), so a node whose clients share
one state layout steps them as columns (:meth:`FeedbackUplink.column_block`):

    G_B = vmap(∇ℓ)(X, batches)                      # (B, *shape) per layer, one call
    V_B, est' = estimator(est_B, G_B)               # elementwise estimators only (EMA, MVR, SARAH)
    R_B = C(V_B − g_B) row by row;  g'_B = g_B + R_B # EF21 (compress_rows: top-k / dense, raw values)
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

from torch import Tensor

from compressors.payload import PayloadRows


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


def column_params(tree: dict[str, Any]) -> tuple[dict[str, Tensor] | None, dict[str, Tensor] | None]:
    """A column tree's parameter dict (``x_prev``) as (shared, None) when every leaf is :class:`Shared`,
    (None, stacked) when none is, (None, None) when mixed."""
    leaves = list(tree.values())
    if all(isinstance(t, Shared) for t in leaves):
        return {n: t.tensor for n, t in tree.items()}, None
    if all(isinstance(t, Tensor) for t in leaves):
        return None, dict(tree)
    return None, None
