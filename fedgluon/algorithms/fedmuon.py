"""The two federated Muon methods of that name (docs/ALGORITHMS.md §14: payload and broadcast layout, bits), as
compositions of ``local-gluon``'s parts: local LMO steps (:meth:`FedAvg.local_steps`), the delta uplink with
its error feedback (:meth:`FedAvg.send_local`), FedAvg's server step, plus the terms each adds both ways.

Partial participation and rejected replies: a term is aggregated over the accepted replies only; a
rejected, failed or absent client keeps its committed state (its old momentum / control variate).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from fedgluon.algorithms.aggregate import tracker_update
from fedgluon.algorithms.base import Broadcast
from fedgluon.algorithms.local import LocalGluon

Tensors = dict[str, Tensor]

MOMENTUM, STEP, CONTROL = "momentum:", "step:", "control:"


def named(prefix: str, tensors: Mapping[str, Tensor]) -> Tensors:
    """``tensors`` under the names ``prefix + layer``."""
    return {prefix + n: t for n, t in tensors.items()}


def part(prefix: str, tensors: Mapping[str, Tensor]) -> Tensors:
    """The tensors named ``prefix + layer`` of ``tensors``, by layer."""
    return {n.removeprefix(prefix): t for n, t in tensors.items() if n.startswith(prefix)}


class FederatedMuon(LocalGluon):
    """Local LMO steps with terms sent besides the model in both directions (module docstring)."""

    @property
    def uplink_terms(self) -> tuple[str, ...]:
        """The prefixes of the terms a reply carries besides the delta; none by default."""
        return ()

    def reply_shapes(self, bc: Broadcast) -> dict[str, tuple[int, ...]]:
        return {**self.shapes, **{p + n: s for p in self.uplink_terms for n, s in self.shapes.items()}}

    def downlink_terms(self, state: Mapping[str, Any]) -> Tensors:
        """The tensors the server sends besides the model, named ``<term>:<layer>``; none by default."""
        return {}

    def last_terms(self, state: Mapping[str, Any], prefix: str) -> Tensors:
        """The ``prefix`` terms of the server's last aggregate G, zeros before its first."""
        G = state.get("G")
        if G is None:
            return {n: torch.zeros_like(t) for n, t in state["X"].items()}
        return part(prefix, G)

    def broadcast(self, server_state, k, seed, num_clients):
        """The model (and flags) as every method sends it, plus :meth:`downlink_terms` dense at the run's
        value width, counted in the broadcast's bits."""
        bc = super().broadcast(server_state, k, seed, num_clients)
        terms = self.downlink_terms(server_state)
        if not terms:
            return bc
        return dataclasses.replace(bc, extra=terms, bits=bc.bits + self.dense_bits(terms))

    def server_update(self, state, G, k):
        """FedAvg's ``X + η_s G`` on the model's layers of G (the terms are the server's state in G)."""
        eta = self.opt["server_lr"]
        return {n: state["X"][n] + eta * G[n] for n in state["X"]}, None


class FedMuon(FederatedMuon):
    """``fedmuon`` — FedMuon with momentum aggregation and local–global alignment (Liu et al., arXiv
    2510.27403; docs/ALGORITHMS.md §14.1: the paper's equations, defaults, bits and the choices fedgluon made
    where it is silent). Per layer, radius t and weight-decay factor s of the run's LMO step::

        M ← βM + (1−β)g                    (from M̄ each round; from 0 with momentum_aggregation=False)
        X ← s·X + (1−α)·t·lmo(M) + α·D,    D = mean_i Δ_i / τ of the last round
        server: X ← X + η_s·mean_i Δ_i,    M̄ ← mean_i M_i     (means over the accepted replies)
    """

    name = "fedmuon"
    OPTIONS = {**LocalGluon.OPTIONS, "beta": 0.9, "alpha": 0.5, "momentum_aggregation": True}

    def __init__(self, geometry, **options):
        super().__init__(geometry, **options)
        if not 0 <= self.opt["alpha"] <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.opt['alpha']}")

    @property
    def uplink_terms(self):
        return (MOMENTUM,) if self.opt["momentum_aggregation"] else ()

    def downlink_terms(self, state):
        """``M̄`` (with momentum aggregation) and ``D = G_Δ/τ`` (with α > 0) from the last aggregate."""
        out = {}
        if self.opt["momentum_aggregation"]:
            out.update(named(MOMENTUM, self.last_terms(state, MOMENTUM)))
        if self.opt["alpha"]:
            tau = self.opt["local_steps"]
            out.update(named(STEP, {n: t / tau for n, t in self.last_terms(state, "").items() if n in state["X"]}))
        return out

    def client_step(self, rows, bc, objectives):
        """τ blended local steps from ``M̄`` (or from 0), then ``Δ`` and (with aggregation) ``M^τ`` uplink."""
        terms = bc.extra
        aggregate = self.opt["momentum_aggregation"]
        rows_m = {n: t.expand(len(rows), *t.shape) for n, t in part(MOMENTUM, terms).items()}  # M̄ as equal rows
        start = {"m": rows_m} if aggregate else None
        shift = part(STEP, terms)
        X, local, grads = self.local_steps(rows, bc, objectives, {"est": start, "shift": shift},
                                           first=not aggregate)
        payload = {n: X[n] - bc.model[n] for n in X}
        if aggregate:
            payload.update(named(MOMENTUM, local["est"]["m"]))
        return self.send_local(rows, bc, grads, payload)

    def local_step(self, X, g, step, est_state, first):
        """``M ← βM + (1−β)g`` (from M̄, or restarted at step 0), then each row's step ``X_i ← s_i X_i +
        (1−α)·t_i lmo_i(M_i) + α·D_i``, ``s_i`` the weight-decay factor, D the rows' shared shift (α = 0: the
        plain LMO step)."""
        est = est_state["est"]
        est, m = self.est.update(est if est is not None else self.est.zero_state(g), g, None, first)
        alpha, D, lmo = self.opt["alpha"], est_state["shift"], self.lmo_step
        if alpha == 0:
            return lmo.apply(X, m, step)[0], {**est_state, "est": est}
        moves, info = lmo.directions(m, step)
        X = {n: lmo.decayed(X[n], info, n) + (1 - alpha) * moves[n].to(X[n].dtype) + alpha * D[n] for n in X}
        return X, {**est_state, "est": est}


class FedMuonBC(FederatedMuon):
    """``fedmuon-bc`` — FedMuon, federated learning with bias-corrected LMO-based optimisation (Takezawa et
    al., arXiv 2509.26337, Alg. 1; docs/ALGORITHMS.md §14.2: the paper's equations, reduction and choices).
    Client i with its momentum m_i as control variate c_i (client state), the server's c, weights w_i over
    all clients (not renormalised over the accepted ones)::

        m ← βm + (1−β)g   (from c_i);     X ← s·X + t·lmo(m − c_i + c)
        uplink Δx_i, Δc_i = m − c_i;     server: X ← X + η_s Σ_{i∈S} w_i Δx_i,   c ← c + Σ_{i∈S} w_i Δc_i

    server_lr defaults to 1; use the identity compressor (the default) for the paper's method.
    """

    name = "fedmuon-bc"
    OPTIONS = {**LocalGluon.OPTIONS, "beta": 0.9}

    @property
    def uplink_terms(self):
        return (CONTROL,)

    def downlink_terms(self, state):
        """The server's control variate c."""
        return named(CONTROL, self.last_terms(state, CONTROL))

    def client_step(self, rows, bc, objectives):
        """τ corrected local steps from the client's own momentum c_i, then ``Δx`` and ``Δc`` uplink."""
        terms = bc.extra
        own = (rows.tree or {}).get("m")
        c_i = own if own else {n: torch.zeros(len(rows), *t.shape, dtype=t.dtype) for n, t in bc.model.items()}
        c = part(CONTROL, terms)
        shift = {n: c[n] - c_i[n] for n in c_i}
        X, local, grads = self.local_steps(rows, bc, objectives, {"est": {"m": c_i}, "shift": shift},
                                           first=False)
        m = local["est"]["m"]
        payload = {n: X[n] - bc.model[n] for n in X}
        payload.update(named(CONTROL, {n: m[n] - c_i[n] for n in m}))
        return self.send_local(rows, bc, grads, payload, state={"m": m})

    def local_step(self, X, g, step, est_state, first):
        """``m ← βm + (1−β)g``, then every row's LMO step on ``m − c_i + c``."""
        est, m = self.est.update(est_state["est"], g, None, first)
        shift = est_state["shift"]
        return self.lmo_step.apply(X, {n: m[n] + shift[n] for n in m}, step)[0], {**est_state, "est": est}

    def aggregate(self, state, decoded, weights, bc):
        """``Σ_{i∈S} w_i Δx_i`` on the model's layers and ``c + Σ_{i∈S} w_i Δc_i`` on the control terms."""
        start = {n: torch.zeros_like(t) for n, t in state["X"].items()}
        start.update(named(CONTROL, self.last_terms(state, CONTROL)))
        return tracker_update(start, decoded, weights, state["X"])
