"""Contractive compression with EF21 error feedback on a client estimator (EF21-Muon family).

Client j (docs/ALGORITHMS.md §8.3 and §10.2 C/D): estimator ``V_j`` (EMA momentum, SARAH or MVR), then
``R_j = C(V_j − G_j)``, ``G_j ← G_j + R_j``, send ``R_j``. Server: ``G ← G + Σ_{j∈S} w_j R_j``,
so ``G = Σ_j w_j G_j`` over *all* clients (absent ones contribute their last tracker, docs/DESIGN.md §2),
then the layer-wise LMO step. ``G_j`` starts at 0, so the first round sends ``C(V_j)``.

EF21-Muon writes ``M ← (1−β_paper)M + β_paper g``: our ``beta = 1 − β_paper``. The papers assume full
participation; with partial participation absent clients' trackers stay in G unchanged. A rejected
client keeps its tracker (its R_j never reached G), so ``G = Σ_j w_j G_j`` still holds.
``tracker="fixed16"`` stores G_j as int16 on a power-of-two grid and sends exact differences
(compressors.error_feedback).

The uplink's error feedback is a named part: ``error_feedback="ef21"`` (default, above), ``"ef14"``
(send ``C(e_j + V_j)``, keep the residual; the server averages the round's messages, as in PowerSGD)
or ``"none"`` (send ``C(V_j)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from compressors import EF21, Compressor, PayloadError, make_compressor, make_error_feedback
from compressors.error_feedback import split_states, stack_states, step_one

from ..objective import SupervisedObjective
from ..vectorised import stacked_gradients
from .base import Algorithm, Broadcast, GradPair, tracker_update, weighted_mean
from .columns import BlockColumns, BlockStep, Shared, column_params


class FeedbackUplink(Algorithm):
    """The estimate, compressed with error feedback (EF21 by default); see the module docstring."""

    OPTIONS: ClassVar[dict[str, Any]] = {"compressor": {"name": "topk", "ratio": 0.05}, "tracker": "full",
                                         "error_feedback": "ef21"}

    def __init__(self, geometry, **options):
        super().__init__(geometry, **options)
        self.compressor = make_compressor(self.opt["compressor"])
        self.ef = make_error_feedback(self.opt["error_feedback"], self.compressor, self.opt["tracker"])

    @property
    def uplink(self) -> Compressor:
        return self.compressor

    def local_update(self, state, grads, bc, j):
        new, v = self.estimate(state, grads)
        msg, ef_state, comp = step_one(self.ef, state.get("ef"), v, (bc.seed, j, bc.round), state.get("comp"))
        new.update({"ef": ef_state, "comp": comp})
        return new, msg

    def block_local_update(self, states, grads, bc, js):
        """Estimates client by client, then error feedback and compression of the whole block at once
        (:meth:`EF21.step` over (B, *shape) rows: one top-k selection over (B, d) per layer)."""
        estimates = [self.estimate(s, g) for s, g in zip(states, grads)]
        v = {n: torch.stack([e[1][n] for e in estimates]) for n in estimates[0][1]}
        rows, ef_new, comps = self.ef.step(stack_states([s.get("ef") for s in states]), v,
                                           [(bc.seed, j, bc.round) for j in js], [s.get("comp") for s in states])
        ef_states = split_states(ef_new, len(js)) if ef_new else [{} for _ in js]
        return [({**new, "ef": ef_states[i], "comp": comps[i]}, {n: r.payload(i) for n, r in rows.items()})
                for i, (new, _) in enumerate(estimates)]

    def steps_columns(self) -> bool:
        """Whether :meth:`column_block` may apply: the base client step (gradients, estimate, this class's
        local update, propose), an elementwise estimator or none, EF21 with full trackers over a
        stateless compressor whose payloads carry no header."""
        own = type(self)
        return (own.client_step is Algorithm.client_step and own.propose is Algorithm.propose
                and own.estimate is Algorithm.estimate and own.block_gradients is Algorithm.block_gradients
                and own.block_batches is Algorithm.block_batches and own.uplink_for is Algorithm.uplink_for
                and own.block_local_update is FeedbackUplink.block_local_update
                and own.local_update is FeedbackUplink.local_update
                and (self.est is None or self.est.elementwise)
                and isinstance(self.ef, EF21) and self.ef.tracker == "full" and not self.compressor.stateful
                and not any(self.compressor.header_keys(tuple(s)) for s in self.shapes.values()))

    def column_block(self, columns: BlockColumns, bc: Broadcast,
                     objectives: Sequence[SupervisedObjective]) -> BlockStep | None:
        """:meth:`client_block` of a block whose clients share one state layout, on columns
        (:mod:`fedgluon.algorithms.columns`: the same values, packed to the same bytes); None where it
        does not apply (:meth:`steps_columns`, fewer than two clients, an unexpected tracker layout, a
        non-finite estimate), and the caller takes :meth:`client_block`."""
        js, tree = list(columns.clients), dict(columns.tree or {})
        if len(js) < 2 or not self.steps_columns() or _holds_shared({k: t for k, t in tree.items() if k != "x_prev"}):
            return None
        drawn = self.block_batches(bc, objectives, js)
        batches = [drawn[j][0] for j in js]
        refresh = drawn[js[0]][1]
        per = self.run_length(bc)
        now = stacked_gradients(objectives, js, batches, per, shared=bc.model, device=self.client_device)
        if now is None:
            return None
        prev = None
        if not refresh and self.needs_previous and "x_prev" in tree:
            shared, stacked = column_params(tree["x_prev"])
            if shared is not None:  # client_block stacks every client's X_prev, shared or not
                stacked = {n: t.expand(len(js), *t.shape) for n, t in shared.items()}
            prev = stacked_gradients(objectives, js, batches, per, stacked=stacked,
                                     device=self.client_device) if stacked is not None else None
            if prev is None:
                return None
        state = {"est": tree["est"]} if "est" in tree else {}
        new_est, v = self.estimate(state, GradPair(now[1], prev[1] if prev is not None else None, refresh, 0.0, 0, 0))
        g_old = tree["ef"]["g"] if "ef" in tree else None
        if g_old is not None and (not isinstance(g_old, dict) or set(g_old) != set(v)
                                  or any(g_old[n].shape != v[n].shape for n in v)):
            return None
        try:
            payloads, ef_new, _ = self.ef.step({"g": g_old} if g_old is not None else None, v,
                                               [(bc.seed, j, bc.round) for j in js])
        except PayloadError:  # a non-finite row: the per-client path raises for its client
            return None
        g_new = ef_new["g"]
        commits = tree.get("commits")
        if commits is not None and not isinstance(commits, torch.Tensor):
            return None
        new = {**tree, **new_est, "ef": {"g": {n: g_new[n] for n in v}}, "comp": {},
               "commits": commits + 1 if commits is not None else torch.ones(len(js), dtype=torch.int64)}
        if self.needs_previous or "x_prev" in tree:
            new["x_prev"] = {n: Shared(t) for n, t in bc.model.items()}
        calls = 1 + (prev is not None)
        return BlockStep(js, bc.round, payloads, new, now[0], [calls] * len(js),
                         [len(b[1]) * calls for b in batches])

    def aggregate(self, state, decoded, weights, bc):
        if self.ef.tracks:
            return tracker_update(state.get("G"), decoded, weights, state["X"])
        return weighted_mean(decoded, weights)


def _holds_shared(tree: Any) -> bool:
    """Whether a column tree has a :class:`Shared` leaf (only ``x_prev`` may: the rest is per client)."""
    if isinstance(tree, Shared):
        return True
    return isinstance(tree, dict) and any(_holds_shared(t) for t in tree.values())


class GluonEF21(FeedbackUplink):
    """``gluon-ef21`` — EF21-Muon uplink (Gruntkowska et al., arXiv 2510.00643): EMA momentum
    ``M_j ← βM_j + (1−β)∇f_j(X^k; ξ)`` compressed with EF21."""

    name = "gluon-ef21"
    estimator = "ema"
    OPTIONS = {**FeedbackUplink.OPTIONS, "beta": 0.9, "nesterov": False}


class GluonEF21SARAH(FeedbackUplink):
    """``gluon-ef21-sarah`` — core paper variant C [RECON]: SARAH estimator
    ``V_j ← V_j + ∇f_j(X^k; ξ) − ∇f_j(X_prev; ξ)`` (large-batch refresh with probability p), EF21."""

    name = "gluon-ef21-sarah"
    estimator = "sarah"
    uses_refresh = True
    OPTIONS = {**FeedbackUplink.OPTIONS, "refresh_prob": 0.1, "refresh_period": None}


class GluonEF21MVR(FeedbackUplink):
    """``gluon-ef21-mvr`` — core paper variant D, contractive [RECON]: STORM estimator
    ``V_j ← ∇f_j(X^k; ξ) + β(V_j − ∇f_j(X_prev; ξ))`` compressed with EF21 (no dense rounds)."""

    name = "gluon-ef21-mvr"
    estimator = "mvr"
    OPTIONS = {**FeedbackUplink.OPTIONS, "beta": 0.9}


class EF21MuonBidir(GluonEF21):
    """``ef21-muon-bidir`` — EF21-Muon with both directions compressed (arXiv 2510.00643, Alg. 2/3):
    ``gluon-ef21`` plus EF21-P on the downlink, ``S = C_P(X^{k+1} − W)``, ``W ← W + S``; clients
    compute at the shadow W. Every client must apply every S, so downlink bits count all n clients."""

    name = "ef21-muon-bidir"
    BASE_OPTIONS = {**Algorithm.BASE_OPTIONS, "downlink": {"name": "topk", "ratio": 0.1}}
