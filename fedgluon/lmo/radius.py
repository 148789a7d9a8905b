"""Radius rules ``t_i^k`` for the layer-wise LMO step ``X_i ← X_i + t_i^k lmo_i(G_i)`` (docs/DESIGN.md §3 "Radius").

* :class:`Scheduled` — ``t_i^k = γ_k · ρ_i`` (γ_k from :func:`make_schedule`; Gluon Thm 2: ``γ (k+1)^{−3/4}``).
* :class:`GluonAdaptive` — ``t_i^k = ‖G_i‖_* / (L0_i + L1_i ‖G_i‖_*)`` (Gluon Thm 1, docs/ALGORITHMS.md §2.2).

:func:`fit_l0_l1` and :class:`SmoothnessTracker` fit ``(L0_i, L1_i)`` along a trajectory
(``L̂_i[k] = ‖g_i^{k+1} − g_i^k‖_* / ‖X_i^{k+1} − X_i^k‖``, docs/ALGORITHMS.md §2.3).
"""

from __future__ import annotations

import fnmatch
import math
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor

from fedgluon.lmo.geometry import Geometry


def _positive(name: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive finite number, got {value}")


@dataclass(frozen=True)
class Constant:
    """γ_k = lr."""

    lr: float

    def __post_init__(self) -> None:
        _positive("lr", self.lr)

    def __call__(self, k: int) -> float:
        return self.lr


@dataclass(frozen=True)
class Polynomial:
    """γ_k = lr · (k+1)^(−power) (Gluon stochastic theory: power 3/4; VR methods 1/2 or 2/3)."""

    lr: float
    power: float = 0.75

    def __post_init__(self) -> None:
        _positive("lr", self.lr)
        if self.power < 0:
            raise ValueError(f"power must be >= 0, got {self.power}")

    def __call__(self, k: int) -> float:
        return self.lr * (k + 1) ** (-self.power)


@dataclass(frozen=True)
class Warmup:
    """Linear warmup over ``warmup`` steps to lr, then cosine or linear decay to
    ``final_fraction · lr`` at step ``total`` (held there afterwards)."""

    lr: float
    total: int
    warmup: int = 0
    decay: str = "cosine"
    final_fraction: float = 0.0

    def __post_init__(self) -> None:
        _positive("lr", self.lr)
        if self.decay not in ("cosine", "linear"):
            raise ValueError(f"decay must be one of ['cosine', 'linear'], got {self.decay!r}")
        if not 0 <= self.warmup < self.total:
            raise ValueError(f"need 0 <= warmup < total, got warmup={self.warmup}, total={self.total}")
        if not 0 <= self.final_fraction <= 1:
            raise ValueError(f"final_fraction must be in [0, 1], got {self.final_fraction}")

    def __call__(self, k: int) -> float:
        if k < self.warmup:
            return self.lr * (k + 1) / self.warmup
        progress = min(1.0, (k - self.warmup) / max(1, self.total - self.warmup))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if self.decay == "cosine" else 1 - progress
        return self.lr * (self.final_fraction + (1 - self.final_fraction) * shape)


SCHEDULES = ("constant", "polynomial", "warmup_cosine", "warmup_linear")


def make_schedule(name: str, lr: float, *, power: float = 0.75, total: int | None = None,
                  warmup: int = 0, final_fraction: float = 0.0) -> Callable[[int], float]:
    """A scalar schedule by name (see :data:`SCHEDULES`)."""
    if name == "constant":
        return Constant(lr)
    if name == "polynomial":
        return Polynomial(lr, power)
    if name in ("warmup_cosine", "warmup_linear"):
        if total is None:
            raise ValueError(f"schedule {name!r} needs total (the number of steps)")
        return Warmup(lr, total, warmup, name.split("_")[1], final_fraction)
    raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {name!r}")


@dataclass(frozen=True)
class Scheduled:
    """``t_i^k = schedule(k) · ρ_i``."""

    schedule: Callable[[int], float]
    needs_dual_norms = False

    def radii(self, k: int, geometry: Geometry, dual_norms: Mapping[str, Tensor] | None = None) -> dict[str, float]:
        g = self.schedule(k)
        return {p.name: g * p.radius for p in geometry}

    def base(self, k: int) -> float:
        return float(self.schedule(k))


def _per_param(value: float | Mapping[str, float], geometry: Geometry, what: str) -> dict[str, float]:
    """Expand a float, or a mapping of role names / fnmatch patterns, to one value per parameter."""
    out = {}
    for p in geometry:
        if isinstance(value, Mapping):
            hit = value.get(p.role)
            for pattern, v in value.items():
                if fnmatch.fnmatchcase(p.name, pattern):
                    hit = v
            if hit is None:
                raise ValueError(f"{what} has no value for parameter {p.name!r} (role {p.role!r}); "
                                 f"give a float or a mapping with its role or a pattern")
            out[p.name] = float(hit)
        else:
            out[p.name] = float(value)
    return out


@dataclass(frozen=True)
class GluonAdaptive:
    """``t_i = ‖G_i‖_* / (L0_i + L1_i ‖G_i‖_*)``, capped at ``max_radius`` when given.

    ``L0``/``L1`` are floats or mappings from roles / name patterns to floats. With ``L0 = 0`` the
    radius is ``1/L1_i`` whenever G_i ≠ 0 (the fitted regime, docs/ALGORITHMS.md §2.4).
    """

    L0: float | Mapping[str, float] = 0.0
    L1: float | Mapping[str, float] = 1.0
    max_radius: float | None = None
    needs_dual_norms = True

    def radii(self, k: int, geometry: Geometry, dual_norms: Mapping[str, Tensor] | None = None) -> dict[str, float]:
        if dual_norms is None:
            raise ValueError("GluonAdaptive needs the dual norms of the estimate")
        L0 = _per_param(self.L0, geometry, "L0")
        L1 = _per_param(self.L1, geometry, "L1")
        out = {}
        for name, L1_i in L1.items():
            if L0[name] < 0 or L1_i < 0 or L0[name] + L1_i == 0:
                raise ValueError(f"need L0 >= 0, L1 >= 0 and not both 0 for {name!r}")
            d = float(dual_norms[name])
            t = d / (L0[name] + L1_i * d) if d > 0 else 0.0
            out[name] = min(t, self.max_radius) if self.max_radius is not None else t
        return out

    def base(self, k: int) -> float:
        return 1.0


def make_radius_rule(lr: float, schedule: str | Callable[[int], float] = "constant",
                     adaptive: Mapping[str, Any] | None = None, **schedule_options: Any) -> Scheduled | GluonAdaptive:
    """The radius rule of a config: Gluon's adaptive rule when ``adaptive`` (``{"L0": .., "L1": ..}``) is
    given, else ``schedule`` (a name from :data:`SCHEDULES` with its options, or a callable) times ρ_i."""
    if adaptive is not None:
        return GluonAdaptive(**adaptive)
    return Scheduled(make_schedule(schedule, lr, **schedule_options) if isinstance(schedule, str) else schedule)


def fit_l0_l1(lhat: np.ndarray, grad_dual: np.ndarray, lam: float = 0.0) -> tuple[float, float]:
    """Fit ``L̂ ≈ L0 + L1·‖g‖_*`` with L0, L1 ≥ 0 (Gluon Eq. 10/30, docs/ALGORITHMS.md §2.3)::

        min Σ_k r_k² + λ Σ_k max(0, r_k)²,   r_k = L̂_k − (L0 + L1 ‖g_{k+1}‖_*)

    Convex and piecewise quadratic; solved exactly by iteratively re-weighted non-negative
    least squares (weight 1+λ where the model underestimates), which terminates once the sign
    pattern of the residuals repeats.
    """
    from scipy.optimize import nnls

    lhat = np.asarray(lhat, dtype=np.float64)
    g = np.asarray(grad_dual, dtype=np.float64)
    ok = np.isfinite(lhat) & np.isfinite(g)
    lhat, g = lhat[ok], g[ok]
    if lhat.size < 2:
        raise ValueError("fit_l0_l1 needs at least two finite (L̂, ‖g‖_*) pairs")
    A = np.stack([np.ones_like(g), g], axis=1)
    w = np.ones_like(lhat)
    seen = set()
    while True:
        sw = np.sqrt(w)
        coef, _ = nnls(A * sw[:, None], lhat * sw)
        under = (lhat - A @ coef) > 0
        key = under.tobytes()
        if key in seen:
            return float(coef[0]), float(coef[1])
        seen.add(key)
        w = np.where(under, 1.0 + lam, 1.0)


@dataclass
class SmoothnessTracker:
    """Collects ``L̂_i[k]`` and ``‖g_i^{k+1}‖_*`` along a trajectory and fits ``(L0_i, L1_i)``.

    Call :meth:`record` after each step with the parameters and the (stochastic) gradient there.
    """

    geometry: Geometry
    lhat: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    gnorm: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    _last: tuple[dict[str, Tensor], dict[str, Tensor]] | None = None

    def record(self, params: Mapping[str, Tensor], grads: Mapping[str, Tensor]) -> None:
        params = {k: v.detach().clone() for k, v in params.items()}
        grads = {k: v.detach().clone() for k, v in grads.items()}
        if self._last is not None:
            x0, g0 = self._last
            dx = self.geometry.norms({k: params[k] - x0[k] for k in params})
            dg = self.geometry.dual_norms({k: grads[k] - g0[k] for k in grads})
            gd = self.geometry.dual_norms(grads)
            for k in params:
                if float(dx[k]) > 0:
                    self.lhat[k].append(float(dg[k]) / float(dx[k]))
                    self.gnorm[k].append(float(gd[k]))
        self._last = (params, grads)

    def fit(self, lam: float = 0.0) -> dict[str, tuple[float, float]]:
        return {k: fit_l0_l1(np.array(self.lhat[k]), np.array(self.gnorm[k]), lam) for k in self.lhat}
