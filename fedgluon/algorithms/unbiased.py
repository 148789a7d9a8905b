"""Unbiased compression of gradient differences: MARINA and DASHA-MVR with a layer-wise LMO step.

Both follow the Flower DASHA/MARINA baseline's flow (docs/ALGORITHMS.md §9) with the server's plain step
replaced by ``X_i ← X_i + t_i lmo_i(G_i)`` (core paper variants B and D-unbiased, [RECON]).
The theory assumes full participation; the partial-participation rules are stated per class.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from compressors import make_compressor
from compressors.operators import unbiased_omega
from fedgluon.algorithms.aggregate import tracker_update, update_trackers, weighted_mean
from fedgluon.algorithms.base import Algorithm


class GluonMARINA(Algorithm):
    """``gluon-marina`` — MARINA (Gorbunov et al., ICML 2021) with Gluon's step.

    Server: one coin per round, ``c ~ Bernoulli(p)`` (round 0 always 1), broadcast with X^k.
    Client: if c, send ``∇f_j(X^k; large batch)`` dense; else send ``Q_j(∇f_j(X^k; ξ) − ∇f_j(X_prev; ξ))``
    (same ξ). Server: ``G = Σ w_j g_j / Σ w_j`` on refresh rounds, else ``G ← G + Σ w_j Q_j / Σ w_j``.
    Partial participation: means renormalised over accepted clients; a client with no X_prev yet
    (first sampled on a compressed round) sends a zero difference. A rejected client is left out
    of that round's mean and keeps its X_prev.
    """

    name = "gluon-marina"
    uses_refresh = True
    OPTIONS: ClassVar[dict[str, Any]] = {"compressor": {"name": "randk", "ratio": 0.05},
                                         "refresh_prob": 0.1, "refresh_period": None}

    def __init__(self, geometry, **options):
        super().__init__(geometry, **options)
        self.compressor = make_compressor(self.opt["compressor"], "algorithm.compressor")
        unbiased_omega(self.compressor, self.shapes, self.name)

    @property
    def needs_previous(self) -> bool:
        return True

    def reply_group(self, bc, first):
        return "dense" if bc.flags.get("refresh") else "uplink"

    def local_update(self, state, grads, bc, rows):
        if grads.refresh:
            return {}, self.send("dense", grads.now, bc, rows)
        if grads.prev is None:  # no client has an X_prev yet: zero differences
            diff = {n: torch.zeros_like(g) for n, g in grads.now.items()}
        else:
            has_prev = grads.has_prev
            diff = {n: torch.where(has_prev.view(-1, *[1] * (g.dim() - 1)), g - grads.prev[n], torch.zeros_like(g))
                    for n, g in grads.now.items()}
        return {}, self.send("uplink", diff, bc, rows)

    def aggregate(self, state, decoded, weights, bc):
        mean = weighted_mean(decoded, weights)
        if bc.flags.get("refresh") or "G" not in state:
            return mean
        return {n: state["G"][n] + mean[n] for n in mean}


class GluonDASHAMVR(Algorithm):
    """``gluon-dasha-mvr`` — DASHA-MVR (Tyurin & Richtárik, ICLR 2023) with Gluon's step.

    Client: ``H_j' = ∇f_j(X^k; ξ) + β(H_j − ∇f_j(X_prev; ξ))`` (DASHA's ``1 − b`` is our β);
    ``m_j = Q(H_j' − H_j − a(G_j − H_j))`` with ``a = 1/(2ω+1)`` (ω = max over layers);
    ``G_j ← G_j + m_j``. On its first participation a client sends ``m_j = H_j'`` dense (G_j = 0).
    Server: ``G ← G + Σ_{j∈S} w_j m_j``, so ``G = Σ_j w_j G_j`` over all clients; no dense rounds.
    Partial participation: absent clients keep ``H_j, G_j`` (their trackers stay in G). A rejected
    client keeps its pre-round H_j and G_j.
    """

    name = "gluon-dasha-mvr"
    estimator = "mvr"
    OPTIONS: ClassVar[dict[str, Any]] = {"compressor": {"name": "randk", "ratio": 0.05}, "beta": 0.9, "a": None}

    def __init__(self, geometry, **options):
        super().__init__(geometry, **options)
        self.compressor = make_compressor(self.opt["compressor"], "algorithm.compressor")
        omega = unbiased_omega(self.compressor, self.shapes, self.name)
        self.a = self.opt["a"] if self.opt["a"] is not None else 1.0 / (2 * omega + 1)

    def reply_group(self, bc, first):
        return "dense" if first else "uplink"

    def local_update(self, state, grads, bc, rows):
        """First rows send ``H_j'`` dense and set ``G_j = H_j'``; the others send the compressed target and
        add their own decoded message to ``G_j`` (one group each)."""
        new, h_new = self.estimate(state, grads, rows.first)
        first = rows.first.tolist()
        fresh, later = [i for i, f in enumerate(first) if f], [i for i, f in enumerate(first) if not f]
        g = {n: t.clone() for n, t in (state or {}).get("g", h_new).items()} if later else {}
        groups = {}
        if later:
            h_old, at = state["est"]["m"], torch.tensor(later)
            target = {n: (h_new[n] - h_old[n] - self.a * (g[n] - h_old[n]))[at] for n in h_new}
            groups.update(self.send("uplink", target, bc, rows, later))
            for n, layer in groups["uplink"].layers.items():
                g[n][at] = self.compressor.add_decoded_(g[n][at], layer)
        if fresh:
            at = torch.tensor(fresh)
            groups.update(self.send("dense", {n: t[at] for n, t in h_new.items()}, bc, rows, fresh))
            g = g or {n: torch.empty_like(t) for n, t in h_new.items()}
            for n in g:
                g[n][at] = h_new[n][at]
        return {**new, "g": g}, groups

    derived = ("g/",)  # G_j: the server's to compute from the old row and the accepted message

    def derive_state(self, columns, clients, decoded, first):
        """``G_j ← G_j + m_j`` for compressed messages, ``G_j = m_j`` for a first (dense) one."""
        update_trackers(columns, "g/", clients, decoded, first)

    def aggregate(self, state, decoded, weights, bc):
        return tracker_update(state.get("G"), decoded, weights, state["X"])

