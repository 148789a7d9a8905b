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
Magnitudes are compared as integer keys (:func:`magnitude_keys`: fp32/fp64 bits without the sign,
ordered as |x|), and rows are taken in cache-sized chunks.
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


def _low_threshold(A: np.ndarray, k: int, s: int) -> np.ndarray:
    """Per row of the magnitude keys A, a key that k entries reach with high probability (step 1 of the
    module doc): the sample holds ~100 expected top-k entries (s = 100·d/k), and the threshold sits 3σ
    beyond them."""
    B, d = A.shape
    p = k / d
    m = min(s, math.ceil(s * p + 3 * math.sqrt(s * p)) + 1)
    return np.partition(A[:, _sample_positions(d, s)], s - m, axis=1)[:, s - m]


def _drop_tied(keep: np.ndarray, tied: np.ndarray, surplus: int) -> None:
    """Ties at the k-th magnitude: un-keep the ``surplus`` highest-index entries of ``tied``."""
    keep[tied[len(tied) - surplus:]] = False


def _select(M: np.ndarray, t: np.ndarray, k: int) -> np.ndarray:
    """Per row of the magnitude keys M (B, c), given its exact k-th largest value t: the columns of the
    entries above t and of the lowest-column entries equal to t, k in all, increasing."""
    B = M.shape[0]
    above = M > t[:, None]
    keep = above | (M == t[:, None])
    surplus = np.count_nonzero(keep, axis=1) - k
    for i in np.flatnonzero(surplus).tolist():  # ties at t (rare but for integer-like data)
        _drop_tied(keep[i], np.flatnonzero(keep[i] & ~above[i]), int(surplus[i]))
    return np.nonzero(keep)[1].reshape(B, k)  # row-major: increasing within each row


# float dtype -> (the integer dtype of its width, the mask of every bit but the sign)
_KEYS = {np.dtype(np.float32): (np.int32, 0x7FFF_FFFF), np.dtype(np.float64): (np.int64, 0x7FFF_FFFF_FFFF_FFFF)}


def magnitude_keys(X: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Keys ordered as ``|X|`` and equal exactly where ``|X|`` is, for X without NaN: for fp32 / fp64 the
    bit pattern without its sign bit, as an integer (IEEE-754 orders non-negative floats, +inf included,
    as their bit patterns; ±0 both give 0) — one integer pass, no float ``abs``; other dtypes ``|X|``.
    Written into ``out`` when given (of the keys' dtype and X's shape)."""
    spec = _KEYS.get(X.dtype)
    if spec is None:
        return np.abs(X, out=out)
    itype, sign_off = spec
    return np.bitwise_and(X.view(itype), sign_off, out=out)


def _without_nan(X: np.ndarray) -> np.ndarray:
    """X with its NaNs replaced by +inf (NaN magnitudes count as +inf); X itself when it has none (a
    finite sum proves there are none, in one reduction)."""
    if np.isfinite(X.sum()) or not np.isnan(X).any():
        return X
    return np.where(np.isnan(X), np.inf, X)


CHUNK_BYTES = 1 << 21  # rows are selected in chunks of about this size, so each pass after the first reads the cache


def topk_rows_numpy(X: np.ndarray, k: int) -> np.ndarray:
    """(B, k) int64 indices of the k largest |X[i]| of every row, increasing within each row (module
    doc); requires ``0 < k < d``. Rows are taken in chunks of about ``CHUNK_BYTES``; the result does not
    depend on the chunking (each row's selection is a function of the row)."""
    B, d = X.shape
    X = np.ascontiguousarray(X)
    out = np.empty((B, k), dtype=np.int64)
    _select_rows(X, k, out)
    return out


def _select_rows(X: np.ndarray, k: int, out: np.ndarray) -> None:
    """The selection of every row of X (B, d) into out (B, k), in chunks of about ``CHUNK_BYTES``,
    their keys and candidate masks in buffers reused from chunk to chunk (fresh pages cost more than
    the pass that fills them)."""
    B, d = X.shape
    s = _sampled(d, k)
    per = min(B, max(1, CHUNK_BYTES // max(1, d * X.itemsize)))
    keys = np.empty((per, d), dtype=magnitude_keys(X[:1, :1]).dtype)
    mask = np.empty((per, d), dtype=bool) if s is not None else None
    for start in range(0, B, per):
        rows = X[start:start + per]
        A = magnitude_keys(_without_nan(rows), out=keys[:len(rows)])
        out[start:start + per] = (_select(A, _exact_kth(A, k), k) if s is None
                                  else _select_sampled(A, k, s, mask[:len(rows)]))


def _select_sampled(A: np.ndarray, k: int, s: int, mask: np.ndarray | None = None) -> np.ndarray:
    """Steps 1–3 of the module doc on the magnitude keys A (B, d); ``mask``: a (B, d) bool buffer."""
    B, d = A.shape
    t_low = _low_threshold(A, k, s)
    flat = np.flatnonzero(np.greater_equal(A, t_low[:, None], out=mask))  # row-major: columns increase in a row
    ends = np.searchsorted(flat, np.arange(1, B + 1) * d)  # each row's end in flat (cheaper than counting)
    counts = np.diff(ends, prepend=0)
    short = np.flatnonzero(counts < k)
    if short.size:  # unlucky samples: the exact k-th magnitude for those rows
        t_low[short] = _exact_kth(A[short], k)
        flat = np.flatnonzero(np.greater_equal(A, t_low[:, None], out=mask))
        counts = np.diff(np.searchsorted(flat, np.arange(1, B + 1) * d), prepend=0)
    keys = A.reshape(-1)[flat]
    out = np.empty((B, k), dtype=np.int64)
    end = 0
    for i, c in enumerate(counts.tolist()):  # a loop over rows, each step vectorised over ~1.3 k candidates
        start, end = end, end + c
        seg = keys[start:end]
        t = np.partition(seg, c - k)[c - k]  # the exact k-th magnitude
        keep = seg >= t
        surplus = int(np.count_nonzero(keep)) - k
        if surplus:
            _drop_tied(keep, np.flatnonzero(seg == t), surplus)
        out[i] = flat[start:end][keep] - i * d
    return out
