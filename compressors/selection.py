"""Exact top-k selection of every row of a (B, d) array, on the CPU, in a few vectorised passes.

Top-k keeps, per row, the k entries of largest magnitude; ties at the k-th magnitude are broken
toward *lower indices*, so the selection is a function of the row alone (the same row gives the
same indices in a block of any size, and in the per-client path, which calls this with B = 1).
NaN ranks above +inf, as ``torch.topk`` ranks it (the GPU path), so a non-finite row still gives
a payload, rejected where values are checked.

Magnitudes are compared as integer keys (:func:`magnitude_keys`: fp16/fp32/fp64 bits without the
sign, ordered as |x|, NaN above +inf), and rows are taken in cache-sized chunks. Per row, the exact
k-th largest key ``t`` comes from a partition, then one comparison pass ``key ≥ t`` and one
``flatnonzero`` over the block give the k columns (the lowest-index entries equal to ``t`` where
there are ties). Long rows (k ≤ d/8, and a sample of at most d/4) may skip the full partition:

1. a threshold ``t_low`` that at least k entries reach: the m-th largest of a fixed sample of
   ``s = 100·d/k`` positions, with m three standard deviations above the ~100 sampled entries
   expected in the top k (rows where fewer than k reach it — unlucky samples — get the exact k-th
   magnitude instead);
2. the candidates ``key ≥ t_low`` (one comparison pass and one ``nonzero``), about 1.3·k per row;
3. the exact k-th magnitude ``t`` among the candidates (a partition of ~1.3·k values, row by row),
   then, for the whole block at once, every candidate above ``t`` and the lowest-index candidates
   equal to ``t`` until there are k.

Which of the two is faster depends on the machine's partition: with a fast (SIMD) partition the exact
path wins for rows up to tens of thousands of entries, with a slow one sampling wins from a few
thousand (figures: BENCHMARKS.md, "Process tuning"). So rows of d ≥ ``MIN_SAMPLED_D`` are always
sampled, and for shorter rows that may be, :func:`_plan` times both paths once per (d, k, dtype) and
process on a chunk of random rows and keeps the faster. The plan only decides speed, never the result.
"""

from __future__ import annotations

import math
import threading
import time
from functools import lru_cache

import numpy as np

CHUNK_BYTES = 1 << 21  # rows are selected in chunks of about this size, so each pass after the first reads the cache
MIN_SAMPLED_D = 1 << 16  # rows this long are sampled where they may be; shorter ones as :func:`_plan` finds faster


_scratch = threading.local()


def scratch(name: str, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """A work buffer of ``shape`` and ``dtype``, the same memory on every call with this ``name`` in this
    thread (grown when too small), so its pages are touched once per process rather than once per call:
    freed buffers of a few MB go back to the OS (glibc trims the heap), and fresh pages cost more than
    the pass that fills them (BENCHMARKS.md, "Process tuning"). Its contents are the caller's only until the next call
    with the same name: never return it. Buffers live as long as their thread and never shrink: the
    largest chunk seen (≈ ``CHUNK_BYTES`` for rows that fit it, one row's keys and mask otherwise — 50 MB
    after a 10M-entry row)."""
    bufs = _scratch.__dict__.setdefault("bufs", {})
    dtype = np.dtype(dtype)
    need = math.prod(shape) * dtype.itemsize
    buf = bufs.get(name)
    if buf is None or buf.nbytes < need:
        buf = bufs[name] = np.empty(need, dtype=np.uint8)
    return buf[:need].view(dtype).reshape(shape)


@lru_cache(maxsize=64)
def _sample_positions(d: int, s: int) -> np.ndarray:
    """``s`` distinct positions of ``0..d-1``, fixed per (d, s) (they only affect speed)."""
    return np.sort(np.random.default_rng(d).choice(d, s, replace=False))


def _exact_kth(A: np.ndarray, k: int, work: np.ndarray | None = None) -> np.ndarray:
    """The k-th largest value of every row of A (partitioned in ``work``, a buffer of A's shape and dtype,
    when given: fresh pages cost more than the partition)."""
    d = A.shape[1]
    if work is None:
        return np.partition(A, d - k, axis=1)[:, d - k]
    np.copyto(work, A)
    work.partition(d - k, axis=1)
    return work[:, d - k].copy()


def _sample_size(d: int, k: int) -> int | None:
    """The sample size step 1 would use for rows of d with k kept, or None where rows may not be sampled
    (k > d/8, or a sample of more than d/4)."""
    s = max(2048, math.ceil(100 * d / k))
    return None if 8 * k > d or 4 * s > d else s


@lru_cache(maxsize=256)
def _plan(d: int, k: int, dtype: np.dtype) -> int | None:
    """The sample size for rows of d with k kept, or None for the exact threshold: sampled where rows may
    be and d ≥ ``MIN_SAMPLED_D``; for shorter rows that may be, whichever of the two selected a quarter
    chunk of random rows of ``dtype`` faster (best of 3 each), timed the first time this process asks
    (some ms, once per shape). The selection does not depend on the plan."""
    s = _sample_size(d, k)
    if s is None or d >= MIN_SAMPLED_D:
        return s
    per = max(1, CHUNK_BYTES // 4 // (d * dtype.itemsize))
    rows = np.random.default_rng(d).standard_normal((per, d)).astype(dtype)
    out = np.empty((per, k), dtype=np.int64)

    def best(plan: int | None) -> float:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            _select_rows(rows, k, out, plan)
            times.append(time.perf_counter() - start)
        return min(times)

    return s if best(s) < best(None) else None


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


def _select(M: np.ndarray, t: np.ndarray, k: int, mask: np.ndarray | None = None) -> np.ndarray:
    """Per row of the magnitude keys M (B, c), given its exact k-th largest value t: the columns of the
    entries above t and of the lowest-column entries equal to t, k in all, increasing (``mask``: a (B, c)
    bool buffer)."""
    B, c = M.shape
    keep = np.greater_equal(M, t[:, None], out=mask)
    surplus = np.count_nonzero(keep, axis=1) - k
    for i in np.flatnonzero(surplus).tolist():  # ties at t (rare but for integer-like data)
        _drop_tied(keep[i], np.flatnonzero(M[i] == t[i]), int(surplus[i]))
    # one flat nonzero (row-major: increasing within each row; cheaper than a 2-D nonzero)
    return np.flatnonzero(keep).reshape(B, k) - np.arange(0, B * c, c)[:, None]


# float dtype -> (the integer dtype of its width, the mask of every bit but the sign)
_KEYS = {np.dtype(np.float16): (np.int16, 0x7FFF), np.dtype(np.float32): (np.int32, 0x7FFF_FFFF),
         np.dtype(np.float64): (np.int64, 0x7FFF_FFFF_FFFF_FFFF)}


def magnitude_keys(X: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Keys ordered as ``|X|``, equal exactly where ``|X|`` is, and NaN above +inf: for fp16 / fp32 / fp64
    the bit pattern without its sign bit, as an integer (IEEE-754 orders non-negative floats, +inf
    included, as their bit patterns, and every NaN's pattern lies above +inf's; ±0 both give 0) — one
    integer pass, no float ``abs``; other (integer) dtypes ``|X|``. Written into ``out`` when given (of
    the keys' dtype and X's shape)."""
    spec = _KEYS.get(X.dtype)
    if spec is None:
        return np.abs(X, out=out)
    itype, sign_off = spec
    return np.bitwise_and(X.view(itype), sign_off, out=out)


def topk_rows_numpy(X: np.ndarray, k: int) -> np.ndarray:
    """(B, k) int64 indices of the k largest |X[i]| of every row, increasing within each row (module
    doc); requires ``0 < k < d``. Rows are taken in chunks of about ``CHUNK_BYTES``; the result depends
    neither on the chunking nor on the plan (each row's selection is a function of the row)."""
    B, d = X.shape
    X = np.ascontiguousarray(X)
    out = np.empty((B, k), dtype=np.int64)
    _select_rows(X, k, out, _plan(d, k, X.dtype))
    return out


def _select_rows(X: np.ndarray, k: int, out: np.ndarray, s: int | None) -> None:
    """The selection of every row of X (B, d) into out (B, k), sampled from ``s`` positions or, for None,
    by the exact threshold, in chunks of about ``CHUNK_BYTES``, their keys, partitions and masks in
    :func:`scratch` buffers."""
    B, d = X.shape
    per = min(B, max(1, CHUNK_BYTES // max(1, d * X.itemsize)))
    keys = scratch("keys", (per, d), magnitude_keys(X[:1, :1]).dtype)
    work = scratch("work", (per, d), keys.dtype) if s is None else None
    mask = scratch("mask", (per, d), bool)
    for start in range(0, B, per):
        rows = X[start:start + per]
        n = len(rows)
        A = magnitude_keys(rows, out=keys[:n])
        if s is None:
            assert work is not None  # allocated above for the exact threshold
            out[start:start + n] = _select(A, _exact_kth(A, k, work[:n]), k, mask[:n])
        else:
            out[start:start + n] = _select_sampled(A, k, s, mask[:n])


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
    return _select_candidates(A.reshape(-1)[flat], flat, counts, d, k)


def _select_candidates(keys: np.ndarray, flat: np.ndarray, counts: np.ndarray, d: int, k: int) -> np.ndarray:
    """Step 3 of the module doc: from the candidates' keys, flat positions (row-major, so increasing
    within a row) and per-row counts (each ≥ k), each row's exact k-th magnitude ``t`` (a partition of
    its candidates, row by row), then for all rows at once the candidates above ``t``
    and the lowest-column ones equal to it, k per row."""
    B = len(counts)
    ends = np.cumsum(counts)
    t = np.empty(B, dtype=keys.dtype)
    for i, (end, c) in enumerate(zip(ends.tolist(), counts.tolist())):
        t[i] = np.partition(keys[end - c:end], c - k)[c - k]
    keep = keys >= np.repeat(t, counts)
    surplus = np.add.reduceat(keep, ends - counts, dtype=np.int64) - k
    for i in np.flatnonzero(surplus).tolist():  # ties at t (rare but for integer-like data)
        seg = slice(int(ends[i] - counts[i]), int(ends[i]))
        _drop_tied(keep[seg], np.flatnonzero(keys[seg] == t[i]), int(surplus[i]))
    return flat[keep].reshape(B, k) - np.arange(0, B * d, d)[:, None]
