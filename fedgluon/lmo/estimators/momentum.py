"""Elementwise estimators over a block of clients: EMA momentum, MVR/STORM, SARAH/PAGE, Adam moments."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedgluon.lmo.estimators.base import Estimator, _batch, _check_beta, _clone, _device, _require_prev, _zeros


@dataclass
class EMAMomentum(Estimator):
    """``M ← βM + (1−β)g`` (Gluon Alg. 1, Muon's lerp); Nesterov: estimate ``(1−β)g + βM``.

    ``init="zero"`` starts from M = 0 (KellerJordan/Muon), ``"grad"`` from M = g₀ (Gluon theory).
    """

    beta: float = 0.95
    nesterov: bool = False
    init: str = "zero"
    name = "ema"

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
class AdamMoments(Estimator):
    """Adam's moments and direction (Kingma & Ba 2015, arXiv 1412.6980; torch.optim.AdamW's arithmetic)::

        t ← t + 1,   m ← β₁m + (1−β₁)g,   v ← β₂v + (1−β₂)g²
        estimate  (m / (1−β₁ᵗ)) / (√(v / (1−β₂ᵗ)) + ε)

    ``t`` is each row's own step count (a (B,) int64 state leaf), so bias correction follows each
    client's own history. The caller steps ``X ← X(1 − ηλ) − η · estimate`` (AdamW's decoupled decay).
    """

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    name = "adam"

    def __post_init__(self) -> None:
        b1, b2 = (float(b) for b in self.betas)
        _check_beta(b1)
        _check_beta(b2)
        self.betas = (b1, b2)
        if not self.eps >= 0:
            raise ValueError(f"adam eps must be >= 0, got {self.eps}")

    def zero_state(self, g):
        return {"m": _zeros(g), "v": _zeros(g), "step": {"t": torch.zeros(_batch(g), dtype=torch.int64,
                                                                            device=_device(g))}}

    def _update(self, state, g_now, g_prev, rows):
        b1, b2 = self.betas
        t = rows.zero(state["step"]["t"]) + 1
        tf = t.to(torch.float64)
        c1, c2 = 1 - torch.pow(b1, tf), 1 - torch.pow(b2, tf)
        m, v, est = {}, {}, {}
        for k, g in g_now.items():
            shape = (-1, *([1] * (g.ndim - 1)))
            m[k] = torch.lerp(rows.zero(state["m"][k]), g, 1 - b1)
            v[k] = torch.lerp(rows.zero(state["v"][k]), g * g, 1 - b2)
            denom = (v[k] / c2.to(g.device, g.dtype).view(shape)).sqrt() + self.eps
            est[k] = m[k] / c1.to(g.device, g.dtype).view(shape) / denom
        return {"m": m, "v": v, "step": {"t": t}}, est


@dataclass
class MVR(Estimator):
    """STORM / MVR with the same sample at both points: ``M ← g_now + β(M − g_prev)``; M⁰ = g⁰."""

    beta: float = 0.9
    name = "mvr"
    needs_previous = True

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
