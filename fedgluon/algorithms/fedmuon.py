"""The federated Muon methods of two other groups, as compositions of ``local-gluon``'s parts: local LMO
steps (:meth:`FedAvg.local_steps`), the delta uplink with its error feedback (:meth:`FedAvg.send_local`)
and FedAvg's server step, plus the terms each method adds in both directions (docs/ALGORITHMS.md §14).

Both methods send more than the model delta: a payload holds the delta under the model's layer names and each
extra term under ``<term>:<layer>`` (:meth:`Algorithm.reply_shapes`), through the run's compressor. The server
sends its terms beside the model, under the same names, dense at the run's value width, in the broadcast's
``extra`` tensors (every engine ships them with the model). Bits count both: uplink bits are the payload's
(delta + terms), downlink bits the broadcast's (model + terms), per receiving client.

Partial participation and rejected replies: a term is aggregated over the accepted replies only; a
rejected, failed or absent client keeps its committed state (its old momentum / control variate).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from compressors.bits import dense_bits
from fedgluon.algorithms.aggregate import tracker_update
from fedgluon.algorithms.base import Broadcast
from fedgluon.algorithms.local import LocalGluon
from fedgluon.lmo.step import LMOStep

Tensors = dict[str, Tensor]

MOMENTUM, STEP, CONTROL = "momentum:", "step:", "control:"


def named(prefix: str, tensors: Mapping[str, Tensor]) -> Tensors:
    """``tensors`` under the names ``prefix + layer``."""
    return {prefix + n: t for n, t in tensors.items()}


def part(prefix: str, tensors: Mapping[str, Tensor]) -> Tensors:
    """The tensors named ``prefix + layer`` of ``tensors``, by layer."""
    return {n.removeprefix(prefix): t for n, t in tensors.items() if n.startswith(prefix)}


def rows_of(tensors: Mapping[str, Tensor], count: int) -> Tensors:
    """One model's tensors as a block of ``count`` equal rows ((count, *shape), views)."""
    return {n: t.expand(count, *t.shape) for n, t in tensors.items()}


def aligned_rows(lmo_step: LMOStep, X: Tensors, m: Tensors, step: int, alpha: float, shift: Tensors) -> Tensors:
    """Each row's step ``X_i ← s_i X_i + (1−α)·t_i lmo_i(m_i) + α·D_i`` over a block, with ``s_i`` the step's
    weight-decay factor and D one model's shift (shared by the rows); ``α = 0`` is the plain LMO step."""
    if alpha == 0:
        return lmo_step.apply(X, m, step)[0]
    moves, info = lmo_step.directions(m, step)
    return {n: lmo_step.decayed(X[n], info, n) + (1 - alpha) * moves[n].to(X[n].dtype) + alpha * shift[n]
            for n in X}


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
        width = self.dense.values.bits(1, {}).value_bits
        bits = bc.bits + dense_bits(sum(t.numel() for t in terms.values()), width)
        return dataclasses.replace(bc, extra=terms, bits=bits)

    def server_update(self, state, G, k):
        """FedAvg's ``X + η_s G`` on the model's layers of G (the terms are the server's state in G)."""
        eta = self.opt["server_lr"]
        return {n: state["X"][n] + eta * G[n] for n in state["X"]}, None


class FedMuon(FederatedMuon):
    """``fedmuon`` — FedMuon with momentum aggregation and local–global alignment (Liu, Shang, Zhou, Liu,
    Liu, Liu, arXiv 2510.27403). Client i of S sampled, round r, local step k = 0..K−1 (the paper's)::

        M_i^{r,0} = M̄^r,   M_i^{r,k+1} = β M_i^{r,k} + g_i^{r,k}
        x_i^{r,k+1} = x_i^{r,k} − η [(1−α) U V^T + α Δ^{g,r}],   U Σ V^T = SVD(M_i^{r,k+1})
        x^{r+1} = x^r + (1/S) Σ_i (x_i^{r,K} − x^r),   Δ^{g,r+1} = −(x^{r+1} − x^r)/(Kη)
        M̄^{r+1} = (1/S) Σ_i M_i^{r,K}

    In fedgluon's terms, per layer with the run's geometry and radius t (local step kτ + s of the schedule):
    ``M ← βM + (1−β)g`` (EMA: the paper's heavy-ball momentum times (1−β); the LMO does not see the
    scale, and M̄ is the mean of the same scaled momenta, so the iterates are the paper's),
    ``X ← X + (1−α)·t·lmo(M) + α·D`` with ``D = mean_i Δ_i / τ`` the last round's mean displacement per
    local step (the paper's ``−ηΔᵍ`` for a constant η), and FedAvg's server step ``X + η_s·mean_i Δ_i``.

    Defaults: α = 0.5 (the paper's experiments), τ = 5, β = 0.9, server_lr = 1 (the paper has none).
    Communication: uplink ``Δ_i`` and ``M_i^{r,K}`` (2d values per client, through the run's compressor
    with its error feedback); downlink ``X``, ``M̄`` and ``D`` (3d values per receiving client).
    ``momentum_aggregation=False`` restarts M at 0 every round and sends no momenta; with α = 0 no D is
    sent, and the method is ``local-gluon`` in the run's geometry (Muon's with the Muon preset).

    Where the paper is silent, fedgluon chose: M̄⁰ = 0 and D⁰ = 0 (sent, and counted, from round 0); D
    in model units, so a radius schedule or per-layer radii carry over; D computed before the server
    learning rate; the means over the accepted replies (FedAvg's weights, renormalised: partial
    participation averages the clients that replied); a round with no accepted reply keeps M̄ and D; the
    weight decay of the run's LMO step shrinks X before the blended move; non-matrix layers take the
    geometry's LMO.
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
        start = {"m": rows_of(part(MOMENTUM, terms), len(rows))} if aggregate else None
        shift = part(STEP, terms)
        X, local, grads = self.local_steps(rows, bc, objectives, {"est": start, "shift": shift},
                                           first=not aggregate)
        payload = {n: X[n] - bc.model[n] for n in X}
        if aggregate:
            payload.update(named(MOMENTUM, local["est"]["m"]))
        return self.send_local(rows, bc, grads, payload)

    def local_step(self, X, g, step, est_state, first):
        """``M ← βM + (1−β)g`` (from M̄, or restarted at step 0), then the blended LMO step of every row."""
        est = est_state["est"]
        est, m = self.est.update(est if est is not None else self.est.zero_state(g), g, None, first)
        X = aligned_rows(self.lmo_step, X, m, step, self.opt["alpha"], est_state["shift"])
        return X, {**est_state, "est": est}


class FedMuonBC(FederatedMuon):
    """``fedmuon-bc`` — FedMuon, federated learning with bias-corrected LMO-based optimisation (Takezawa,
    Koloskova, Jiang, Stich, arXiv 2509.26337, Alg. 1). Client i of S sampled from n, round r, local
    step k = 0..K−1, with SCAFFOLD-like control variates c_i (client) and c (server)::

        m_i^{r,0} = c_i^r,   m_i^{r,k+1} = (1−a) m_i^{r,k} + a ∇f_i(x_i^{r,k}; ξ)
        x_i^{r,k+1} = x_i^{r,k} + η lmo(m_i^{r,k+1} − c_i^r + c^r)
        c_i^{r+1} = m_i^{r,K},   c^{r+1} = c^r + (1/n) Σ_{i∈S} (c_i^{r+1} − c_i^r)
        x^{r+1} = x^r + (1/n) Σ_{i∈S} (x_i^{r,K} − x^r)

    The correction makes the LMO see ``m_i − c_i + c``: the client's drift from its own last momentum,
    around the mean of all clients' last momenta; without it (c_i = c) this is Local Muon, which the
    paper shows need not converge under heterogeneity. fedgluon's ``beta = 1 − a``; the radius t of the
    run's geometry and schedule is η; ``1/n`` is the client weight w_i (uniform or by samples, Σ_i w_i = 1
    over all n clients: the sums are not renormalised over the accepted clients, as in the paper).

    Reduction (implied by the paper: c = Σ_i w_i c_i at every round, so the correction vanishes when every
    client's control variate is the same): one client, or identical clients on full batches with full
    participation, server_lr = 1, is centralised Muon, ``M ← βM + (1−β)g``, ``X ← X + t lmo(M)``, run for
    R·τ steps with the momentum kept across rounds (tests/unit/test_fedmuon.py).

    Communication: uplink ``Δx_i = x_i^{r,K} − x^r`` and ``Δc_i = c_i^{r+1} − c_i^r`` (2d values, through
    the run's compressor with its error feedback); downlink ``x`` and ``c`` (2d values). Client state
    (the table): its momentum m_i, which is its control variate c_i.

    Where the paper is silent (or not read here: its algorithm box was taken from a public reproduction
    that cites it line by line), fedgluon chose: β = 0.9, τ = 5, server_lr = 1; c⁰ = c_i⁰ = 0; a
    rejected or absent client keeps c_i and contributes nothing to c or x; with a lossy compressor the
    client still keeps its exact m as c_i, so c drifts from Σ_i w_i c_i by the compression error (use the
    identity compressor, the default, for the paper's method); weight decay as the run's LMO step.
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
