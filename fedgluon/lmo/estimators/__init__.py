"""Gradient estimators as pure state transitions over a block of clients.

``update(state, g_now, g_prev, first) -> (state', estimate)`` steps B clients at once (docs/DESIGN.md §3,
"Algorithm interface" and "Estimators"): ``state`` a dict of dicts of ``(B, *shape)`` tensors, one row per client
(zero-filled before its first step: :meth:`Estimator.zero_state`), ``first`` a ``(B,)`` bool tensor selecting the
rows whose first step differs. Row ``i`` equals client ``i``'s update alone bitwise
(``tests/unit/test_estimator_blocks.py``). Updates never mutate their inputs.

Notation: ``g_now = ∇f(X^k; ξ_k)``; ``g_prev = ∇f(X^{k−1}; ξ_k)`` — the *same* sample ξ_k at the
previous iterate (only estimators with ``needs_previous = True`` use it; it may be ``None`` when every
row is a first step). Momentum ``beta`` weighs the *old* value (docs/DESIGN.md §2, with the papers' translations).

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

Modules: :mod:`.base` (the interface, :class:`Rows`), :mod:`.momentum` (EMA, MVR, SARAH: elementwise),
:mod:`.muon` (Muon-MVR, LiMuon: per-row norms and factors); this package re-exports them and builds them by
name (:func:`make_estimator`).

One model (the optimizer, B = 1) steps with :meth:`Estimator.step_one`: unbatched tensors, ``state is
None`` on its first step, the block step of one row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fedgluon.lmo.estimators.base import Estimator, Rows, State, Tensors
from fedgluon.lmo.estimators.momentum import MVR, SARAH, AdamMoments, EMAMomentum
from fedgluon.lmo.estimators.muon import FORMS, LiMuon, MuonMVR

__all__ = ["ESTIMATORS", "FORMS", "MVR", "SARAH", "AdamMoments", "EMAMomentum", "Estimator", "LiMuon", "MuonMVR",
           "OPTIONS", "RefreshPolicy", "Rows", "State", "Tensors", "make_estimator"]

_MUON_MVR_OPTIONS = ("beta", "gamma", "clip", "form", "adamw_betas", "adamw_eps")
# name -> (class, fixed arguments, the config options it takes)
_BUILDERS: dict[str, tuple[type[Estimator], dict[str, Any], tuple[str, ...]]] = {
    "ema": (EMAMomentum, {}, ("beta", "nesterov", "init")),
    "mvr": (MVR, {}, ("beta",)),
    "muon_mvr1": (MuonMVR, {"variant": 1}, _MUON_MVR_OPTIONS),
    "muon_mvr2": (MuonMVR, {"variant": 2}, _MUON_MVR_OPTIONS),
    "sarah": (SARAH, {}, ()),
    "limuon": (LiMuon, {}, ("beta", "rank", "oversample", "seed")),
}
ESTIMATORS = tuple(_BUILDERS)
OPTIONS = tuple(dict.fromkeys(k for _, _, keys in _BUILDERS.values() for k in keys))  # every estimator's


def make_estimator(name: str, **kwargs) -> Estimator:
    """Build an estimator by name (see :data:`ESTIMATORS`) from keyword config values (``None``: the default)."""
    if not isinstance(name, str) or name not in _BUILDERS:
        raise ValueError(f"estimator must be one of {list(ESTIMATORS)}, got {name!r}")
    cls, fixed, keys = _BUILDERS[name]
    return cls(**fixed, **{k: kwargs[k] for k in keys if kwargs.get(k) is not None})


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
        assert self.prob is not None  # __post_init__: exactly one of prob and period
        return bool(torch.rand((), generator=generator) < self.prob)
