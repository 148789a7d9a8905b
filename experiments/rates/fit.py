"""Exponent fits on log–log axes with confidence intervals from the seeds.

``y(K) ≈ C·K^s``: the slope ``s`` of ``log y`` against ``log K`` by ordinary least squares.

* :func:`fit_exponent` — the point estimate is the slope through the seed means ``ȳ(K)``; its 95%
  interval is a percentile bootstrap over seeds (resample the seeds with replacement, recompute the
  means and the slope). A per-seed interval (slope of each seed, mean ± t₀.₉₇₅,ₙ₋₁·sd/√n) is
  returned beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class ExponentFit:
    slope: float  # through the seed means
    lo: float  # 95% bootstrap interval over seeds
    hi: float
    seed_mean: float  # mean of the per-seed slopes
    seed_lo: float  # 95% t-interval of the per-seed slopes
    seed_hi: float
    seeds: int


def slope(x: np.ndarray, y: np.ndarray) -> float:
    """OLS slope of ``log y`` on ``log x``."""
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def fit_exponent(horizons, values, *, resamples: int = 4000, seed: int = 0) -> ExponentFit:
    """Fit ``values[s, j] ≈ C·horizons[j]^slope`` (seeds s along axis 0); see the module docstring."""
    K = np.asarray(horizons, dtype=np.float64)
    Y = np.asarray(values, dtype=np.float64)
    if Y.ndim != 2 or Y.shape[1] != K.size or K.size < 2:
        raise ValueError(f"values must be seeds × horizons with >= 2 horizons, got {Y.shape} for {K.size} horizons")
    if not np.all(np.isfinite(Y)) or np.any(Y <= 0):
        raise ValueError("values must be finite and positive to fit on log-log axes")
    n = Y.shape[0]
    point = slope(K, Y.mean(0))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n, size=(resamples, n))
    boot = np.array([slope(K, Y[p].mean(0)) for p in picks])
    per_seed = np.array([slope(K, row) for row in Y])
    m = float(per_seed.mean())
    if n > 1:
        half = float(stats.t.ppf(0.975, n - 1) * per_seed.std(ddof=1) / np.sqrt(n))
    else:
        half = float("nan")
    return ExponentFit(point, float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5)), m, m - half,
                       m + half, n)
