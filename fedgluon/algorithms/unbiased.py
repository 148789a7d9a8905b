"""Unbiased compression of gradient differences: MARINA and DASHA-MVR with a layer-wise LMO step.

Both follow the Flower DASHA/MARINA baseline's flow (docs/ALGORITHMS.md §9) with the server's plain step
replaced by ``X_i ← X_i + t_i lmo_i(G_i)`` (core paper variants B and D-unbiased, [RECON]).
The theory assumes full participation; the partial-participation rules are stated per class.
"""

from __future__ import annotations

from typing import Any, ClassVar


from compressors import Compressor, make_compressor
from compressors.error_feedback import add_own

from .base import Algorithm, compress_with, tracker_update, weighted_mean


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
        self.compressor = make_compressor(self.opt["compressor"])

    @property
    def uplink(self) -> Compressor:
        return self.compressor

    @property
    def needs_previous(self) -> bool:
        return True

    def uplink_for(self, bc, reply):
        return self.dense if bc.flags.get("refresh") else self.compressor

    def local_update(self, state, grads, bc, j):
        if grads.refresh:
            return {}, compress_with(self.dense, grads.now, bc, j)[0]
        prev = grads.prev if grads.prev is not None else grads.now
        diff = {n: grads.now[n] - prev[n] for n in grads.now}
        return {}, compress_with(self.compressor, diff, bc, j)[0]

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
        self.compressor = make_compressor(self.opt["compressor"])
        props = [self.compressor.properties(s) for s in self.shapes.values()]
        if any(p.kind not in ("unbiased", "identity") for p in props):
            raise ValueError(f"gluon-dasha-mvr needs an unbiased compressor, got {self.opt['compressor']!r}")
        omega = max(p.omega or 0.0 for p in props)
        self.a = self.opt["a"] if self.opt["a"] is not None else 1.0 / (2 * omega + 1)

    @property
    def uplink(self) -> Compressor:
        return self.compressor

    def uplink_for(self, bc, reply):
        first = next(iter(reply.message.values()), None)
        dense_codec = getattr(first, "codec", None) in self.dense.codecs(getattr(first, "shape", ()))
        return self.dense if dense_codec and self.compressor.structure.name != "dense" else self.compressor

    def local_update(self, state, grads, bc, j):
        new, h_new = self.estimate(state, grads)
        if "g" not in state:
            msg, _ = compress_with(self.dense, h_new, bc, j)
            return {**new, "g": {n: t.clone() for n, t in h_new.items()}}, msg
        h_old, g = state["est"]["m"], state["g"]
        target = {n: h_new[n] - h_old[n] - self.a * (g[n] - h_old[n]) for n in h_new}
        msg, _ = compress_with(self.compressor, target, bc, j)
        return {**new, "g": add_own(self.compressor, g, msg)}, msg

    def aggregate(self, state, decoded, weights, bc):
        return tracker_update(state.get("G"), decoded, weights, state["X"])

