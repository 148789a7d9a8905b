"""What one client step of a block of B clients takes and makes (docs/DESIGN.md §3, "Algorithm interface"):
:class:`BlockGrads`, and :class:`BlockResult` (proposed state rows, payloads in named groups of rows with one
codec per layer, per-row metrics, failed rows), every tensor with a leading client axis.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from compressors.error_feedback import split_states, stack_states
from compressors.payload import PayloadRows, RowMessage
from fedgluon.algorithms.messages import Broadcast, ClientReply
from fedgluon.clients.table import ClientRows, flatten

Tensors = dict[str, Tensor]


@dataclass
class BlockGrads:
    """A block's gradients: ``now`` at the broadcast model; ``prev`` at each row's ``X_prev`` on the same
    batch where ``has_prev`` (other rows zero; None when no row has one); ``refresh``: a large batch."""

    now: Tensors
    prev: Tensors | None
    has_prev: Tensor
    refresh: bool
    loss: list[float]
    evals: list[int]
    samples: list[int]


@dataclass
class PayloadGroup:
    """Rows ``rows`` (indices into the block) of a block's replies, one :class:`PayloadRows` per layer."""

    rows: list[int]
    layers: dict[str, PayloadRows]


@dataclass
class BlockResult:
    """A block's client step (module docstring). ``state``: the proposed state tree of (B, *shape) rows,
    committed row by row for accepted clients only; ``failed``: block row → reason."""

    clients: list[int]
    round: int
    groups: dict[str, PayloadGroup]
    state: dict[str, Any] | None
    loss: list[float]
    grad_evals: list[int]
    samples: list[int]
    failed: dict[int, str] = field(default_factory=dict)

    def replies(self) -> dict[int, ClientReply]:
        """Per client its reply: its row of the group's payloads, the group and metrics; failed rows have none."""
        out: dict[int, ClientReply] = {}
        for name, group in self.groups.items():
            for pos, i in enumerate(group.rows):
                j = self.clients[i]
                out[j] = ClientReply(j, self.round, RowMessage(group.layers, pos),
                                     self.loss[i], self.grad_evals[i], self.samples[i], group=name)
        return dict(sorted(out.items()))

    def failures(self) -> dict[int, str]:
        """Client id → reason of every failed row."""
        return {self.clients[i]: why for i, why in sorted(self.failed.items())}

    def proposal(self, derived: tuple[str, ...] = ()) -> Proposal:
        """What the server commits from this result: the state columns that travel (paths not starting
        with a ``derived`` prefix)."""
        return Proposal(list(self.clients), {p: t for p, t in flatten(self.state).items() if not p.startswith(derived)})


@dataclass
class Proposal:
    """One run of a block as the server commits it: its clients (row order) and the proposed state
    columns that travel (schema path → (B, *shape)); the server derives the rest itself
    (``Algorithm.derive_state``: the EF21 and DASHA trackers)."""

    clients: list[int]
    columns: dict[str, Tensor]


def concat(parts: Sequence[BlockResult]) -> BlockResult:
    """The results of consecutive parts of one block as one result (rows in order)."""
    if len(parts) == 1:
        return parts[0]
    offsets = np.cumsum([0] + [len(p.clients) for p in parts]).tolist()
    groups: dict[str, list[tuple[int, PayloadGroup]]] = {}
    for off, p in zip(offsets, parts):
        for name, g in p.groups.items():
            groups.setdefault(name, []).append((off, g))
    merged = {name: PayloadGroup([off + r for off, g in gs for r in g.rows],
                                 {n: PayloadRows.concat([g.layers[n] for _, g in gs]) for n in gs[0][1].layers})
              for name, gs in groups.items()}
    trees = [p.state for p in parts]
    state = None if any(t is None for t in trees) else _cat(trees)
    return BlockResult([j for p in parts for j in p.clients], parts[0].round, merged, state,
                       [x for p in parts for x in p.loss], [x for p in parts for x in p.grad_evals],
                       [x for p in parts for x in p.samples],
                       {off + i: why for off, p in zip(offsets, parts) for i, why in p.failed.items()})


def _cat(trees: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: _cat([t[k] for t in trees]) if isinstance(v, dict) else torch.cat([t[k] for t in trees])
            for k, v in trees[0].items()}


def feedback_step(ef: Any, state: dict[str, Any] | None, v: Mapping[str, Tensor], bc: Broadcast, rows: ClientRows,
                  group: str = "uplink") -> tuple[dict[str, Any], dict[str, PayloadGroup]]:
    """One error-feedback step (``compressors.make_error_feedback``) over a block's rows, row i seeded by
    (run seed, its client, round): the new ``ef`` and ``comp`` state pieces and the payload group.
    Compressor warm starts (PowerSGD's Q) are kept per row; a first row's is ignored."""
    seeds = [(bc.seed, j, bc.round) for j in rows.clients]
    comp = (state or {}).get("comp") or None
    held = split_states(comp, len(rows)) if comp else [None] * len(rows)
    held = [None if f else c for c, f in zip(held, rows.first.tolist())]
    layers, ef_state, comps = ef.step((state or {}).get("ef") or None, v, seeds, held)
    return {"ef": ef_state, "comp": stack_states(comps) or {}}, {group: PayloadGroup(list(range(len(rows))), layers)}
