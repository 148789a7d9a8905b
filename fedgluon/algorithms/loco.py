"""DiLoCo and MuLoCo: H inner steps with a kept inner optimizer, a compressed pseudo-gradient, an outer
Nesterov step (docs/ALGORITHMS.md §15).

The papers, update equations and defaults: docs/ALGORITHMS.md §15.1 (DiLoCo), §15.2 (MuLoCo), §15.3 (int-b;
[RECON] MuLoCo's own definition of its 2-bit grid was not available here).
A client's inner optimizer state (AdamW's moments and step count; MuLoCo's Nesterov EMA momentum
``M ← βM + (1−β)g``, estimate ``(1−β)g + βM``) is its client-state row's ``inner`` piece. Both take any
compressor and ``error_feedback`` (``none`` or ``ef14``, which needs a contractive compressor:
``compressors.check_contractive``; DiLoCo's default: identity, none; MuLoCo's: int2, ef14).

**Choices fedgluon made where the papers are silent** (or set for language-model scale):

* the uplink carries ``X_j^H − X = −Δ_j`` (FedAvg's uplink, :class:`~fedgluon.algorithms.local.FedAvg`)
  and the server steps on ``−mean``: the same Δ for the sign-symmetric compressors here (top-k,
  int-b, identity);
* H (``local_steps``) defaults to 5, not the papers' 500 (DiLoCo) or 30 (MuLoCo): simulator rounds on
  small tasks; the inner learning rate ``lr`` follows the run's schedule at inner step ``kH + h``
  (the papers use cosine with warmup over inner steps: ``schedule: warmup_cosine``);
* DiLoCo's AdamW uses ``betas = (0.9, 0.999)``, ``eps = 1e-8`` (torch's defaults; the paper gives
  lr 4e-4 and weight decay 0.1, which are the defaults here); AdamW's step count is per client and
  kept with its moments; a client's first participation starts from zero moments;
* MuLoCo's inner Muon is fedgluon's LMO step of whatever geometry the run configures (pick the
  ``muon`` preset for the paper's Muon; its decay is the LMO step's ``weight_decay``, 0 by default);
* EF14 with a unit error decay (the residual is kept in full: no decay factor is applied), per client,
  committed with the row; the residual is added before compression, as the paper describes;
* the outer optimizer is ``torch.optim.SGD(nesterov=True)`` at a constant ``outer_lr`` (no outer
  schedule), its momentum buffer in the server state;
* ``inner: "sgd"`` (DiLoCo only) swaps AdamW for plain SGD ``X ← X − η g``: DiLoCo with SGD inside
  is FedAvg with server momentum; with H = 1, outer lr 1, no momentum and identity it is one gradient
  descent step on the mean minibatch gradient (tests/unit/test_loco.py).

Partial participation: the mean is over the accepted clients; a rejected or failed client's reply is
dropped and its row (inner state, EF14 residual) is not advanced, so it resumes from its last
committed state. The server keeps ``X`` and the outer optimizer's ``state_dict``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from fedgluon.algorithms.local import FedAvg, LocalGluon
from fedgluon.algorithms.server_opt import torch_step
from fedgluon.clients.table import ClientRows
from fedgluon.lmo.estimators import AdamMoments

INNER = ("adamw", "sgd")


class _LoCo(FedAvg):
    """The shared parts: H inner steps whose optimizer state is kept in the client row (``inner``), the
    uplink of FedAvg (any compressor, EF14 or none), and the outer Nesterov SGD on the mean Δ."""

    OPTIONS: ClassVar[dict[str, Any]] = {
        **{k: v for k, v in FedAvg.OPTIONS.items() if k not in ("local_lr", "server_lr")},
        "outer_lr": 0.7, "outer_momentum": 0.9, "outer_nesterov": True}

    def __init__(self, geometry, **options):
        super().__init__(geometry, **options)
        if self.opt["adaptive"] is not None:
            raise ValueError(f"algorithm {self.name!r} takes an inner schedule, not Gluon's adaptive radius")
        if self.opt["state_dtype"] is not None:
            raise ValueError(f"algorithm {self.name!r} keeps its inner optimizer state in the working dtype "
                             f"(state_dtype must be None, got {self.opt['state_dtype']!r})")
        if not self.opt["outer_lr"] > 0:
            raise ValueError(f"outer_lr must be > 0, got {self.opt['outer_lr']}")
        if not 0 <= self.opt["outer_momentum"] < 1:
            raise ValueError(f"outer_momentum must be in [0, 1), got {self.opt['outer_momentum']}")

    def inner_start(self, rows: ClientRows) -> tuple[Any, Tensor]:
        """The kept inner state of the rows (None before any state exists); a first participation's row
        is zero-filled and marked ``first``, so it starts from a fresh optimizer."""
        return (rows.tree or {}).get("inner"), rows.first

    def inner_kept(self, est_state: Any) -> dict[str, Any]:
        return {"inner": est_state}

    def init_server(self, X0):
        state = super().init_server(X0)
        state["outer"] = None  # the outer optimizer's state_dict after the first step
        return state

    def outer_optimizer(self, params: list[Tensor]) -> torch.optim.Optimizer:
        mu = self.opt["outer_momentum"]
        return torch.optim.SGD(params, lr=self.opt["outer_lr"], momentum=mu,
                               nesterov=bool(self.opt["outer_nesterov"]) and mu > 0)

    def server_update(self, state, G, k):
        """Outer Nesterov SGD on the pseudo-gradient ``Δ = −G`` (G: the mean of the decoded ``X_j^H − X``)."""
        pseudo = {n: -g for n, g in G.items()}
        X, state["outer"] = torch_step(self.outer_optimizer, state["X"], pseudo, self.opt["outer_lr"],
                                       state.get("outer"))
        return X, None


class DiLoCo(_LoCo):
    """``diloco`` — H AdamW steps ``X ← X(1 − ηλ) − η m̂/(√v̂ + ε)`` per round, moments kept across
    rounds; ``Δ = X − X^H`` averaged; outer Nesterov SGD (η_out = 0.7, μ = 0.9). arXiv 2311.08105."""

    name = "diloco"
    OPTIONS: ClassVar[dict[str, Any]] = {**_LoCo.OPTIONS, "inner": "adamw", "lr": 4e-4, "weight_decay": 0.1,
                                         "betas": (0.9, 0.999), "eps": 1e-8}

    def __init__(self, geometry, **options):
        super().__init__(geometry, **options)
        if self.opt["inner"] not in INNER:
            raise ValueError(f"inner must be one of {list(INNER)}, got {self.opt['inner']!r}")
        self.est = AdamMoments(tuple(self.opt["betas"]), self.opt["eps"]) if self.opt["inner"] == "adamw" else None

    def local_step(self, X, g, step, est_state, first):
        """One inner step of the block at the schedule's ``η = lr(step)``: AdamW (decoupled decay λ), or
        plain SGD ``X ← X − η g`` with ``inner: sgd`` (no state, no decay)."""
        eta = self.lmo_step.radius_rule.base(step)
        if self.est is None:
            return {n: X[n] - eta * g[n] for n in X}, {}
        state = est_state if est_state is not None else self.est.zero_state(g)
        state, d = self.est.update(state, g, None, first)
        decay = 1 - eta * self.opt["weight_decay"]
        return {n: X[n] * decay - eta * d[n] for n in X}, state


class MuLoCo(_LoCo, LocalGluon):
    """``muloco`` — H Muon steps (the run geometry's LMO step on Nesterov momentum, β = 0.95, momentum
    kept across rounds); ``Δ = X − X^H`` through EF14 with the 2-bit quantiser by default; outer
    Nesterov SGD (η_out = 0.7, μ = 0.9). arXiv 2505.23725."""

    name = "muloco"
    OPTIONS: ClassVar[dict[str, Any]] = {**_LoCo.OPTIONS, "beta": 0.95, "nesterov": True,
                                         "compressor": {"name": "int2"}, "error_feedback": "ef14"}
