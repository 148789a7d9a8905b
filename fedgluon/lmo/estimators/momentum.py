"""Elementwise estimators over a block of clients: EMA momentum, MVR/STORM, SARAH/PAGE."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedgluon.lmo.estimators.base import Estimator, _check_beta, _clone, _require_prev, _zeros


@dataclass
class EMAMomentum(Estimator):
    """``M ← βM + (1−β)g`` (Gluon Alg. 1, Muon's lerp); Nesterov: estimate ``(1−β)g + βM``.

    ``init="zero"`` starts from M = 0 (KellerJordan/Muon), ``"grad"`` from M = g₀ (Gluon theory).
    """

    beta: float = 0.95
    nesterov: bool = False
    init: str = "zero"
    name = "ema"
    elementwise = True

    def __post_init__(self) -> None:
        _check_beta(self.beta)
        if self.init not in ("zero", "grad"):
            raise ValueError(f"momentum init must be one of ['zero', 'grad'], got {self.init!r}")

    def zero_state(self, g):
        return {"m": _zeros(g)}

    def _update(self, state, g_now, g_prev, rows):
        w = 1 - self.beta
        m = {k: torch.lerp(rows.zero(state["m"][k]), g, w) for k, g in g_now.items()}
        if self.init == "grad":
            m = {k: rows.where(g, m[k]) for k, g in g_now.items()}
        est = {k: torch.lerp(m[k], g, w) for k, g in g_now.items()} if self.nesterov else m
        return {"m": m}, est


@dataclass
class MVR(Estimator):
    """STORM / MVR with the same sample at both points: ``M ← g_now + β(M − g_prev)``; M⁰ = g⁰."""

    beta: float = 0.9
    name = "mvr"
    needs_previous = True
    elementwise = True

    def __post_init__(self) -> None:
        _check_beta(self.beta, allow_one=True)

    def zero_state(self, g):
        return {"m": _zeros(g)}

    def _update(self, state, g_now, g_prev, rows):
        if rows.all:
            m = _clone(g_now)
        else:
            gp = _require_prev(self.name, g_prev)
            m = {k: rows.where(g, g + self.beta * (state["m"][k] - gp[k])) for k, g in g_now.items()}
        return {"m": m}, m


@dataclass
class SARAH(Estimator):
    """SARAH / PAGE: ``V ← V + g_now − g_prev`` (V⁰ = g⁰); a refresh sets V to a large-batch gradient.

    Which steps refresh (probability p, or every m steps) is decided by the caller with a
    :class:`RefreshPolicy`, so that in federated runs the server draws one coin per round (a refresh
    applies to the whole block).
    """

    name = "sarah"
    needs_previous = True
    supports_refresh = True
    elementwise = True

    def zero_state(self, g):
        return {"v": _zeros(g)}

    def _update(self, state, g_now, g_prev, rows):
        if rows.all:
            v = _clone(g_now)
        else:
            gp = _require_prev(self.name, g_prev)
            v = {k: rows.where(g, state["v"][k] + g - gp[k]) for k, g in g_now.items()}
        return {"v": v}, v

    def refresh(self, state, g_large, first):
        self._rows(first, g_large)
        v = _clone(g_large)
        return {"v": v}, v
