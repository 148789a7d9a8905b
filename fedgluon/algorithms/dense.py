"""Uncompressed layer-wise LMO methods: every client sends its estimate dense.

Common server step (Gluon Alg. 1, docs/ALGORITHMS.md §2.1 and §10.2): ``G = Σ_{j∈S} w_j V_j / Σ_{j∈S} w_j``
over the accepted clients S, then ``X_i ← X_i + t_i lmo_i(G_i)`` per layer.

Partial participation: the mean is renormalised over the accepted clients; absent clients keep
their estimator state (and their X_prev, so their next SARAH/MVR difference spans the rounds they
missed). With full participation and linear estimators, averaging the clients' estimates equals
running the estimator on the averaged gradient. A rejected client keeps its pre-round state and
does not enter the mean.
"""

from __future__ import annotations

from typing import Any, ClassVar

from fedgluon.algorithms.base import Algorithm
from fedgluon.lmo.estimators import FORMS
from fedgluon.lmo.geometry import Geometry, check_muon_mvr_reference


class Gluon(Algorithm):
    """``gluon`` — Gluon/Muon/Scion with EMA momentum (Riabinin et al., arXiv 2505.13416, Alg. 1).

    Client: ``M_j ← βM_j + (1−β)∇f_j(X^k; ξ_j)`` (Nesterov option: send ``(1−β)g + βM_j``); sends M_j.
    Server: ``X_i^{k+1} = X_i^k + t_i^k lmo_i(Σ_j w_j M_j)``. Muon and Scion are geometry presets.
    """

    name = "gluon"
    estimator = "ema"
    OPTIONS: ClassVar[dict[str, Any]] = {"beta": 0.9, "nesterov": False}


class GluonMVR(Algorithm):
    """``gluon-mvr`` — Gluon-MVR (Qian, Rammal, Kovalev, Richtárik, arXiv 2512.16598) and Muon-MVR
    (Chang, Liu, Yuan, arXiv 2509.15816), client-side.

    ``variant="storm"``: ``V_j ← ∇f_j(X^k; ξ) + β(V_j − ∇f_j(X_prev; ξ))`` (same ξ; two gradients).
    ``"muon_mvr1"``/``"muon_mvr2"``: the Muon-MVR code's recursion with γ and clipping
    (:class:`fedgluon.lmo.estimators.MuonMVR`), in one of two forms (option ``form``):

    * ``"fedgluon"`` (default): first corrected gradient ``c₁ = g₁``; the client sends its momentum M_j;
      the server steps ``X ← X + t·lmo(mean_j M_j)`` in the run's geometry.
    * ``"reference"``: the published code's update. First step ``c₁ = g₁ + γβ/(1−β)·g₁`` (the code's
      ``last_grad`` starts at zero); a client sends ``M_j/(1−β)`` for 2-D parameters and its AdamW
      direction (``adamw_betas``, ``adamw_eps``; the code's (0.95, 0.99), 1e-8) for the others; the
      geometry must be the ``muon_mvr`` preset, so the server moves matrices by
      ``lr·0.2·sqrt(max(m, n))·polar(mean)`` and the rest by ``lr·mean``. ``beta`` defaults to the
      code's 0.95 in this form. With one client this is the code's update step for step; with several,
      the server averages the clients' AdamW directions (each client keeps its own moments).

    The exact Gluon-MVR-1/2/3 recursions were not available: STORM is the reconstruction [RECON].
    """

    name = "gluon-mvr"
    OPTIONS: ClassVar[dict[str, Any]] = {"variant": "storm", "beta": 0.9, "gamma": 0.025, "clip": True,
                                         "form": "fedgluon", "adamw_betas": (0.95, 0.99), "adamw_eps": 1e-8}
    VARIANTS = {"storm": "mvr", "muon_mvr1": "muon_mvr1", "muon_mvr2": "muon_mvr2"}

    def __init__(self, geometry: Geometry, **options: Any):
        if options.get("form") == "reference" and options.get("variant") in ("muon_mvr1", "muon_mvr2"):
            options.setdefault("beta", 0.95)
        super().__init__(geometry, **options)
        if self.opt["form"] == "reference":
            check_muon_mvr_reference(geometry, "algorithm.form")

    def estimator_name(self) -> str | None:
        variant, form = self.opt["variant"], self.opt["form"]
        if variant not in self.VARIANTS:
            raise ValueError(f"gluon-mvr variant must be one of {list(self.VARIANTS)}, got {variant!r}")
        if form not in FORMS:
            raise ValueError(f"algorithm.form must be one of {list(FORMS)}, got {form!r}")
        if form == "reference" and variant == "storm":
            raise ValueError("algorithm.form 'reference' applies to variants ['muon_mvr1', 'muon_mvr2'], "
                             "got variant 'storm'")
        return self.VARIANTS[variant]


class GluonSARAH(Algorithm):
    """``gluon-sarah`` — the uncompressed variance-reduced Gluon of the core paper (arXiv 2604.10689,
    variant A of docs/ALGORITHMS.md §10.2, [RECON]): SARAH/PAGE on the clients,
    ``V_j ← V_j + ∇f_j(X^k; ξ) − ∇f_j(X_prev; ξ)``, and on refresh rounds (a coin with probability
    ``refresh_prob`` drawn once per round by the server, or every ``refresh_period`` rounds; round 0
    always) ``V_j ← ∇f_j(X^k; large batch)``.
    """

    name = "gluon-sarah"
    estimator = "sarah"
    uses_refresh = True
    OPTIONS: ClassVar[dict[str, Any]] = {"refresh_prob": 0.1, "refresh_period": None}


class LiMuonFL(Algorithm):
    """``limuon`` — LiMuon Option 2 (Huang, Luo, Chen, arXiv 2509.14562): MVR whose matrix state is kept
    as a rank-r randomized SVD on each client, ``V_j ← ∇f_j(X^k; ξ) + β(RSVD_r(V_j) − ∇f_j(X_prev; ξ))``;
    the estimate travels dense. Sketches are seeded by (``seed``, the client's step count)."""

    name = "limuon"
    estimator = "limuon"
    OPTIONS: ClassVar[dict[str, Any]] = {"beta": 0.9, "rank": 8, "oversample": 2, "seed": 0}
