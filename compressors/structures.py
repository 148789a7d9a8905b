"""Structures: which numbers of a tensor travel (the table in :mod:`compressors.operators`).

Every structure encodes and decodes a block of B rows at once — row i one client's tensor, flattened —
and row i's result is a function of row i and its :class:`Context` (seed, state) alone, so a single
tensor is a block of one.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from compressors.bits import BitCount
from compressors.payload import DuplicateIndexError, IndexRangeError, MetaError
from compressors.selection import topk_rows_numpy
from compressors.sparse import SparseRows
from compressors.values import OWN, get_array
from fedgluon.core.linalg import randomized_svd
from fedgluon.core.rng import derive_seed
from fedgluon.core.text import shown

State = dict[str, Tensor]


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def matrix_dims(shape: tuple[int, ...]) -> tuple[int, int]:
    return shape[0], numel(shape[1:])


def index_dtype(d: int) -> type:
    """Smallest integer dtype holding indices 0..d-1."""
    for dt, top in ((np.uint8, 2 ** 8), (np.uint16, 2 ** 16), (np.int32, 2 ** 31)):
        if d <= top:
            return dt
    return np.int64


INDEX_DTYPES = (np.uint8, np.uint16, np.int32, np.uint32, np.int64)


class Context:
    """Per-call inputs: the layer's seed (from run seed, client, round, layer) and its state.

    Given ``seed_parts``, the seed is ``derive_seed(*seed_parts)`` computed on first use, so the
    deterministic structures (dense, top-k) with deterministic values never pay for it."""

    def __init__(self, seed: int = 0, state: State | None = None, *, seed_parts: tuple[int, ...] | None = None):
        self._seed, self._parts, self.state = seed, seed_parts, state

    @property
    def seed(self) -> int:
        if self._parts is not None:
            self._seed, self._parts = derive_seed(*self._parts), None
        return self._seed

    def generator(self, purpose: str) -> torch.Generator:
        return torch.Generator().manual_seed(derive_seed(self.seed, purpose))


class Structure(ABC):
    """Which numbers of a tensor travel. Every method works on a block of B rows, row i one client's
    tensor flattened; row i's result is a function of row i (and its :class:`Context`) alone."""

    name: str
    kind: str  # "exact" | "contractive" | "unbiased" | "biased"
    stateful = False
    draws = False  # whether encode reads its contexts' seeds
    array_keys: frozenset[str] = frozenset()
    meta_keys: frozenset[str] = frozenset()

    def active(self, shape: tuple[int, ...]) -> bool:
        """Whether this structure compresses ``shape`` (else the tensor travels dense)."""
        return True

    def alpha(self, shape: tuple[int, ...]) -> float | None:
        return None

    def omega(self, shape: tuple[int, ...]) -> float | None:
        return None

    @abstractmethod
    def n_values(self, shape: tuple[int, ...]) -> int: ...

    @abstractmethod
    def encode(self, X: Tensor, shape: tuple[int, ...], ctxs: Sequence[Context]
               ) -> tuple[Tensor, dict[str, np.ndarray], dict[str, list], list[State | None]]:
        """``X`` (B, d) → (values to encode (B, n), structure arrays (B, ·), per-row headers, new states)."""

    @abstractmethod
    def decode(self, values: Tensor, arrays: Mapping[str, Any], meta: Mapping[str, Any],
               shape: tuple[int, ...], layer: str) -> Tensor:
        """(B, n) decoded values and the rows' arrays and headers → the (B, *shape) tensors."""

    def bits(self, shape: tuple[int, ...]) -> BitCount:
        """The bits of what this structure adds to a row's values (indices, a seed; low-rank factors add
        none), a function of the shape alone (:meth:`ValueCodec.bits`)."""
        return BitCount()


class Dense(Structure):
    name, kind = "dense", "exact"

    def n_values(self, shape):
        return numel(shape)

    def encode(self, X, shape, ctxs):
        return X, {}, {}, [None] * len(X)

    def decode(self, values, arrays, meta, shape, layer):
        return values.reshape(len(values), *shape)


@dataclass
class _Sparse(Structure):
    ratio: float = 0.01
    min_k: int = 1

    def __post_init__(self) -> None:
        if not (0 < self.ratio <= 1):
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")
        if self.min_k < 1:
            raise ValueError(f"min_k must be >= 1, got {self.min_k}")

    def k(self, shape: tuple[int, ...]) -> int:
        d = numel(shape)
        return min(d, max(self.min_k, math.ceil(self.ratio * d)))

    def n_values(self, shape):
        return self.k(shape)

    def _scale(self, shape: tuple[int, ...]) -> float:
        return 1.0

    def _sent(self, X: Tensor, idx: Tensor, shape: tuple[int, ...], meta: dict[str, list], ctxs: Sequence[Context]
              ) -> tuple[Tensor, dict[str, np.ndarray], dict[str, list], list[State | None]]:
        """The values of ``X`` at the rows' indices ``idx`` (B, k), with the indices as the ``idx`` array when
        this structure sends them."""
        idx = idx.to(X.device)
        arrays: dict[str, np.ndarray] = (
            {"idx": idx.cpu().numpy().astype(index_dtype(numel(shape)))} if "idx" in self.array_keys else {})
        return torch.gather(X, 1, idx), arrays, meta, [None] * len(X)

    def _indices(self, arrays: Mapping[str, Any], meta: Mapping[str, Any], shape: tuple[int, ...],
                 layer: str) -> np.ndarray:
        """The validated indices the rows refer to, (B, k) int64, each row strictly increasing."""
        d, k = numel(shape), self.k(shape)
        idx = get_array(dict(arrays), "idx", layer, INDEX_DTYPES, k)
        wide = idx.astype(np.int64)
        if OWN.get():
            return wide
        steps = np.diff(wide, axis=1)
        increasing = bool((steps > 0).all())
        if k:  # the range check comes first; for increasing rows the ends are the extremes
            lo, hi = ((int(wide[:, 0].min()), int(wide[:, -1].max())) if increasing
                      else (int(wide.min()), int(wide.max())))
            if lo < 0 or hi >= d:
                raise IndexRangeError(layer, "idx", f"indices must lie in [0, {d}), got [{lo}, {hi}]")
        if not increasing:
            what = "duplicate" if (steps == 0).any() else "unsorted"
            raise DuplicateIndexError(layer, "idx", f"{what} indices (indices must be strictly increasing)")
        return wide

    def decode(self, values, arrays, meta, shape, layer):
        return self.decode_sparse(values, arrays, meta, shape, layer).dense()

    def decode_sparse(self, values: Tensor, arrays: Mapping[str, Any], meta: Mapping[str, Any],
                      shape: tuple[int, ...], layer: str) -> SparseRows:
        idx = torch.from_numpy(self._indices(arrays, meta, shape, layer))
        idx = idx if values.device.type == "cpu" else idx.to(values.device)
        scale = self._scale(shape)
        return SparseRows(idx, values * scale if scale != 1.0 else values, shape)

    def bits(self, shape):
        d, k = numel(shape), self.k(shape)
        return BitCount(n_indices=k, index_bits_log2=k * max(1, math.ceil(math.log2(d))),
                        coo_bits=64 * len(shape) * k, bitmask_bits=d)


def topk_indices(x: Tensor, k: int) -> Tensor:
    """Indices of the k largest |x| in increasing order (:func:`topk_rows` of one row)."""
    return topk_rows(x.reshape(1, -1), k)[0]


def topk_rows(X: Tensor, k: int) -> Tensor:
    """The indices of the k largest |x| of every row of ``X`` (B, d) in one call: (B, k) int64, each row
    increasing. On CPU ties at the k-th magnitude go to lower indices (:mod:`compressors.selection`), so
    row i is a function of ``X[i]`` alone; on GPU, torch.topk."""
    B, d = X.shape
    if k >= d:
        return torch.arange(d, device=X.device).expand(B, d)
    if X.is_cuda:
        return torch.topk(X.abs(), k, dim=1, sorted=False).indices.sort(dim=1).values
    return torch.from_numpy(topk_rows_numpy(X.detach().numpy(), k))


@dataclass
class TopK(_Sparse):
    name = "topk"
    kind = "contractive"
    array_keys = frozenset({"idx"})

    def alpha(self, shape):
        return self.k(shape) / numel(shape)

    def encode(self, X, shape, ctxs):
        return self._sent(X, topk_rows(X, self.k(shape)), shape, {}, ctxs)


def randk_indices(d: int, k: int, generator: torch.Generator) -> Tensor:
    """k distinct uniform indices of 0..d-1, sorted, from a CPU generator.

    For k ≤ d/4: the first k distinct values of an i.i.d. uniform sequence (a uniformly random
    k-subset, sequential sampling without replacement) in O(k log k); otherwise ``randperm``.
    """
    if 4 * k > d:
        return torch.randperm(d, generator=generator)[:k].sort().values
    found = torch.empty(0, dtype=torch.int64)
    order = torch.empty(0, dtype=torch.int64)
    drawn = 0
    while found.numel() < k:
        extra = torch.randint(0, d, (k - found.numel() + 64 + (k >> 5),), generator=generator)
        seq = torch.cat([found, extra])
        pos = torch.cat([order, torch.arange(drawn, drawn + extra.numel())])
        drawn += extra.numel()
        uniq, inverse = torch.unique(seq, return_inverse=True)
        first = torch.full((uniq.numel(),), torch.iinfo(torch.int64).max, dtype=torch.int64)
        first.scatter_reduce_(0, inverse, pos, reduce="amin")
        keep = torch.argsort(first)[:k]
        found, order = uniq[keep], first[keep]
    return found.sort().values


def _randk_rows(d: int, k: int, seeds: Sequence[int]) -> Tensor:
    """(B, k): row i the :func:`randk_indices` drawn by a generator seeded with ``seeds[i]``."""
    if not seeds:
        return torch.empty((0, k), dtype=torch.int64)
    return torch.stack([randk_indices(d, k, torch.Generator().manual_seed(s)) for s in seeds])


@dataclass
class RandK(_Sparse):
    name = "randk"
    kind = "unbiased"
    draws = True
    array_keys = frozenset({"idx"})

    def omega(self, shape):
        return numel(shape) / self.k(shape) - 1

    def _scale(self, shape):
        return numel(shape) / self.k(shape)

    def _seeds(self, ctxs: Sequence[Context]) -> list[int]:
        return [derive_seed(c.seed, "randk") for c in ctxs]

    def encode(self, X, shape, ctxs):
        return self._sent(X, _randk_rows(numel(shape), self.k(shape), self._seeds(ctxs)), shape, {}, ctxs)


@dataclass
class RandKSeeded(RandK):
    """Rand-k whose indices the server regenerates from a 63-bit seed sent in the header."""

    name = "randk_seeded"
    array_keys = frozenset()
    meta_keys = frozenset({"seed"})

    def encode(self, X, shape, ctxs):
        seeds = self._seeds(ctxs)
        return self._sent(X, _randk_rows(numel(shape), self.k(shape), seeds), shape, {"seed": seeds}, ctxs)

    def _indices(self, arrays, meta, shape, layer):
        seeds = meta.get("seed")
        for seed in seeds:
            if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not 0 <= int(seed) < 2 ** 63:
                raise MetaError(layer, "seed", f"must be an integer in [0, 2^63), got {shown(seed, 40)}")
        return _randk_rows(numel(shape), self.k(shape), [int(s) for s in seeds]).numpy()

    def bits(self, shape):
        return BitCount(seed_bits=64)


def balanced(P: Tensor, Q: Tensor) -> tuple[Tensor, Tensor]:
    """``(P D, Q D⁻¹)``, D diagonal, so that column j of both factors has norm ``√(‖P_j‖‖Q_j‖)``: the same
    product ``P Qᵀ`` from factors of one scale. The value codecs keep one scale per message (fp16's
    ``max|v|/2¹⁴``, int-b's ``max|v|``): with ``U·S`` beside a unit ``V`` the small factor was lost, all of it
    below fp16's range for a matrix of entries ~1e-20, and rounded to zero by int8 at ~1e-3."""
    a, b = torch.linalg.vector_norm(P, dim=0), torch.linalg.vector_norm(Q, dim=0)
    d = torch.where((a > 0) & (b > 0), b.sqrt() / a.sqrt(), torch.ones_like(a))
    return P * d, Q / d


@dataclass
class _LowRank(Structure):
    """Low-rank factors of the ``(shape[0], prod(shape[1:]))`` matrix of each row. The factorisations and
    products run row by row: batched SVD, QR and matmul need not equal the per-matrix calls bitwise."""

    rank: int = 2
    min_compression_rate: float = 2.0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")

    def r(self, shape: tuple[int, ...]) -> int:
        return min(self.rank, *matrix_dims(shape))

    def active(self, shape):
        if len(shape) < 2:
            return False
        m, n = matrix_dims(shape)
        return m * n / ((m + n) * self.r(shape)) >= self.min_compression_rate

    def n_values(self, shape):
        m, n = matrix_dims(shape)
        return (m + n) * self.r(shape)

    def _factors(self, M: Tensor, ctx: Context) -> tuple[Tensor, Tensor, State | None]:
        raise NotImplementedError

    def encode(self, X, shape, ctxs):
        values, states = [], []
        for x, ctx in zip(X, ctxs):
            P, Q, state = self._factors(x.reshape(matrix_dims(shape)), ctx)
            P, Q = balanced(P, Q)
            values.append(torch.cat([P.reshape(-1), Q.reshape(-1)]))
            states.append(state)
        out = torch.stack(values) if values else X.new_empty((0, self.n_values(shape)))
        return out, {}, {}, states

    def decode(self, values, arrays, meta, shape, layer):
        m, n = matrix_dims(shape)
        r = self.r(shape)
        rows = [(v[: m * r].reshape(m, r) @ v[m * r:].reshape(n, r).mT).reshape(shape) for v in values]
        return torch.stack(rows) if rows else values.new_empty((0, *shape))


@dataclass
class SVDLowRank(_LowRank):
    name = "svd"
    kind = "contractive"

    def alpha(self, shape):
        return self.r(shape) / min(matrix_dims(shape))

    def _factors(self, M, ctx):
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        r = self.r(tuple(M.shape))
        return U[:, :r] * S[:r], Vh[:r].mT, None


@dataclass
class RandomizedSVD(_LowRank):
    name = "rsvd"
    kind = "biased"
    draws = True
    oversample: int = 2

    def _factors(self, M, ctx):
        P, Q = randomized_svd(M, self.r(tuple(M.shape)), self.oversample, ctx.generator("sketch"))
        return P, Q, None


@dataclass
class PowerSGD(_LowRank):
    """One-shot PowerSGD (Vogels et al. 2019): ``P = orth(M Q)``, ``Q' = Mᵀ P``, send (P, Q') balanced
    (:func:`balanced`), decode ``P Q'ᵀ``. With ``warm_start`` the next call starts from the last Q' (kept
    in the client's compressor state, unbalanced), i.e. one subspace-iteration step per round."""

    name = "powersgd"
    kind = "biased"
    draws = True
    warm_start: bool = True

    @property
    def stateful(self) -> bool:  # type: ignore[override]  # follows warm_start; a class attribute elsewhere
        return self.warm_start

    def _factors(self, M, ctx):
        r = self.r(tuple(M.shape))
        Q = ctx.state.get("Q") if (self.warm_start and ctx.state) else None
        if Q is None or Q.shape != (M.shape[1], r):
            Q = torch.randn(M.shape[1], r, generator=ctx.generator("powersgd"), dtype=torch.float64)
            Q = Q.to(M.device, M.dtype)
        P, _ = torch.linalg.qr(M @ Q)
        Q_new = M.mT @ P
        return P, Q_new, ({"Q": Q_new} if self.warm_start else None)
