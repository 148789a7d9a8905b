"""Item 2: the iteration-complexity exponents of fedgluon's single-machine LMO optimizers.

For a horizon K every method runs K steps of ``fedgluon.lmo.optim.Gluon`` (one client, the methods'
own estimators and LMO step) with the fixed-horizon radius and momentum its theorem prescribes,
and we record ``min_{k ≤ K} ‖∇f(X^k)‖_*`` (the full gradient's dual norm, :mod:`.problem`).

| method | estimator | radius t | momentum β (weighs the old value) | theory |
| --- | --- | --- | --- | --- |
| gluon | EMA, M⁰ = g⁰ | t₀·K^(−3/4) | 1 − K^(−1/2) | K^(−1/4) (Gluon, arXiv 2505.13416, Thm 2) |
| gluon-mvr | STORM, M⁰ = g⁰ | t₀·K^(−2/3) | 1 − K^(−2/3) | K^(−1/3) (Gluon-MVR, arXiv 2512.16598) |
| muon-mvr2 | Muon-MVR2 code form, γ = 0.025, clip | t₀·K^(−2/3) | 1 − K^(−2/3) | K^(−1/3) (arXiv 2509.15816) |
| gluon-sarah | SARAH/PAGE, refresh w.p. p = K^(−2/3) with a batch of min(N, b·K^(2/3)) | t₀·K^(−2/3) | — | K^(−1/3) |
| limuon | LiMuon option 2, rank 8 | t₀·K^(−2/3) | 1 − K^(−2/3) (LiMuon's β = K^(−2/3)) | K^(−1/3) (arXiv 2509.14562) |

Gluon's theorem is stated with the anytime schedule ``t_k = t(k+1)^(−3/4)``, ``β_k = 1 − (k+1)^(−1/2)``;
its fixed-horizon form above gives the same O(K^(−1/4)) bound (each term of the bound — Δ/(Kt),
Lt/(1−β), σ√(1−β) — is then of order K^(−1/4)). For the MVR family the same bound with
``t ∝ K^(−2/3)``, ``1−β ∝ K^(−2/3)`` makes Δ/(Kt), σ√(1−β), Lt/√(1−β) and σ/(K(1−β)) all
O(K^(−1/3)). LiMuon's theorem sets η = O(T^(−2/3)) and β = O(T^(−2/3)). For PAGE/SARAH (the core
paper's Gluon-SARAH is not public) the online PAGE choice is used: a large batch B ∝ K^(2/3) (capped
at the N samples, where the refresh is the exact gradient) and p = b/B-like ``K^(−2/3)``, so the
estimator's error ``√(1/p)·Lt`` is O(K^(−1/3)) at O(1) samples per step on average. The constants
(t₀, the factor 1 in front of every K power) are not given by the papers for this problem: every
method uses t₀ = 1 (``run.T0``); a pilot at K = 1,000 on a seed the sweep does not use
(``python -m experiments.rates.run --part pilot``) gave t₀ = 1 the lowest final loss over {0.3, 1, 3, 10} for
four methods and 10% above gluon's best (t₀ = 3). (The smallest min ‖∇f‖_* is no criterion here: at
t₀ = 10 the tanh units saturate and the loss rises to chance level on a plateau of small gradients.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from fedgluon.lmo.optim import Gluon

from .problem import digits, full_gradient, grad_dual_norm, make_geometry, make_model, noise_level

THEORY = {"gluon": -1 / 4, "gluon-mvr": -1 / 3, "muon-mvr2": -1 / 3, "gluon-sarah": -1 / 3, "limuon": -1 / 3}
METHODS = tuple(THEORY)
HORIZONS = (100, 300, 1000, 3000, 10000)
EVAL_POINTS = 250  # the metric is evaluated at most this many times per run (every ceil(K/250) steps)


@dataclass(frozen=True)
class Schedule:
    """A method's fixed-horizon constants for horizon K."""

    radius: float
    beta: float | None
    refresh_prob: float | None = None
    large_batch: int | None = None


def schedule(method: str, K: int, t0: float, batch: int, n: int) -> Schedule:
    """The radius and momentum of ``method`` at horizon ``K`` (module docstring's table)."""
    if method == "gluon":
        return Schedule(t0 * K ** -0.75, 1 - K ** -0.5)
    if method not in THEORY:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    t = t0 * K ** (-2 / 3)
    if method == "gluon-sarah":
        return Schedule(t, None, refresh_prob=K ** (-2 / 3), large_batch=min(n, math.ceil(batch * K ** (2 / 3))))
    return Schedule(t, 1 - K ** (-2 / 3))


def make_optimizer(method: str, model: torch.nn.Module, sch: Schedule, seed: int) -> Gluon:
    """``fedgluon.lmo.optim.Gluon`` configured for ``method`` with a constant radius ``sch.radius``."""
    geometry = make_geometry(model)
    common: dict[str, Any] = {"geometry": geometry, "schedule": "constant", "seed": seed}
    if method == "gluon":
        return Gluon(model, sch.radius, method="gluon", beta=sch.beta, init="grad", **common)
    if method == "gluon-mvr":
        return Gluon(model, sch.radius, method="gluon-mvr", beta=sch.beta, **common)
    if method == "muon-mvr2":
        return Gluon(model, sch.radius, method="muon-mvr2", beta=sch.beta, gamma=0.025, clip=True, **common)
    if method == "gluon-sarah":
        return Gluon(model, sch.radius, method="gluon-sarah", refresh_prob=sch.refresh_prob, **common)
    return Gluon(model, sch.radius, method="limuon", beta=sch.beta, rank=8, **common)


def run_one(method: str, K: int, seed: int, t0: float, batch: int = 32, hidden: int = 16) -> dict[str, Any]:
    """K steps of ``method`` from the seed's initial model; the min over evaluated k ≤ K of the metric."""
    torch.set_num_threads(1)
    x, y = digits()
    model = make_model(seed, hidden)
    sch = schedule(method, K, t0, batch, len(x))
    opt = make_optimizer(method, model, sch, seed)
    geometry = opt.geometry
    gen = torch.Generator().manual_seed(10_000 + seed)
    every = max(1, math.ceil(K / EVAL_POINTS))

    def metric() -> float:
        return grad_dual_norm(geometry, full_gradient(model, x, y))

    best = metric()
    first = best
    for k in range(K):
        idx = torch.randint(0, len(x), (batch,), generator=gen)

        def closure(idx=idx):
            opt.zero_grad()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            return loss

        def large(size=sch.large_batch):
            big = torch.randperm(len(x), generator=gen)[:size]
            opt.zero_grad()
            loss = F.cross_entropy(model(x[big]), y[big])
            loss.backward()
            return loss

        opt.step(closure, refresh_closure=large if sch.large_batch else None)
        if (k + 1) % every == 0 or k + 1 == K:
            value = metric()
            if not math.isfinite(value):
                best = float("inf")
                break
            best = min(best, value)
    with torch.no_grad():
        loss = float(F.cross_entropy(model(x), y))
    sigma = noise_level(model, x, y, geometry, batch, draws=16, seed=seed)
    return {"method": method, "K": K, "seed": seed, "t0": t0, "radius": sch.radius,
            "beta": sch.beta if sch.beta is not None else float("nan"),
            "refresh_prob": sch.refresh_prob if sch.refresh_prob is not None else float("nan"),
            "large_batch": sch.large_batch or 0, "batch": batch, "min_grad_dual_norm": best,
            "initial_grad_dual_norm": first, "final_loss": loss, "final_sigma": sigma, "eval_every": every}
