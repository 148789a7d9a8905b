"""Muon-MVR1/2 (both forms) and LiMuon over a block of clients: per-row clipping norms and RSVD factors."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from fedgluon.core.linalg import randomized_svd
from fedgluon.core.rng import generator
from fedgluon.lmo.estimators.base import (
    Estimator,
    Rows,
    State,
    Tensors,
    _batch,
    _check_beta,
    _clone,
    _device,
    _require_prev,
    _zeros,
)


def _row_norms(c: Tensor) -> Tensor:
    """‖c_i‖_F of each row, shaped to broadcast against ``c`` (one reduction over the rows flattened: equal
    bitwise to each row's own norm here, at 1, 2 and 8 threads and above torch's parallel grain; checked by
    ``tests/unit/test_estimator_blocks.py``)."""
    n = torch.linalg.vector_norm(c.reshape(c.shape[0], -1), dim=1)
    return n.view(-1, *([1] * (c.ndim - 1)))


def _clip_rows(c: Tensor) -> Tensor:
    """Each row scaled to Frobenius norm 1 where its norm exceeds 1."""
    n = _row_norms(c)
    over = n > 1
    if not over.any():
        return c
    return c / n if over.all() else torch.where(over, c / n, c)


FORMS = ("fedgluon", "reference")


@dataclass
class MuonMVR(Estimator):
    """Muon-MVR1/2 (Chang, Liu, Yuan, "On the Convergence of Muon and Beyond", arXiv 2509.15816; code
    github.com/MaeChd/MUON-MVR, class ``MuonMVR``, which follows the MARS-M code), in two forms
    (docs/ALGORITHMS.md §6, with ``variant`` 1's and 2's ``g_last``).

    ``form="fedgluon"`` (default), per parameter, from M = 0::

        c = g + γ·β/(1−β)·(g − g_last)   (c = g on the first step: there is no g_last yet)
        if clip and ‖c‖_F > 1: c ← c/‖c‖_F
        M ← βM + (1−β)c;  estimate M

    ``form="reference"`` is the published code's update, step for step. Its ``last_grad`` starts at 0, so
    ``c₁ = g₁ + γβ/(1−β)·g₁`` (before clipping). 2-D parameters estimate ``M/(1−β)``, the code's Newton–Schulz
    input: the scale changes no LMO (fedgluon's NS divides by ‖·‖_F exactly, SVD is scale-free; only the
    code's ``‖X‖ + 1e-7`` in its bf16 NS would notice), and the step reports the dual norms of M/(1−β). Every
    other parameter (the code tests ``p.ndim == 2``) takes the code's AdamW branch on the same corrected
    gradient, β₁ in place of β in c, ``β₁, β₂ = adamw_betas``, ``ε = adamw_eps``::

          m ← β₁m + (1−β₁)c;  v ← β₂v + (1−β₂)c²            (from m = v = 0)
          estimate  m/(ε + √v) · √(1−β₂ᵗ)/(1−β₁ᵗ)             (t = 1, 2, …)

    With the ``muon_mvr`` geometry preset and weight decay λ the step is then the code's
    ``X ← X(1 − lr·λ) − lr·0.2·sqrt(max(m, n))·polar(M/(1−β))`` for matrices and ``X ← X(1 − lr·λ) − lr·estimate``
    for the rest. Clipping follows ``clip`` (the code always clips). In ``variant=2`` the code's loop
    back-propagates the current batch at X^{k−1} before each step but the first: ``g_last = ∇f(X^{k−1}; ξ_k)``.

    Source read: the repository itself could not be fetched when this was written; the update above is
    from a public copy of its ``MuonMVR`` class (github.com/RayCyder/Intro, a CIFAR-10 notebook, marked
    "Muon-MVR2 method from On the Convergence of Muon and Beyond", with a note that it fixed errors on
    Apple M1), whose 2-D branch matches the MARS-M code's Muon branch (same ``c``, clipping and
    ``0.2·sqrt(max(A, B))``). ``tests/unit/test_presets.py`` checks this form against a transcription of it.
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
    def name(self) -> str:  # type: ignore[override]  # from the variant; a class attribute elsewhere
        return f"muon_mvr{self.variant}"

    @property
    def needs_previous(self) -> bool:  # type: ignore[override]  # variant 2 only; a class attribute elsewhere
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
        P: dict[str, list[Tensor]] = {k: [] for k in keys}
        Q: dict[str, list[Tensor]] = {k: [] for k in keys}
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
        # a branch without leaves (no layer factored, or every layer) is not kept by the client-state table
        out = dict(state.get("full", {}))
        for k, P in state.get("P", {}).items():
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
