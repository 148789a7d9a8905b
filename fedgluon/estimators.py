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
| muon_mvr1  | c = g + γβ/(1−β)(g − g_last), clip ‖c‖_F ≤ 1, M ← βM + (1−β)c        | Muon-MVR code, is_approx=True |
| muon_mvr2  | as muon_mvr1 with g_last = g_prev (same batch)                      | Muon-MVR2 (is_approx=False) |

``muon_mvr1/2`` also have ``form="reference"``: the published code's first step and AdamW on
non-matrix parameters (:class:`MuonMVR`).
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


FORMS = ("fedgluon", "reference")


@dataclass
class MuonMVR(Estimator):
    """Muon-MVR1/2 (Chang, Liu, Yuan, "On the Convergence of Muon and Beyond", arXiv 2509.15816; code
    github.com/MaeChd/MUON-MVR, class ``MuonMVR``, which follows the MARS-M code), in two forms.

    ``form="fedgluon"`` (default), per parameter, from M = 0::

        c = g + γ·β/(1−β)·(g − g_last)   (c = g on the first step: there is no g_last yet)
        if clip and ‖c‖_F > 1: c ← c/‖c‖_F
        M ← βM + (1−β)c;  estimate M

    ``variant=1`` (one gradient per step, the code's ``is_approx=True``): ``g_last`` is the previous
    step's gradient on the previous batch, kept in the state. ``variant=2`` (two gradients per step,
    ``is_approx=False``): ``g_last = ∇f(X^{k−1}; ξ_k)`` on the current batch.

    ``form="reference"`` is the published code's update, step for step:

    * the code keeps ``last_grad`` from zero, so the first step's ``c₁ = g₁ + γβ/(1−β)·g₁``
      (1.475·g₁ at γ = 0.025, β = 0.95), before clipping; later steps as above;
    * 2-D parameters: M as above, estimate ``M/(1−β)``, the code's Newton–Schulz input. The scale
      changes no LMO: fedgluon's NS divides by ‖·‖_F exactly and SVD is scale-free, so only the code's
      ``‖X‖ + 1e-7`` in its bf16 NS (3 quintic steps in the copy read) would notice; the step's reported
      dual norms are those of M/(1−β);
    * every other parameter (vectors, conv kernels, scalars: the code tests ``p.ndim == 2``) takes the
      code's AdamW branch on the same corrected gradient, with ``β₁, β₂ = adamw_betas`` (the code's
      defaults (0.95, 0.99)) and β₁ in place of β in c::

          c = g + γ·β₁/(1−β₁)·(g − g_last), clipped as above
          m ← β₁m + (1−β₁)c;  v ← β₂v + (1−β₂)c²            (from m = v = 0)
          estimate  m/(ε + √v) · √(1−β₂ᵗ)/(1−β₁ᵗ)             (t = 1, 2, …; ε = adamw_eps = 1e-8)

    The estimate is the step direction itself; with the ``muon_mvr`` geometry preset (2-D spectral
    with Moonlight's scale ``0.2·sqrt(max(m, n))``, the rest ``identity``) and weight decay λ the step is
    the code's ``X ← X(1 − lr·λ) − lr·0.2·sqrt(max(m, n))·polar(M/(1−β))`` for matrices and
    ``X ← X(1 − lr·λ) − lr·estimate`` for the rest. The code's defaults: lr 3e-3, β = 0.95,
    γ = 0.025, weight decay 0. Clipping follows ``clip`` (the code always clips). In ``variant=2`` the
    code's training loop reloads X^{k−1}, back-propagates the current batch there and calls
    ``update_last_grad()`` before each step but the first, which is ``g_last = ∇f(X^{k−1}; ξ_k)`` here.

    Source read: the repository itself could not be fetched when this was written; the update above is
    from a public copy of its ``MuonMVR`` class (github.com/RayCyder/Intro, a CIFAR-10 notebook, marked
    "Muon-MVR2 method from On the Convergence of Muon and Beyond", with a note that it fixed errors on
    Apple M1), whose 2-D branch matches the MARS-M code's Muon branch (same ``c``, clipping and
    ``0.2·sqrt(max(A, B))``). ``tests/test_presets.py`` checks this form against a transcription of it.
    """

    beta: float = 0.95
    gamma: float = 0.025
    clip: bool = True
    variant: int = 1
    form: str = "fedgluon"
    adamw_betas: tuple[float, float] = (0.95, 0.99)
    adamw_eps: float = 1e-8

    def __post_init__(self) -> None:
        _check_beta(self.beta)
        if self.variant not in (1, 2):
            raise ValueError(f"muon_mvr variant must be one of [1, 2], got {self.variant}")
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma}")
        if self.form not in FORMS:
            raise ValueError(f"form must be one of {list(FORMS)}, got {self.form!r}")
        betas = tuple(self.adamw_betas)
        if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
            raise ValueError(f"adamw_betas must be two numbers in [0, 1), got {self.adamw_betas!r}")
        self.adamw_betas = (float(betas[0]), float(betas[1]))
        if not self.adamw_eps >= 0:
            raise ValueError(f"adamw_eps must be >= 0, got {self.adamw_eps}")

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"muon_mvr{self.variant}"

    @property
    def needs_previous(self) -> bool:  # type: ignore[override]
        return self.variant == 2

    def _last(self, state: State | None, g_prev: Mapping[str, Tensor] | None) -> Mapping[str, Tensor] | None:
        if state is None:
            return None
        return _require_prev(self.name, g_prev) if self.variant == 2 else state["last"]

    def _corrected(self, g: Tensor, last: Tensor | None, beta: float) -> Tensor:
        c = g if last is None else g + self.gamma * beta / (1 - beta) * (g - last)
        return _clip_unit_frobenius(c) if self.clip else c

    def update(self, state, g_now, g_prev=None):
        if self.form == "reference":
            return self._update_reference(state, g_now, g_prev)
        b, last = self.beta, self._last(state, g_prev)
        m_old = state["m"] if state is not None else {k: torch.zeros_like(g) for k, g in g_now.items()}
        m = {k: torch.lerp(m_old[k], self._corrected(g, None if last is None else last[k], b), 1 - b)
             for k, g in g_now.items()}
        new_state = {"m": m}
        if self.variant == 1:
            new_state["last"] = {k: g.clone() for k, g in g_now.items()}
        return new_state, m

    def _update_reference(self, state, g_now, g_prev):
        last = self._last(state, g_prev)
        b1, b2 = self.adamw_betas
        if state is None:
            state = {"m": {k: torch.zeros_like(g) for k, g in g_now.items()},
                     "v": {k: torch.zeros_like(g) for k, g in g_now.items() if g.ndim != 2},
                     "step": {"t": torch.tensor(0, dtype=torch.int64)}}
        t = int(state["step"]["t"]) + 1
        m, v, est = {}, {}, {}
        for k, g in g_now.items():
            b = self.beta if g.ndim == 2 else b1
            c = self._corrected(g, torch.zeros_like(g) if last is None else last[k], b)
            m[k] = torch.lerp(state["m"][k], c, 1 - b)
            if g.ndim == 2:
                est[k] = m[k] / (1 - b)
            else:
                v[k] = torch.lerp(state["v"][k], c * c, 1 - b2)
                est[k] = m[k] / (self.adamw_eps + v[k].sqrt()) * (math.sqrt(1 - b2 ** t) / (1 - b1 ** t))
        new_state = {"m": m, "v": v, "step": {"t": torch.tensor(t, dtype=torch.int64)}}
        if self.variant == 1:
            new_state["last"] = {k: g.clone() for k, g in g_now.items()}
        return new_state, est


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
        return MuonMVR(variant=int(name[-1]), **_pick(kwargs, "beta", "gamma", "clip", "form", "adamw_betas",
                                                      "adamw_eps"))
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
