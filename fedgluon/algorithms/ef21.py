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

from typing import Any, ClassVar

from compressors import EF21, check_contractive, make_compressor, make_error_feedback
from fedgluon.algorithms.aggregate import tracker_update, update_trackers, weighted_mean
from fedgluon.algorithms.base import Algorithm
from fedgluon.algorithms.block import feedback_step


class FeedbackUplink(Algorithm):
    """The estimate, compressed with error feedback (EF21 by default); see the module docstring."""

    OPTIONS: ClassVar[dict[str, Any]] = {"compressor": {"name": "topk", "ratio": 0.05}, "tracker": "full",
                                         "error_feedback": "ef21"}

    def __init__(self, geometry, **options):
        super().__init__(geometry, **options)
        self.compressor = make_compressor(self.opt["compressor"], "algorithm.compressor")
        check_contractive(self.opt["error_feedback"], self.compressor, self.shapes)
        self.ef = make_error_feedback(self.opt["error_feedback"], self.compressor, self.opt["tracker"])

    def local_update(self, state, grads, bc, rows):
        """The block's estimates, then one error-feedback step over its rows (one compression call per
        layer, :func:`~fedgluon.algorithms.block.feedback_step`)."""
        new, v = self.estimate(state, grads, rows.first)
        pieces, groups = feedback_step(self.ef, state, v, bc, rows)
        return {**new, **pieces}, groups

    @property
    def derived(self) -> tuple[str, ...]:  # type: ignore[override]  # per instance: a ClassVar elsewhere
        """EF21's full tracker ``G_j ← G_j + R_j`` is the server's to compute: its old row plus the decoded
        message, the same operations as the client's (bitwise equal)."""
        return ("ef/g/",) if isinstance(self.ef, EF21) and self.ef.tracker == "full" else ()

    def derive_state(self, columns, clients, decoded, first):
        if self.derived:
            update_trackers(columns, "ef/g/", clients, decoded)

    def aggregate(self, state, decoded, weights, bc):
        if self.ef.tracks:
            return tracker_update(state.get("G"), decoded, weights, state["X"])
        return weighted_mean(decoded, weights)


class GluonEF21(FeedbackUplink):
    """``gluon-ef21`` — EF21-Muon uplink (Gruntkowska et al., arXiv 2510.00643): EMA momentum
    ``M_j ← βM_j + (1−β)∇f_j(X^k; ξ)`` compressed with EF21; with ``nesterov`` the client compresses
    Muon's Nesterov direction ``d_j = βM_j + (1−β)∇f_j(X^k; ξ)`` (from the ``M_j`` just updated) instead."""

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
