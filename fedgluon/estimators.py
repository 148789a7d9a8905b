"""Gradient estimators as pure state transitions on dicts of tensors.

Each estimator maps ``(state, g_now[, g_prev]) -> (state', estimate)`` and never mutates its
inputs, so a caller can drop ``state'`` (a rejected client keeps its old state, DESIGN §2).
``state is None`` means "first step": the estimator initialises from the first gradient.

Notation: ``g_now = ∇f(X^k; ξ_k)``; ``g_prev = ∇f(X^{k−1}; ξ_k)`` — the *same* sample ξ_k at the
previous iterate (only estimators with ``needs_previous = True`` use it). Momentum follows DESIGN
§2: ``beta`` weighs the *old* value.

| name       | update                                                              | source |
| ---------- | ------------------------------------------------------------------- | ------ |
| ema        | M ← βM + (1−β)g;  estimate M, or (1−β)g + βM with Nesterov          | Gluon Alg. 1; KellerJordan/Muon |
| mvr        | M ← g_now + β(M − g_prev)                                           | STORM / Gluon-MVR (ALGORITHMS §5) |
| muon_mvr1  | c = g + γβ/(1−β)(g − g_last), clip ‖c‖_F ≤ 1, M ← βM + (1−β)c        | Muon-MVR code, is_approx=True (§6) |
| muon_mvr2  | as muon_mvr1 with g_last = g_prev (same batch)                      | Muon-MVR2 (§6) |
| sarah      | V ← V + g_now − g_prev; on refresh V ← large-batch gradient         | SARAH / PAGE (§10.2 A) |
| limuon     | M ← g_now + β(RSVD_r(M) − g_prev), 2-D state stored as rank-r factors | LiMuon Option 2 (§7) |

LiMuon writes ``(1 − β_LiMuon)`` for our ``β``; EF21-Muon's and Scion's β weigh the new gradient
and translate to ``β = 1 − β_paper``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from .linalg import randomized_svd
from .rng import generator

Tensors = dict[str, Tensor]
State = dict[str, Tensors]


def _check_beta(beta: float, *, allow_one: bool = False) -> None:
    ok = 0.0 <= beta <= 1.0 if allow_one else 0.0 <= beta < 1.0
    if not ok:
        raise ValueError(f"beta must be in [0, 1{']' if allow_one else ')'}, got {beta}")


def _require_prev(name: str, g_prev: Mapping[str, Tensor] | None) -> Mapping[str, Tensor]:
    if g_prev is None:
        raise ValueError(f"estimator {name!r} needs the gradient at the previous iterate on the same "
                         "batch (g_prev); pass it, or use the optimizer's closure protocol")
    return g_prev


class Estimator(ABC):
    """A gradient estimator; subclasses define ``update``."""

    name: str = "estimator"
    needs_previous: bool = False  # uses ∇f(X^{k−1}; ξ_k)
    supports_refresh: bool = False  # accepts a large-batch refresh (SARAH/PAGE)
    # every output entry is a function of the same entries of the inputs alone, so one step over
    # clients' stacked tensors equals the per-client steps bitwise (fedgluon.algorithms.columns)
    elementwise: bool = False

    @abstractmethod
    def update(self, state: State | None, g_now: Mapping[str, Tensor],
               g_prev: Mapping[str, Tensor] | None = None) -> tuple[State, Tensors]:
        """One step: the new state and the gradient estimate handed to the LMO."""

    def refresh(self, state: State | None, g_large: Mapping[str, Tensor]) -> tuple[State, Tensors]:
        raise ValueError(f"estimator {self.name!r} has no large-batch refresh")


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

    def update(self, state, g_now, g_prev=None):
        b = self.beta
        if state is None:
            m_old = {k: (g.clone() if self.init == "grad" else torch.zeros_like(g)) for k, g in g_now.items()}
            m = m_old if self.init == "grad" else {k: torch.lerp(m_old[k], g, 1 - b) for k, g in g_now.items()}
        else:
            m = {k: torch.lerp(state["m"][k], g, 1 - b) for k, g in g_now.items()}
        est = {k: torch.lerp(m[k], g, 1 - b) for k, g in g_now.items()} if self.nesterov else m
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

    def update(self, state, g_now, g_prev=None):
        if state is None:
            m = {k: g.clone() for k, g in g_now.items()}
        else:
            gp = _require_prev(self.name, g_prev)
            m = {k: g + self.beta * (state["m"][k] - gp[k]) for k, g in g_now.items()}
        return {"m": m}, m


def _clip_unit_frobenius(c: Tensor) -> Tensor:
    n = torch.linalg.vector_norm(c)
    return c / n if n > 1 else c


@dataclass
class MuonMVR(Estimator):
    """Muon-MVR (Chang, Liu, Yuan, arXiv 2509.15816; code MaeChd/MUON-MVR, ALGORITHMS §6).

    ``c = g + γ·β/(1−β)·(g − g_last)``; if ``clip`` and ``‖c‖_F > 1`` then ``c ← c/‖c‖_F``
    (per parameter); ``M ← βM + (1−β)c`` from M = 0. ``variant=1`` (one batch): ``g_last`` is the
    previous step's gradient on the previous batch, kept in the state. ``variant=2`` (two
    gradients per step): ``g_last = ∇f(X^{k−1}; ξ_k)`` on the current batch. The code's NS input
    ``M/(1−β)`` differs from M by a scalar, which a layer-wise LMO ignores.
    """

    beta: float = 0.95
    gamma: float = 0.025
    clip: bool = True
    variant: int = 1

    def __post_init__(self) -> None:
        _check_beta(self.beta)
        if self.variant not in (1, 2):
            raise ValueError(f"muon_mvr variant must be one of [1, 2], got {self.variant}")
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma}")

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"muon_mvr{self.variant}"

    @property
    def needs_previous(self) -> bool:  # type: ignore[override]
        return self.variant == 2

    def update(self, state, g_now, g_prev=None):
        b, scale = self.beta, self.gamma * self.beta / (1 - self.beta)
        if state is None:
            last: Mapping[str, Tensor] | None = None
            m_old = {k: torch.zeros_like(g) for k, g in g_now.items()}
        else:
            last = _require_prev(self.name, g_prev) if self.variant == 2 else state["last"]
            m_old = state["m"]
        m = {}
        for k, g in g_now.items():
            c = g if last is None else g + scale * (g - last[k])
            if self.clip:
                c = _clip_unit_frobenius(c)
            m[k] = torch.lerp(m_old[k], c, 1 - b)
        new_state = {"m": m}
        if self.variant == 1:
            new_state["last"] = {k: g.clone() for k, g in g_now.items()}
        return new_state, m


@dataclass
class SARAH(Estimator):
    """SARAH / PAGE: ``V ← V + g_now − g_prev``; a refresh sets V to a large-batch gradient.

    Which steps refresh (probability p, or every m steps) is decided by the caller with a
    :class:`RefreshPolicy`, so that in federated runs the server draws one coin per round.
    """

    name = "sarah"
    needs_previous = True
    supports_refresh = True
    elementwise = True

    def update(self, state, g_now, g_prev=None):
        if state is None:
            v = {k: g.clone() for k, g in g_now.items()}
        else:
            gp = _require_prev(self.name, g_prev)
            v = {k: state["v"][k] + g - gp[k] for k, g in g_now.items()}
        return {"v": v}, v

    def refresh(self, state, g_large):
        v = {k: g.clone() for k, g in g_large.items()}
        return {"v": v}, v


@dataclass
class LiMuon(Estimator):
    """LiMuon Option 2 (Huang, Luo, Chen, arXiv 2509.14562, ALGORITHMS §7), our β = 1 − β_LiMuon.

    ``M ← g_now + β(M̂ − g_prev)`` with ``M̂ = RSVD_r(M)`` for matrices (stored as factors
    ``U·S`` (m×r) and ``V`` (n×r)); vectors keep a full state. The Gaussian sketch of step k is
    drawn from a CPU generator seeded with ``(seed, k)``, so runs reproduce on any device.
    """

    beta: float = 0.9
    rank: int = 8
    oversample: int = 2
    seed: int = 0
    name = "limuon"
    needs_previous = True

    def __post_init__(self) -> None:
        _check_beta(self.beta, allow_one=True)
        if self.rank < 1 or self.oversample < 0:
            raise ValueError(f"limuon needs rank >= 1 and oversample >= 0, got {self.rank}, {self.oversample}")

    def _compress(self, m: Mapping[str, Tensor], step: int) -> State:
        gen = generator(self.seed, "sketch", step)
        P, Q, full = {}, {}, {}
        for k in sorted(m):
            t = m[k]
            if t.ndim >= 2 and min(t.shape[0], math.prod(t.shape[1:])) > self.rank:
                p, q = randomized_svd(t.reshape(t.shape[0], -1), self.rank, self.oversample, gen)
                P[k], Q[k] = p, q
            else:
                full[k] = t
        return {"P": P, "Q": Q, "full": full}

    def _expand(self, state: State, like: Mapping[str, Tensor]) -> Tensors:
        out = dict(state["full"])
        for k in state["P"]:
            out[k] = (state["P"][k] @ state["Q"][k].mT).reshape(like[k].shape)
        return out

    def update(self, state, g_now, g_prev=None):
        if state is None:
            m, step = {k: g.clone() for k, g in g_now.items()}, 0
        else:
            gp = _require_prev(self.name, g_prev)
            m_hat = self._expand(state, g_now)
            m = {k: g + self.beta * (m_hat[k] - gp[k]) for k, g in g_now.items()}
            step = int(state["step"]["k"]) + 1
        new_state = self._compress(m, step)
        new_state["step"] = {"k": torch.tensor(step)}
        return new_state, m


ESTIMATORS = ("ema", "mvr", "muon_mvr1", "muon_mvr2", "sarah", "limuon")


def make_estimator(name: str, **kwargs) -> Estimator:
    """Build an estimator by name (see :data:`ESTIMATORS`) from keyword config values."""
    if name == "ema":
        return EMAMomentum(**_pick(kwargs, "beta", "nesterov", "init"))
    if name == "mvr":
        return MVR(**_pick(kwargs, "beta"))
    if name in ("muon_mvr1", "muon_mvr2"):
        return MuonMVR(variant=int(name[-1]), **_pick(kwargs, "beta", "gamma", "clip"))
    if name == "sarah":
        return SARAH()
    if name == "limuon":
        return LiMuon(**_pick(kwargs, "beta", "rank", "oversample", "seed"))
    raise ValueError(f"estimator must be one of {list(ESTIMATORS)}, got {name!r}")


def _pick(kwargs: Mapping[str, object], *keys: str) -> dict[str, object]:
    return {k: kwargs[k] for k in keys if kwargs.get(k) is not None}


@dataclass
class RefreshPolicy:
    """When SARAH/PAGE refreshes with a large batch: with probability ``prob`` (one coin per step
    from the caller's generator), or every ``period`` steps; step 0 always refreshes."""

    prob: float | None = None
    period: int | None = None

    def __post_init__(self) -> None:
        if (self.prob is None) == (self.period is None):
            raise ValueError("refresh needs exactly one of refresh_prob (in [0, 1]) or refresh_period (>= 1)")
        if self.prob is not None and not 0.0 <= self.prob <= 1.0:
            raise ValueError(f"refresh_prob must be in [0, 1], got {self.prob}")
        if self.period is not None and self.period < 1:
            raise ValueError(f"refresh_period must be >= 1, got {self.period}")

    def due(self, step: int, generator: torch.Generator) -> bool:
        if step == 0:
            return True
        if self.period is not None:
            return step % self.period == 0
        return bool(torch.rand((), generator=generator) < self.prob)
