"""Dion and Orth-Dion: rank-r power iteration on client-local momentum, in two uplink phases per round.

``dion`` — Dion (Ahn, Xu, Abreu, Langford, arXiv 2504.05295, Alg. 1 and its data-parallel form with
decoupled momentum); ``orth-dion`` — Orth-Dion (Nakamori et al., arXiv 2605.16341), which replaces Dion's
column normalisation of the right factor by a QR orthonormalisation.

Each spectral layer (the ``(shape[0], prod(shape[1:]))`` reshape, as :class:`fedgluon.lmo.norms.Spectral`
takes it) runs docs/ALGORITHMS.md §16's round: phase 0 sends ``P_j = B_j Q``, phase 1 ``R_j = B_jᵀ P``, then
``M_j ← B_j − (1−μ) P R_jᵀ`` and ``X ← X − t · P Q'ᵀ / c``; §16 has the costs and the reductions (tested).

Options: ``beta`` μ 0.95 (the old momentum's weight, as Gluon's ``M ← βM + (1−β)g``, which has the same polar
direction as Dion's heavy-ball sum: both are ``Σ_s β^{k−s} G_s`` up to a constant); rank
``r = min(m, n, rank or ⌈rank_fraction·min(m, n)⌉)``, ``rank_fraction`` 0.25; ``orthonormalise`` ``"colnorm"``
(dion), ``"qr"`` (orth-dion, :func:`positive_qr`) or ``"svd"`` (the exact rank-r polar factor, for reductions);
``eps`` 1e-8.

Where the papers are silent, fedgluon chose:

* Layers without a spectral norm in the run's geometry (vectors, and embeddings/heads under the
  Scion/Muon presets; the paper steps them with AdamW or Lion) keep Gluon's EMA momentum
  ``m_j ← βm_j + (1−β)g_j`` (zero start), are sent dense in phase 1 and stepped with the geometry's LMO
  of the weighted mean: every layer still moves by an LMO in its own norm.
* The direction of a spectral layer is scaled like the geometry's LMO (``1/c``) and its radius comes
  from the run's radius rule. The paper's ``sqrt(m/n)`` scale is ``1/c`` of Scion's ``spectral`` norm
  (``c = sqrt(n/m)``); ``spectral_muon`` caps it at 1 for wide matrices. Adaptive radii use the dual-norm
  estimate ``(1−μ)⟨R, Q'⟩/c`` = ``−(1−μ)⟨P Rᵀ, direction⟩``: ``B_j`` is a heavy-ball sum, ``1/(1−μ)``
  times EMA momentum, and the factor puts spectral layers on the scale of the other layers' EMA and of
  Gluon's (L0, L1), so that at full rank with ``"svd"`` the adaptive radii are Gluon's too (tested).
* The error feedback subtracts each client's own ``P R_jᵀ``; Microsoft's data-parallel Dion subtracts
  ``P R̄ᵀ`` with the all-reduced ``R̄``. The mean of the clients' M_j is the same, so with full
  participation the iterates are Dion's, and no client needs ``R̄`` (n×r more downlink). Each client's
  own M_j differs, and under partial participation so does the mean.
* The initial Q is a Gaussian from ``generator(seed, "dion-q", layer)``, passed through the same
  right-factor rule; a round in which no client is accepted keeps the old Q. Column normalisation
  divides by ``max(‖column‖, eps)``.
* Federated partial participation: P is averaged over the clients accepted in phase 0, R over those
  accepted in phase 1, each renormalised by their weights; a client that fails or is rejected in either
  phase keeps its M_j
  (its B_j is never committed). The momentum of a client that sits out rounds is kept as it was.
* Each phase's payload is sent dense with the run's value codec (``values``); the model broadcast and Q
  count as phase 0's downlink, P as phase 1's; the loss and gradient work of a round are phase 0's.
* EF21-P (``downlink``) and ``state_dtype`` are not supported.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from fedgluon.algorithms.aggregate import weighted_mean
from fedgluon.algorithms.base import Algorithm, State
from fedgluon.algorithms.block import BlockResult
from fedgluon.algorithms.messages import Broadcast, ServerOutcome
from fedgluon.clients.objective import SupervisedObjective
from fedgluon.clients.table import ClientRows
from fedgluon.core.rng import generator
from fedgluon.lmo.estimators.base import Rows
from fedgluon.lmo.geometry import Geometry
from fedgluon.lmo.norms import Spectral
from fedgluon.lmo.step import StepInfo

Tensors = dict[str, Tensor]
Q_KEY, P_KEY = "Q:", "P:"  # prefixes of the right factors (phase 0's broadcast) and of P (phase 1's)
RIGHT_RULES = ("colnorm", "qr", "svd")


class Dion(Algorithm):
    """``dion`` — Dion (arXiv 2504.05295): see the module docstring."""

    name = "dion"
    phases = 2
    RIGHT: ClassVar[str] = "colnorm"
    OPTIONS: ClassVar[dict[str, Any]] = {"beta": 0.95, "rank": None, "rank_fraction": 0.25, "orthonormalise": None,
                                         "eps": 1e-8}

    def __init__(self, geometry: Geometry, **options: Any):
        super().__init__(geometry, **options)
        beta, right = self.opt["beta"], self.opt["orthonormalise"] or self.RIGHT
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        if right not in RIGHT_RULES:
            raise ValueError(f"orthonormalise must be one of {list(RIGHT_RULES)}, got {right!r}")
        if self.opt["downlink"] is not None or self.opt["state_dtype"] is not None:
            raise ValueError(f"{self.name} supports neither downlink (EF21-P) nor state_dtype")
        self.right = right
        self.low_rank = {p.name: self._factor_shape(p.shape) for p in geometry if isinstance(p.norm, Spectral)}
        if not self.low_rank:
            raise ValueError(f"{self.name} needs at least one layer with a spectral norm in the geometry")
        self.others = [n for n in self.shapes if n not in self.low_rank]

    def _factor_shape(self, shape: tuple[int, ...]) -> tuple[int, int, int]:
        """``(m, n, r)`` of a spectral layer: its matrix reshape and its rank."""
        m = shape[0] if shape else 1
        n = math.prod(shape[1:]) if len(shape) > 1 else 1
        rank = self.opt["rank"]
        r = int(rank) if rank is not None else math.ceil(self.opt["rank_fraction"] * min(m, n))
        if r < 1:
            raise ValueError(f"rank must be >= 1, got {r} (rank={rank}, rank_fraction={self.opt['rank_fraction']})")
        return m, n, min(r, m, n)

    # ------------------------------------------------------------------ orthonormalisation
    def right_factor(self, R: Tensor) -> Tensor:
        """The orthonormalised right factor ``Q'`` of ``R`` (n×r): unit columns, QR's Q, or the polar factor."""
        if self.right == "colnorm":
            return R / torch.linalg.vector_norm(R, dim=-2, keepdim=True).clamp_min(self.opt["eps"])
        if self.right == "qr":
            return positive_qr(R)
        U, _, Vh = torch.linalg.svd(R, full_matrices=False)
        return U @ Vh

    def initial_q(self, seed: int, name: str, dtype: torch.dtype) -> Tensor:
        m, n, r = self.low_rank[name]
        index = list(self.shapes).index(name)
        Z = torch.randn(n, r, generator=generator(seed, "dion-q", index), dtype=torch.float64)
        return self.right_factor(Z).to(dtype)

    # ------------------------------------------------------------------ server: broadcast
    def broadcast(self, server_state: State, k: int, seed: int, num_clients: int) -> Broadcast:
        """The model and, per spectral layer, the right factor Q (from the last accepted R, else the seeded
        start); both are phase 0's downlink."""
        bc = super().broadcast(server_state, k, seed, num_clients)
        G = server_state.get("G")
        dtype = next(iter(bc.model.values())).dtype
        Q = {Q_KEY + n: self.right_factor(G[n]) if G is not None else self.initial_q(seed, n, dtype)
             for n in self.low_rank}
        bc.extra = Q
        bc.bits = bc.bits + self.dense_bits(Q)
        return bc

    # ------------------------------------------------------------------ client: the two phases
    def reply_shapes(self, bc: Broadcast) -> dict[str, tuple[int, ...]]:
        if bc.phase == 0:
            return {n: (m, r) for n, (m, _, r) in self.low_rank.items()}
        return {**{n: (nn, r) for n, (_, nn, r) in self.low_rank.items()}, **{n: self.shapes[n] for n in self.others}}

    def client_step(self, rows: ClientRows, bc: Broadcast, objectives: Sequence[SupervisedObjective]) -> BlockResult:
        """Phase 0 (gradients, ``B_j``, ``P_j``) or phase 1 (``R_j``, error feedback), by ``bc.phase``."""
        return self._power(rows, bc, objectives) if bc.phase == 0 else self._feedback(rows, bc)

    def _power(self, rows: ClientRows, bc: Broadcast, objectives: Sequence[SupervisedObjective]) -> BlockResult:
        grads = self.gradients(rows, bc, objectives)
        old = (rows.tree or {}).get("M")
        M: Tensors = {}
        fresh = Rows(rows.first)
        for n, g in grads.now.items():
            prev = fresh.zero(old[n]) if old is not None else torch.zeros_like(g)
            M[n] = prev + g if n in self.low_rank else torch.lerp(prev, g, 1 - self.opt["beta"])
        P = {n: self._matrix(M[n], n) @ bc.extra[Q_KEY + n].to(M[n].dtype) for n in self.low_rank}
        return BlockResult(rows.clients, bc.round, self.send("dense", P, bc, rows), {"M": M}, grads.loss,
                           grads.evals, grads.samples)

    def _feedback(self, rows: ClientRows, bc: Broadcast) -> BlockResult:
        assert rows.tree is not None, "phase 1 steps on the rows proposed in phase 0"
        B = rows.tree["M"]
        send, M = {n: B[n] for n in self.others}, dict(B)
        for n in self.low_rank:
            Bm = self._matrix(B[n], n)
            P = bc.extra[P_KEY + n].to(Bm.dtype)
            R = Bm.mT @ P
            send[n] = R
            M[n] = (Bm - (1 - self.opt["beta"]) * P @ R.mT).reshape(B[n].shape)
        b = len(rows)
        return BlockResult(rows.clients, bc.round, self.send("dense", send, bc, rows), {"M": M},
                           [float("nan")] * b, [0] * b, [0] * b)

    def _matrix(self, rows: Tensor, name: str) -> Tensor:
        m, n, _ = self.low_rank[name]
        return rows.reshape(rows.shape[0], m, n)

    # ------------------------------------------------------------------ server: the two answers
    def server_phase(self, state: State, replies: Mapping[int, Any], bc: Broadcast, weights: Mapping[int, float],
                     first: Collection[int] = ()) -> tuple[Broadcast, ServerOutcome]:
        """Phase 0's answer: ``P = orth(mean_j P_j)`` over the accepted clients, broadcast to them."""
        decoded: dict[int, Tensors] = {}
        rejected, uplink = self.accept_each(replies, bc, weights, first, decoded.__setitem__)
        P = {}
        if decoded:
            P = {P_KEY + n: torch.linalg.qr(v, mode="reduced").Q for n, v in weighted_mean(decoded, weights).items()}
        answer = Broadcast(bc.round, bc.seed, bc.model, dict(bc.flags), self.dense_bits(P), phase=bc.phase + 1, extra=P)
        return answer, ServerOutcome(sorted(decoded), rejected, uplink)

    def aggregate(self, state: State, decoded: Mapping[int, Tensors], weights: Mapping[int, float],
                  bc: Broadcast) -> Tensors | None:
        """The mean R of spectral layers and mean momentum of the others, with phase 1's P (``P:`` keys)."""
        return {**weighted_mean(decoded, weights), **{k: v for k, v in bc.extra.items() if k.startswith(P_KEY)}}

    def server_update(self, state: State, G: Tensors, k: int) -> tuple[Tensors, StepInfo | None]:
        """``X ← X − t·P Q'ᵀ/c`` for spectral layers, ``X + t·lmo(mean m)`` for the others; weight decay
        and radii as in :class:`fedgluon.lmo.step.LMOStep`."""
        dirs, duals = self.geometry.lmo_and_dual({n: G[n] for n in self.others}) if self.others else ({}, {})
        for n in self.low_rank:
            factor = self.geometry.params[n].norm.factor
            Q = self.right_factor(G[n])
            P = G[P_KEY + n].to(Q.dtype)
            dirs[n] = -(P @ Q.mT).reshape(self.shapes[n]) / factor
            duals[n] = (1 - self.opt["beta"]) * (G[n] * Q).sum() / factor  # on EMA momentum's scale
        X = state["X"]  # the directions in the model's dtype before the radius multiplies them
        return self.lmo_step.apply(X, {}, k, given=({n: d.to(X[n].dtype) for n, d in dirs.items()}, duals))


class OrthDion(Dion):
    """``orth-dion`` — Orth-Dion (arXiv 2605.16341): Dion with ``Q' = QR(R).Q``; see the module docstring."""

    name = "orth-dion"
    RIGHT = "qr"


def positive_qr(R: Tensor) -> Tensor:
    """The Q of ``R = QT`` (reduced) with T's diagonal made non-negative: the unique QR of a full-rank R.
    LAPACK's Householder QR may give negative diagonal entries, which would turn columns of Orth-Dion's
    step uphill (``⟨R, Q⟩ = tr T``)."""
    Q, T = torch.linalg.qr(R, mode="reduced")
    signs = torch.where(torch.diagonal(T, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(Q.dtype)
    return Q * signs.unsqueeze(-2)


__all__ = ["Dion", "OrthDion"]
