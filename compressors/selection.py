"""Exact top-k selection of every row of a (B, d) array, on the CPU, in a few vectorised passes.

Top-k keeps, per row, the k entries of largest magnitude; ties at the k-th magnitude are broken
toward *lower indices*, so the selection is a function of the row alone (the same row gives the
same indices in a block of any size, and in the per-client path, which calls this with B = 1).

A full partition (``np.argpartition``) costs ~15 ns per element here (memory-bound introselect).
Instead, per row:

1. a threshold ``t_low`` that at least k entries reach: the m-th largest of a fixed sample of
   ``s = 100·d/k`` positions, with m three standard deviations above the ~100 sampled entries
   expected in the top k (rows where fewer than k reach it — unlucky samples — get the exact k-th
   magnitude instead; so do small rows and k > d/8, where sampling does not pay);
2. the candidates ``|x| ≥ t_low`` (one comparison pass and one ``nonzero``), about 1.3·k per row;
3. the exact k-th magnitude ``t`` among the candidates (a partition of ~1.3·k values), then every
   candidate above ``t`` and the lowest-index candidates equal to ``t`` until there are k. Where the
   threshold of step 1 is already exact (small rows), this last step runs on |X| for all rows at
   once; on sampled rows it runs row by row (measured faster there than padding the candidates).

The sample only decides speed, never the result. NaN magnitudes count as +inf (selected first, as
a partition orders them), so a non-finite payload is still produced and rejected where it is checked.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

MIN_SAMPLED_D = 4096  # below this (or for k > d/8) the threshold is the exact k-th magnitude


@lru_cache(maxsize=64)
def _sample_positions(d: int, s: int) -> np.ndarray:
    """``s`` distinct positions of ``0..d-1``, fixed per (d, s) (they only affect speed)."""
    return np.sort(np.random.default_rng(d).choice(d, s, replace=False))


def _exact_kth(A: np.ndarray, k: int) -> np.ndarray:
    """The k-th largest value of every row of A."""
    d = A.shape[1]
    return np.partition(A, d - k, axis=1)[:, d - k]


def _sampled(d: int, k: int) -> int | None:
    """The sample size step 1 uses for rows of d with k kept, or None where the threshold is exact."""
    s = max(2048, math.ceil(100 * d / k))
    return None if d < MIN_SAMPLED_D or 8 * k > d or 4 * s > d else s


def _low_threshold(X: np.ndarray, k: int, s: int) -> np.ndarray:
    """Per row, a magnitude that k entries reach with high probability (step 1 of the module doc): the
    sample holds ~100 expected top-k entries (s = 100·d/k), and the threshold sits 3σ beyond them."""
    B, d = X.shape
    p = k / d
    m = min(s, math.ceil(s * p + 3 * math.sqrt(s * p)) + 1)
    return np.partition(np.abs(X[:, _sample_positions(d, s)]), s - m, axis=1)[:, s - m]


def _select(M: np.ndarray, t: np.ndarray, k: int) -> np.ndarray:
    """Per row of the magnitudes M (B, c), given its exact k-th largest value t: the columns of the
    entries above t and of the lowest-column entries equal to t, k in all, increasing."""
    B = M.shape[0]
    above = M > t[:, None]
    keep = above | (M == t[:, None])
    surplus = np.count_nonzero(keep, axis=1) - k
    for i in np.flatnonzero(surplus).tolist():  # ties at t (rare but for integer-like data): drop the last
        tied = np.flatnonzero(keep[i] & ~above[i])
        keep[i, tied[len(tied) - surplus[i]:]] = False
    return np.nonzero(keep)[1].reshape(B, k)  # row-major: increasing within each row


def topk_rows_numpy(X: np.ndarray, k: int) -> np.ndarray:
    """(B, k) int64 indices of the k largest |X[i]| of every row, increasing within each row (module
    doc); requires ``0 < k < d``."""
    B, d = X.shape
    if not np.isfinite(X).all():
        X = np.where(np.isnan(X), np.inf, X)
    s = _sampled(d, k)
    if s is None:
        A = np.abs(X)
        return _select(A, _exact_kth(A, k), k).astype(np.int64, copy=False)
    t_low = _low_threshold(X, k, s)
    mask = (X >= t_low[:, None]) | (X <= -t_low[:, None])  # |x| >= t_low, without a (B, d) |X|
    counts = np.count_nonzero(mask, axis=1)
    short = counts < k
    if short.any():  # unlucky samples: the exact k-th magnitude for those rows
        t_low[short] = _exact_kth(np.abs(X[short]), k)
        mask[short] = np.abs(X[short]) >= t_low[short, None]
        counts[short] = np.count_nonzero(mask[short], axis=1)
    flat = np.flatnonzero(mask)  # row-major: columns increase within a row
    magnitudes = np.abs(X.reshape(-1)[flat])
    out = np.empty((B, k), dtype=np.int64)
    end = 0
    for i, c in enumerate(counts.tolist()):  # a loop over rows, each step vectorised over ~1.3 k candidates
        start, end = end, end + c
        seg = magnitudes[start:end]
        t = np.partition(seg, c - k)[c - k]  # the exact k-th magnitude
        keep = seg >= t
        surplus = int(np.count_nonzero(keep)) - k
        if surplus:  # ties at t: drop the highest-index ones
            tied = np.flatnonzero(seg == t)
            keep[tied[len(tied) - surplus:]] = False
        out[i] = flat[start:end][keep] - i * d
    return out
