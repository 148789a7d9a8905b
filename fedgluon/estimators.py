"""Gradient estimators as pure state transitions over a block of clients.

Every tensor carries a leading client axis: ``update(state, g_now, g_prev, first) -> (state', estimate)``
steps B clients at once, ``state`` a dict of dicts of ``(B, *shape)`` tensors (one row per client, the
layout of a client-state table), ``first`` a ``(B,)`` bool tensor marking each client's first step. A row
of a client that never stepped is zero-filled (:meth:`Estimator.zero_state`), and a zero-filled row never
changes the math: wherever the first step differs, the row is selected by ``first``. Row ``i`` of a block
update equals the update of client ``i`` alone bitwise (``tests/test_estimator_blocks.py``); per-row
reductions (Muon-MVR's clipping norm, LiMuon's RSVD) stay per row. Updates never mutate their inputs, so
a caller can drop ``state'`` (a rejected client keeps its old state).

Notation: ``g_now = ∇f(X^k; ξ_k)``; ``g_prev = ∇f(X^{k−1}; ξ_k)`` — the *same* sample ξ_k at the
previous iterate (only estimators with ``needs_previous = True`` use it; it may be ``None`` when every
row is a first step). Momentum ``beta`` weighs the *old* value.

| name       | update                                                              | source |
| ---------- | ------------------------------------------------------------------- | ------ |
| ema        | M ← βM + (1−β)g;  estimate M, or (1−β)g + βM with Nesterov          | Gluon Alg. 1; KellerJordan/Muon |
| mvr        | M ← g_now + β(M − g_prev)                                           | STORM / Gluon-MVR |
| muon_mvr1  | c = g + γβ/(1−β)(g − g_last), clip ‖c‖_F ≤ 1, M ← βM + (1−β)c        | Muon-MVR code, is_approx=True |
| muon_mvr2  | as muon_mvr1 with g_last = g_prev (same batch)                      | Muon-MVR2 (is_approx=False) |
| sarah      | V ← V + g_now − g_prev; on refresh V ← large-batch gradient         | SARAH / PAGE |
| limuon     | M ← g_now + β(RSVD_r(M) − g_prev), 2-D state stored as rank-r factors | LiMuon Option 2 |

``muon_mvr1/2`` also have ``form="reference"``: the published code's first step and AdamW on
non-matrix parameters (:class:`MuonMVR`).

LiMuon writes ``(1 − β_LiMuon)`` for our ``β``; EF21-Muon's and Scion's β weigh the new gradient
and translate to ``β = 1 − β_paper``.

One model (the optimizer, B = 1) steps with :meth:`Estimator.step_one`. Transitional, to be deleted once
every caller steps blocks: ``update``/``refresh`` called without ``first`` (the old per-client signature, a
wrapper of ``step_one``) and :meth:`Estimator.update_rows` (a list of per-client states in, a list out).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

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


class Rows:
    """A block's first-step mask ``first`` ((B,) bool) and the row selections made with it."""

    def __init__(self, first: Tensor) -> None:
        self.first = first
        self.any = bool(first.any())
        self.all = bool(first.all())

    def _mask(self, t: Tensor) -> Tensor:
        return self.first.view(-1, *([1] * (t.ndim - 1))).to(t.device)

    def where(self, on_first: Tensor, otherwise: Tensor) -> Tensor:
        """``on_first`` in first rows, ``otherwise`` in the rest (a new tensor unless no row is first)."""
        return torch.where(self._mask(otherwise), on_first, otherwise) if self.any else otherwise

    def zero(self, t: Tensor) -> Tensor:
        """``t`` with its first rows set to 0: the state a first step starts from, whatever the row held."""
        return t.masked_fill(self._mask(t), 0) if self.any else t


def _row_norms(c: Tensor) -> Tensor:
    """‖c_i‖_F of each row, shaped to broadcast against ``c`` (one reduction over the rows flattened: equal
    bitwise to each row's own norm here, at 1, 2 and 8 threads and above torch's parallel grain; checked by
    ``tests/test_estimator_blocks.py``)."""
    n = torch.linalg.vector_norm(c.reshape(c.shape[0], -1), dim=1)
    return n.view(-1, *([1] * (c.ndim - 1)))


def _clip_rows(c: Tensor) -> Tensor:
    """Each row scaled to Frobenius norm 1 where its norm exceeds 1."""
    n = _row_norms(c)
    return torch.where(n > 1, c / n, c)


def _clone(t: Mapping[str, Tensor]) -> Tensors:
    return {k: v.clone() for k, v in t.items()}


def _as_block(tree):
    return tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, tree)


def _row(tree, i: int, *, copy: bool = False):
    return tree_map(lambda t: (t[i].clone() if copy else t[i]) if isinstance(t, Tensor) else t, tree)


class Estimator(ABC):
    """A gradient estimator over a block of clients; subclasses define :meth:`zero_state` and ``_update``."""

    name: str = "estimator"
    needs_previous: bool = False  # uses ∇f(X^{k−1}; ξ_k)
    supports_refresh: bool = False  # accepts a large-batch refresh (SARAH/PAGE)
    # every output entry is a function of the same entries of the inputs alone (no per-row reduction)
    elementwise: bool = False

    @abstractmethod
    def zero_state(self, g: Mapping[str, Tensor]) -> State:
        """The zero-filled state of a block shaped like the gradients ``g`` ((B, *shape) each)."""

    @abstractmethod
    def _update(self, state: State, g_now: Mapping[str, Tensor], g_prev: Mapping[str, Tensor] | None,
                rows: Rows) -> tuple[State, Tensors]:
        """The block step, ``first`` already checked."""

    def schema(self, shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype) -> dict[str, dict[str, tuple]]:
        """One client's state layout: ``{group: {name: (shape, dtype)}}`` for parameters of these shapes."""
        meta = {k: torch.empty((1, *s), dtype=dtype, device="meta") for k, s in shapes.items()}
        return {grp: {k: (tuple(t.shape[1:]), t.dtype) for k, t in part.items()}
                for grp, part in self.zero_state(meta).items()}

    def update(self, state: State | None, g_now: Mapping[str, Tensor], g_prev: Mapping[str, Tensor] | None = None,
               first: Tensor | None = None) -> tuple[State, Tensors]:
        """One step of a block: the new state and the gradient estimate handed to the LMO, row by row.

        ``first`` ((B,) bool) marks the rows whose client steps for the first time; their state rows are
        ignored (zero-filled in a table). Without ``first`` (transitional): one client, unbatched tensors,
        ``state is None`` on its first step."""
        if first is None:
            return self.step_one(state, g_now, g_prev)  # transitional
        return self._update(state, g_now, g_prev, self._rows(first, g_now))

    def refresh(self, state: State | None, g_large: Mapping[str, Tensor],
                first: Tensor | None = None) -> tuple[State, Tensors]:
        """A large-batch refresh of a block (SARAH/PAGE); same conventions as :meth:`update`."""
        raise ValueError(f"estimator {self.name!r} has no large-batch refresh")

    @staticmethod
    def _rows(first: Tensor, g: Mapping[str, Tensor]) -> Rows:
        b = next(iter(g.values())).shape[0] if g else first.shape[0]
        if not isinstance(first, Tensor) or first.dtype != torch.bool or tuple(first.shape) != (b,):
            raise ValueError(f"first must be a ({b},) bool tensor, one entry per row of the block")
        return Rows(first)

    def step_one(self, state: State | None, g_now: Mapping[str, Tensor], g_prev: Mapping[str, Tensor] | None = None,
                 *, refresh: bool = False) -> tuple[State, Tensors]:
        """One model's step (the optimizer's, B = 1) on unbatched tensors: the block step of one row
        (unsqueezed views, no copy); ``state is None`` on the first step; the state comes back unbatched."""
        g1 = _as_block(dict(g_now))
        s1 = self.zero_state(g1) if state is None else _as_block(state)
        first = torch.tensor([state is None])
        if refresh:
            new, est = self.refresh(s1, g1, first)
        else:
            new, est = self.update(s1, g1, None if g_prev is None else _as_block(dict(g_prev)), first)
        return _row(new, 0), _row(est, 0)

    def update_rows(self, states: Sequence[State | None], g_now: Sequence[Mapping[str, Tensor]],
                    g_prev: Sequence[Mapping[str, Tensor] | None] | None = None,
                    refresh: bool = False) -> list[tuple[State, Tensors]]:
        """Transitional adapter: per-client states (``None``: first step), gradients and previous
        gradients (``None`` where absent) stacked into one block step; each client's new state and estimate
        come back as standalone tensors, equal bitwise to its own :meth:`update`."""
        G = {k: torch.stack([g[k] for g in g_now]) for k in g_now[0]}
        zero = _row(self.zero_state({k: t[:1] for k, t in G.items()}), 0)
        S = tree_map(lambda *rows: torch.stack(rows), *[zero if s is None else s for s in states])
        first = torch.tensor([s is None for s in states])
        if refresh:
            new, est = self.refresh(S, G, first)
        else:
            gp = None
            if g_prev is not None and any(p is not None for p in g_prev):
                gp = {k: torch.stack([torch.zeros_like(g[k]) if p is None else p[k] for p, g in zip(g_prev, g_now)])
                      for k in G}
            new, est = self.update(S, G, gp, first)
        return [(_row(new, i, copy=True), _row(est, i, copy=True)) for i in range(len(states))]


def _zeros(g: Mapping[str, Tensor]) -> Tensors:
    return {k: torch.zeros_like(v) for k, v in g.items()}


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

    def zero_state(self, g):
        state = {"m": _zeros(g)}
        if self.form == "reference":
            state["v"] = {k: torch.zeros_like(t) for k, t in g.items() if t.ndim != 3}
            state["step"] = {"t": torch.zeros(_batch(g), dtype=torch.int64, device=_device(g))}
        if self.variant == 1:
            state["last"] = _zeros(g)
        return state

    def _last(self, state: State, g_prev: Mapping[str, Tensor] | None, rows: Rows) -> Mapping[str, Tensor] | None:
        """g_last of the rows that are not first steps (``None`` when every row is)."""
        if rows.all:
            return None
        return _require_prev(self.name, g_prev) if self.variant == 2 else state["last"]

    def _corrected(self, g: Tensor, last: Tensor, beta: float) -> Tensor:
        return g + self.gamma * beta / (1 - beta) * (g - last)

    def _clip(self, c: Tensor) -> Tensor:
        return _clip_rows(c) if self.clip else c

    def _update(self, state, g_now, g_prev, rows):
        if self.form == "reference":
            return self._update_reference(state, g_now, g_prev, rows)
        b, last = self.beta, self._last(state, g_prev, rows)
        m = {}
        for k, g in g_now.items():
            c = g if last is None else rows.where(g, self._corrected(g, last[k], b))  # first step: c = g
            m[k] = torch.lerp(rows.zero(state["m"][k]), self._clip(c), 1 - b)
        new_state = {"m": m}
        if self.variant == 1:
            new_state["last"] = _clone(g_now)
        return new_state, m

    def _update_reference(self, state, g_now, g_prev, rows):
        last = self._last(state, g_prev, rows)
        b1, b2 = self.adamw_betas
        t = rows.zero(state["step"]["t"]) + 1
        scale = torch.tensor([math.sqrt(1 - b2 ** s) / (1 - b1 ** s) for s in t.tolist()], dtype=torch.float64)
        m, v, est = {}, {}, {}
        for k, g in g_now.items():
            matrix = g.ndim == 3
            b = self.beta if matrix else b1
            c = self._clip(self._corrected(g, torch.zeros_like(g) if last is None else rows.zero(last[k]), b))
            m[k] = torch.lerp(rows.zero(state["m"][k]), c, 1 - b)
            if matrix:
                est[k] = m[k] / (1 - b)
            else:
                v[k] = torch.lerp(rows.zero(state["v"][k]), c * c, 1 - b2)
                s = scale.to(g.device, g.dtype).view(-1, *([1] * (g.ndim - 1)))
                est[k] = m[k] / (self.adamw_eps + v[k].sqrt()) * s
        new_state = {"m": m, "v": v, "step": {"t": t}}
        if self.variant == 1:
            new_state["last"] = _clone(g_now)
        return new_state, est


def _batch(g: Mapping[str, Tensor]) -> int:
    return next(iter(g.values())).shape[0]


def _device(g: Mapping[str, Tensor]) -> torch.device:
    return next(iter(g.values())).device


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

    def refresh(self, state, g_large, first=None):
        if first is None:
            return self.step_one(state, g_large, refresh=True)  # transitional
        self._rows(first, g_large)
        v = _clone(g_large)
        return {"v": v}, v


@dataclass
class LiMuon(Estimator):
    """LiMuon Option 2 (Huang, Luo, Chen, arXiv 2509.14562), our β = 1 − β_LiMuon.

    ``M ← g_now + β(M̂ − g_prev)`` (M⁰ = g⁰) with ``M̂ = RSVD_r(M)`` for matrices (stored as factors
    ``U·S`` (m×r) and ``V`` (n×r)); vectors keep a full state. The Gaussian sketch of a client's step k
    is drawn from a CPU generator seeded with ``(seed, k)``, so runs reproduce on any device. The
    factors are computed client by client (a loop over the block's rows): a batched QR/SVD/matmul is not
    guaranteed to round like the per-matrix call.
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

    def _factored(self, shape: tuple[int, ...]) -> bool:
        """Is a parameter of this (per-client) shape stored as rank-r factors?"""
        return len(shape) >= 2 and min(shape[0], math.prod(shape[1:])) > self.rank

    def zero_state(self, g):
        B, r = _batch(g), self.rank
        P = {k: t.new_zeros(B, t.shape[1], r) for k, t in g.items() if self._factored(t.shape[1:])}
        Q = {k: t.new_zeros(B, math.prod(t.shape[2:]), r) for k, t in g.items() if k in P}
        full = {k: torch.zeros_like(t) for k, t in g.items() if k not in P}
        return {"P": P, "Q": Q, "full": full, "step": {"k": torch.zeros(B, dtype=torch.int64, device=_device(g))}}

    def _compress(self, m: Mapping[str, Tensor], steps: Tensor) -> State:
        keys = sorted(k for k in m if self._factored(m[k].shape[1:]))
        P, Q = {k: [] for k in keys}, {k: [] for k in keys}
        for i, step in enumerate(steps.tolist()):
            gen = generator(self.seed, "sketch", step)
            for k in keys:
                row = m[k][i]
                p, q = randomized_svd(row.reshape(row.shape[0], -1), self.rank, self.oversample, gen)
                P[k].append(p)
                Q[k].append(q)
        return {"P": {k: torch.stack(P[k]) for k in keys}, "Q": {k: torch.stack(Q[k]) for k in keys},
                "full": {k: t for k, t in m.items() if k not in P}}

    def _expand(self, state: State, like: Mapping[str, Tensor]) -> Tensors:
        out = dict(state["full"])
        for k, P in state["P"].items():
            Q = state["Q"][k]
            out[k] = torch.stack([(P[i] @ Q[i].mT).reshape(like[k].shape[1:]) for i in range(P.shape[0])])
        return out

    def _update(self, state, g_now, g_prev, rows):
        steps = rows.zero(state["step"]["k"] + 1)
        if rows.all:
            m = _clone(g_now)
        else:
            gp = _require_prev(self.name, g_prev)
            m_hat = self._expand(state, g_now)
            m = {k: rows.where(g, g + self.beta * (m_hat[k] - gp[k])) for k, g in g_now.items()}
        new_state = self._compress(m, steps)
        new_state["step"] = {"k": steps}
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
