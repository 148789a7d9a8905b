"""Compression operators = a *structure* (which numbers travel) ∘ a *value codec* (how they travel).

Structures, applied per tensor (per layer; ratios give ``k_i = clamp(⌈ratio·d_i⌉, min_k, d_i)``):

| structure     | sends                                        | kind                 | constant |
| ------------- | -------------------------------------------- | -------------------- | -------- |
| dense         | all d values                                 | exact                | |
| topk          | k largest |x_l| and their indices            | contractive          | α = k/d |
| randk         | k uniform coordinates (+ indices), ×d/k      | unbiased             | ω = d/k − 1 |
| randk_seeded  | as randk; indices regenerated from a seed    | unbiased             | ω = d/k − 1 |
| svd           | rank-r truncated SVD factors U_rΣ_r, V_r     | contractive          | α = r/min(m, n) |
| rsvd          | randomized SVD factors (LiMuon's RSVD)       | biased, no guarantee | (measured in tests) |
| powersgd      | one warm-started power step: P = orth(MQ), Q' = MᵀP | biased, no guarantee | (measured in tests) |

Matrices are the ``(shape[0], prod(shape[1:]))`` view. Low-rank structures send a tensor dense when
it is 1-D or ``m·n / ((m+n)·r) < min_compression_rate`` (PowerSGD's rule, default 2).

Composition rules (docs/ALGORITHMS.md §1.3; proofs in the docstring of :meth:`Compressor.properties`):
unbiased ∘ unbiased: ω = (1+ω₁)(1+ω₂) − 1; contractive ∘ unbiased, scaled by 1/(1+ω₂) at decode:
α' = α/(1+ω₂); contractive ∘ rounding (fp16, unit roundoff u): α' = 1 − (s + u(1+s))², s = √(1−α).
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

from fedgluon.linalg import randomized_svd
from fedgluon.rng import derive_seed

from .bits import BitCount
from .selection import topk_rows_numpy
from .sparse import SparseRows, SparseTensor, added
from .payload import PayloadRows, CodecError, DuplicateIndexError, IndexRangeError, MetaError, ShapeError, TensorPayload
from .values import Raw, ValueCodec, get_array

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
    name: str
    kind: str  # "exact" | "contractive" | "unbiased" | "biased"
    stateful = False
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
    def encode(self, x: Tensor, ctx: Context) -> tuple[Tensor, dict[str, np.ndarray], dict[str, int], State | None]:
        """``x`` → (values to encode, structure arrays, header, new state)."""

    @abstractmethod
    def decode(self, values: Tensor, arrays: Mapping[str, Any], meta: Mapping[str, Any],
               shape: tuple[int, ...], layer: str) -> Tensor: ...

    def bits(self, shape: tuple[int, ...], meta: Mapping[str, Any]) -> BitCount:
        return BitCount()

    # Row-wise encoding of B same-shape tensors at once (client blocks); deterministic, stateless
    # structures only. Row i of every result is exactly what ``encode`` gives for row i.
    rows = False  # whether encode_rows / add_rows_ are implemented
    rows_share_input = False  # whether encode_rows' values may be views of X (dense: X itself)

    def encode_rows(self, X: Tensor, shape: tuple[int, ...]) -> tuple[Tensor, dict[str, np.ndarray]]:
        """``X`` (B, d), row i the flattened tensor of client i → (values (B, n), arrays (B, ·))."""
        raise NotImplementedError

    def add_rows_(self, out: Tensor, values: Tensor, arrays: Mapping[str, np.ndarray]) -> None:
        """``out[i] += decode(row i)`` in place for every row of ``out`` (B, d), contiguous (``values`` (B, n)
        the rows' decoded values, already scaled; ``arrays`` the rows' (B, ·) structure arrays)."""
        raise NotImplementedError


class Dense(Structure):
    name, kind = "dense", "exact"

    def n_values(self, shape):
        return numel(shape)

    def encode(self, x, ctx):
        return x.reshape(-1), {}, {}, None

    def decode(self, values, arrays, meta, shape, layer):
        return values.reshape(shape)

    rows = True
    rows_share_input = True

    def encode_rows(self, X, shape):
        return X, {}

    def add_rows_(self, out, values, arrays):
        out += values


@dataclass
class _Sparse(Structure):
    ratio: float = 0.01
    min_k: int = 1

    def __post_init__(self) -> None:
        if not (0 < self.ratio <= 1):
            raise ValueError(f"compressor ratio must be in (0, 1], got {self.ratio}")
        if self.min_k < 1:
            raise ValueError(f"min_k must be >= 1, got {self.min_k}")

    def k(self, shape: tuple[int, ...]) -> int:
        d = numel(shape)
        return min(d, max(self.min_k, math.ceil(self.ratio * d)))

    def n_values(self, shape):
        return self.k(shape)

    def _scale(self, shape: tuple[int, ...]) -> float:
        return 1.0

    def _indices(self, arrays: Mapping[str, Any], meta: Mapping[str, Any], shape: tuple[int, ...],
                 layer: str) -> np.ndarray:
        """The validated, strictly increasing indices a payload refers to (int64)."""
        d, k = numel(shape), self.k(shape)
        idx = get_array(dict(arrays), "idx", layer, INDEX_DTYPES, k)
        wide = idx.astype(np.int64)
        steps = np.diff(wide)
        increasing = bool((steps > 0).all())
        if k:  # the range check comes first; for increasing indices the ends are the extremes
            lo, hi = (int(wide[0]), int(wide[-1])) if increasing else (int(wide.min()), int(wide.max()))
            if lo < 0 or hi >= d:
                raise IndexRangeError(layer, "idx", f"indices must lie in [0, {d}), got [{lo}, {hi}]")
        if not increasing:
            what = "duplicate" if (steps == 0).any() else "unsorted"
            raise DuplicateIndexError(layer, "idx", f"{what} indices (indices must be strictly increasing)")
        return wide

    def decode(self, values, arrays, meta, shape, layer):
        return self.decode_sparse(values, arrays, meta, shape, layer).dense()

    def decode_sparse(self, values: Tensor, arrays: Mapping[str, Any], meta: Mapping[str, Any],
                      shape: tuple[int, ...], layer: str) -> SparseTensor:
        idx = torch.from_numpy(self._indices(arrays, meta, shape, layer)).to(values.device)
        scale = self._scale(shape)
        return SparseTensor(idx, values * scale if scale != 1.0 else values, shape)

    def bits(self, shape, meta):
        d, k = numel(shape), self.k(shape)
        return BitCount(n_indices=k, index_bits_log2=k * max(1, math.ceil(math.log2(d))),
                        coo_bits=64 * len(shape) * k, bitmask_bits=d)


def topk_indices(x: Tensor, k: int) -> Tensor:
    """Indices of the k largest |x| in increasing order; ties at the k-th magnitude go to lower indices
    on CPU (:mod:`compressors.selection`), torch.topk on GPU."""
    return topk_rows(x.reshape(1, -1), k)[0]


def topk_rows(X: Tensor, k: int) -> Tensor:
    """:func:`topk_indices` of every row of ``X`` (B, d) in one call: (B, k) int64, each row increasing.
    On CPU row i equals ``topk_indices(X[i], k)`` exactly (the selection is a function of the row)."""
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

    def encode(self, x, ctx):
        idx = topk_indices(x, self.k(x.shape))
        return x.reshape(-1)[idx.to(x.device)], {"idx": idx.cpu().numpy().astype(index_dtype(x.numel()))}, {}, None

    rows = True

    def encode_rows(self, X, shape):
        idx = topk_rows(X, self.k(shape)).to(X.device)
        return torch.gather(X, 1, idx), {"idx": idx.cpu().numpy().astype(index_dtype(numel(shape)))}

    def add_rows_(self, out, values, arrays):
        """One ``index_add_`` into the flat block at ``i·d + idx`` (distinct positions: each entry gets its
        one value added exactly as a row-by-row add would)."""
        B, d = out.shape
        idx = torch.from_numpy(arrays["idx"].astype(np.int64)).to(values.device)
        if B > 1:
            idx += torch.arange(0, B * d, d, device=idx.device)[:, None]
        out.view(-1).index_add_(0, idx.view(-1), values.reshape(-1))


def _scatter_rows(A: np.ndarray, rows: np.ndarray, count: int) -> np.ndarray:
    out = np.zeros((count, *A.shape[1:]), A.dtype)
    out[rows] = A
    return out


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


@dataclass
class RandK(_Sparse):
    name = "randk"
    kind = "unbiased"
    array_keys = frozenset({"idx"})

    def omega(self, shape):
        return numel(shape) / self.k(shape) - 1

    def _scale(self, shape):
        return numel(shape) / self.k(shape)

    def encode(self, x, ctx):
        idx = randk_indices(x.numel(), self.k(x.shape), ctx.generator("randk"))
        return x.reshape(-1)[idx.to(x.device)], {"idx": idx.numpy().astype(index_dtype(x.numel()))}, {}, None


@dataclass
class RandKSeeded(RandK):
    """Rand-k whose indices the server regenerates from a 63-bit seed sent in the header."""

    name = "randk_seeded"
    array_keys = frozenset()
    meta_keys = frozenset({"seed"})

    def encode(self, x, ctx):
        seed = derive_seed(ctx.seed, "randk")
        idx = randk_indices(x.numel(), self.k(x.shape), torch.Generator().manual_seed(seed))
        return x.reshape(-1)[idx.to(x.device)], {}, {"seed": seed}, None

    def _indices(self, arrays, meta, shape, layer):
        seed = meta.get("seed")
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not 0 <= int(seed) < 2 ** 63:
            raise MetaError(layer, "seed", f"must be an integer in [0, 2^63), got {seed!r}")
        return randk_indices(numel(shape), self.k(shape), torch.Generator().manual_seed(int(seed))).numpy().astype(np.int64)

    def bits(self, shape, meta):
        return BitCount(seed_bits=64)


@dataclass
class _LowRank(Structure):
    rank: int = 2
    min_compression_rate: float = 2.0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"compressor rank must be >= 1, got {self.rank}")

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

    def encode(self, x, ctx):
        M = x.reshape(matrix_dims(tuple(x.shape)))
        P, Q, state = self._factors(M, ctx)
        return torch.cat([P.reshape(-1), Q.reshape(-1)]), {}, {}, state

    def decode(self, values, arrays, meta, shape, layer):
        m, n = matrix_dims(shape)
        r = self.r(shape)
        P, Q = values[: m * r].reshape(m, r), values[m * r:].reshape(n, r)
        return (P @ Q.mT).reshape(shape)


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
    oversample: int = 2

    def _factors(self, M, ctx):
        P, Q = randomized_svd(M, self.r(tuple(M.shape)), self.oversample, ctx.generator("sketch"))
        return P, Q, None


@dataclass
class PowerSGD(_LowRank):
    """One-shot PowerSGD (Vogels et al. 2019; docs/ALGORITHMS.md §11.1): ``P = orth(M Q)``, ``Q' = Mᵀ P``,
    send (P, Q'), decode ``P Q'ᵀ``. With ``warm_start`` the next call starts from the last Q'
    (kept in the client's compressor state), i.e. one subspace-iteration step per round."""

    name = "powersgd"
    kind = "biased"
    warm_start: bool = True

    @property
    def stateful(self) -> bool:  # type: ignore[override]
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


@dataclass(frozen=True)
class Properties:
    """What a compressor guarantees on one tensor shape."""

    kind: str  # "identity" | "contractive" | "unbiased" | "biased"
    alpha: float | None = None  # E‖C(x)−x‖² ≤ (1−α)‖x‖²
    omega: float | None = None  # E[Q(x)] = x, E‖Q(x)−x‖² ≤ ω‖x‖²


class Compressor:
    """``structure ∘ values``: compress a tensor to a :class:`TensorPayload` and back, validated."""

    def __init__(self, structure: Structure, values: ValueCodec | None = None, name: str | None = None):
        self.structure = structure
        self.values = values or Raw(np.float32)
        self.name = name or structure.name
        self._dense = Dense()
        self._bits: dict[tuple[str, tuple[int, ...]], BitCount] = {}
        self._message_bits: dict[tuple, BitCount] = {}

    def __repr__(self) -> str:
        return f"Compressor({self.structure!r}, values={self.values.name})"

    @property
    def stateful(self) -> bool:
        return self.structure.stateful

    def _structure_for(self, shape: tuple[int, ...]) -> Structure:
        return self.structure if self.structure.active(shape) else self._dense

    def codecs(self, shape: tuple[int, ...]) -> set[str]:
        """Codec ids this compressor may emit for ``shape``."""
        return {f"{self._structure_for(shape).name}/{self.values.name}"}

    def _shrink(self, structure: Structure) -> bool:
        return structure.kind == "contractive" and self.values.kind == "unbiased"

    def properties(self, shape: tuple[int, ...]) -> Properties:
        """Kind and constant on ``shape``.

        Proof sketch of the contractive ∘ unbiased rule: with y = C(x), z = Q(y)/(1+ω),
        E‖z − x‖² ≤ ‖y‖²/(1+ω) − 2<y, x>/(1+ω) + ‖x‖² = (‖y−x‖² − ‖x‖²)/(1+ω) + ‖x‖²
        ≤ (1 − α/(1+ω))‖x‖². Rounding with unit roundoff u after C: ‖R(y) − x‖ ≤ u‖y‖ + ‖y − x‖
        ≤ (u(1+s) + s)‖x‖ with s = √(1−α).
        """
        s = self._structure_for(shape)
        n = s.n_values(shape)
        v = self.values
        if s.kind == "biased":
            return Properties("biased")
        if s.kind == "exact":
            if v.kind == "exact":
                return Properties("identity", alpha=1.0, omega=0.0)
            if v.kind == "unbiased":
                return Properties("unbiased", omega=v.omega(n))
            return Properties("contractive", alpha=1 - v.unit_roundoff ** 2)
        if s.kind == "unbiased":
            if v.kind == "exact":
                return Properties("unbiased", omega=s.omega(shape))
            if v.kind == "unbiased":
                return Properties("unbiased", omega=(1 + s.omega(shape)) * (1 + v.omega(n)) - 1)  # type: ignore[operator]
            return Properties("biased")
        alpha = s.alpha(shape)
        assert alpha is not None
        if v.kind == "exact":
            return Properties("contractive", alpha=alpha)
        if v.kind == "unbiased":
            return Properties("contractive", alpha=alpha / (1 + v.omega(n)))
        root = math.sqrt(1 - alpha)
        return Properties("contractive", alpha=1 - (root + v.unit_roundoff * (1 + root)) ** 2)

    # ------------------------------------------------------------------ encode / decode
    def compress(self, x: Tensor, ctx: Context | None = None) -> tuple[TensorPayload, State | None]:
        """Payload for ``x`` and the new compressor state (None for stateless structures)."""
        ctx = ctx or Context()
        shape = tuple(x.shape)
        s = self._structure_for(shape)
        vals, arrays, meta, state = s.encode(x, ctx)
        varrays, vmeta = self.values.encode(vals, ctx.generator("quantise") if self.values.draws else None)
        arrays = {**arrays, **{f"v.{k}": a for k, a in varrays.items()}}
        return TensorPayload(f"{s.name}/{self.values.name}", shape, arrays, {**meta, **vmeta}), state

    def decompress(self, payload: TensorPayload, *, shape: tuple[int, ...] | None = None, layer: str = "?",
                   device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                   sparse: bool = False) -> Tensor | SparseTensor:
        """Validate ``payload`` (against ``shape`` when given) and return the tensor it encodes; with
        ``sparse``, a sparse structure returns it as a :class:`SparseTensor` (same validation)."""
        pshape, s = self._check(payload, shape, layer)
        return self._decode(s, payload, pshape, layer, device, dtype, sparse)

    def _check(self, payload: TensorPayload, shape: tuple[int, ...] | None, layer: str) -> tuple[tuple[int, ...], Structure]:
        """The container checks of :meth:`decompress` (type, shape, codec, keys, header types)."""
        expected = tuple(shape) if shape is not None else None
        if not isinstance(payload, TensorPayload):
            raise CodecError(layer, "payload", f"expected a TensorPayload, got {type(payload).__name__}")
        try:
            pshape = tuple(int(s) for s in payload.shape)
        except (TypeError, ValueError):
            raise ShapeError(layer, "shape", f"not a tuple of integers: {payload.shape!r}") from None
        if expected is not None and pshape != expected:
            raise ShapeError(layer, "shape", f"expected {expected}, got {pshape}")
        if any(s < 0 for s in pshape):
            raise ShapeError(layer, "shape", f"negative dimension in {pshape}")
        allowed = self.codecs(pshape)
        if not isinstance(payload.codec, str) or payload.codec not in allowed:
            raise CodecError(layer, "codec", f"expected one of {sorted(allowed)}, got {payload.codec!r}")
        s = self._structure_for(pshape)
        arrays, meta = payload.arrays, payload.meta
        if not isinstance(arrays, dict) or not isinstance(meta, dict):
            raise CodecError(layer, "arrays", "arrays and meta must be dicts")
        want = set(s.array_keys) | {f"v.{k}" for k in self.values.keys()}
        if set(arrays) != want:
            raise CodecError(layer, "arrays", f"expected keys {sorted(want)}, got {sorted(map(str, arrays))}")
        want_meta = set(s.meta_keys) | self.values.meta_keys()
        if set(meta) != want_meta:
            raise MetaError(layer, "meta", f"expected keys {sorted(want_meta)}, got {sorted(map(str, meta))}")
        for key, value in meta.items():
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise MetaError(layer, str(key), f"header values must be numbers, got {type(value).__name__}")
        return pshape, s

    def _decode(self, s: Structure, payload: TensorPayload, pshape: tuple[int, ...], layer: str,
                device: torch.device | str | None, dtype: torch.dtype | None, sparse: bool) -> Tensor | SparseTensor:
        arrays, meta = payload.arrays, payload.meta
        n = s.n_values(pshape)
        vals = self.values.decode({k[2:]: a for k, a in arrays.items() if k.startswith("v.")}, meta, n, layer,
                                  device=device, dtype=dtype or torch.float32)
        if self._shrink(s):
            vals = vals / (1 + self.values.omega(n))
        if sparse and isinstance(s, _Sparse):
            return s.decode_sparse(vals, arrays, meta, pshape, layer)
        return s.decode(vals, arrays, meta, pshape, layer)

    def block_decodable(self, shape: tuple[int, ...]) -> bool:
        """Whether :meth:`decompress_block` handles ``shape``: an index-carrying sparse structure (top-k,
        rand-k) with raw values (fp32/fp64)."""
        s = self._structure_for(shape)
        return isinstance(s, _Sparse) and s.array_keys == {"idx"} and isinstance(self.values, Raw)

    def decompress_block(self, payloads: list[Any], shape: tuple[int, ...], *, device: torch.device | str | None = None,
                         dtype: torch.dtype = torch.float32, max_nbytes: int | None = None
                         ) -> tuple[SparseRows, np.ndarray] | None:
        """Validate and decode the payloads of B clients for one tensor of ``shape`` at once: ``(rows,
        ok)`` where ``ok[i]`` says payload i passes every check of :meth:`decompress` (and has at most
        ``max_nbytes`` bytes of arrays), and then ``rows.tensor(i)`` is what ``decompress(payload_i,
        sparse=True)`` returns. A payload with ``ok[i]`` False may be invalid or merely unusual (an
        ndarray subclass, another index dtype than the first payload's): decode it alone to know.
        None when ``shape``'s structure has no block decoder (:meth:`block_decodable`).

        The checks, vectorised over the (B, k) arrays: codec, shape, no header, exactly the keys
        ``idx`` and ``v.v``, dtypes, lengths k, indices strictly increasing within [0, d), values
        finite."""
        s = self._structure_for(shape)
        if not self.block_decodable(shape) or not s.n_values(shape):
            return None
        assert isinstance(s, _Sparse)
        codec, k, d = f"{s.name}/{self.values.name}", s.k(shape), numel(shape)
        vtype = self.values.dtype.type  # type: ignore[attr-defined]
        ok = np.zeros(len(payloads), dtype=bool)
        first = next((p.arrays.get("idx") for p in payloads if type(p) is TensorPayload and type(p.arrays) is dict), None)
        itype = first.dtype if type(first) is np.ndarray and first.dtype.type in INDEX_DTYPES else np.dtype(np.int64)
        itype = itype.newbyteorder("=")
        idx, vals = [], []
        row, ndarray = (k,), np.ndarray
        for i, p in enumerate(payloads):
            if type(p) is not TensorPayload:
                continue
            pshape, meta, arrays = p.shape, p.meta, p.arrays
            if (p.codec != codec or type(pshape) is not tuple or pshape != shape or type(meta) is not dict or meta
                    or type(arrays) is not dict or len(arrays) != 2):
                continue
            a, v = arrays.get("idx"), arrays.get("v.v")
            if (type(a) is not ndarray or type(v) is not ndarray or a.shape != row or v.shape != row
                    or a.dtype != itype or v.dtype.type is not vtype or not v.dtype.isnative
                    or (max_nbytes is not None and a.nbytes + v.nbytes > max_nbytes)):
                continue
            ok[i] = True
            idx.append(a)
            vals.append(v)
        taken = np.flatnonzero(ok)
        I = np.stack(idx).astype(np.int64) if idx else np.empty((0, k), np.int64)
        V = np.stack(vals) if vals else np.empty((0, k), vtype)
        good = np.isfinite(V).all(axis=1) & (np.diff(I, axis=1) > 0).all(axis=1) & (I[:, 0] >= 0) & (I[:, -1] < d)
        ok[taken[~good]] = False
        if len(taken) < len(payloads):  # row i is payload i's (the rows of payloads left out: zeros)
            I, V = _scatter_rows(I, taken, len(payloads)), _scatter_rows(V, taken, len(payloads))
        values = torch.from_numpy(V).to(device).to(dtype)
        scale = s._scale(shape)
        return SparseRows(torch.from_numpy(I).to(values.device), values * scale if scale != 1.0 else values,
                          shape), ok

    def add_decoded(self, base: Tensor, payload: TensorPayload, sign: float = 1.0) -> Tensor:
        """``base + sign · decompress(payload)`` as a new tensor, for a payload this process has just made
        (error feedback on the client's own message): the container checks are skipped, sparse
        structures add their k values at their indices (:mod:`compressors.sparse`)."""
        shape = tuple(base.shape)
        r = self._decode(self._structure_for(shape), payload, shape, "own", base.device, base.dtype, True)
        return added(base, sign, r)

    # ------------------------------------------------------------------ B clients at once
    def rows_supported(self, shape: tuple[int, ...]) -> bool:
        """Whether :meth:`compress_rows` handles ``shape``: a deterministic, stateless structure with row
        encoders (dense, top-k) and exact raw values (fp32/fp64)."""
        s = self._structure_for(shape)
        return s.rows and not s.stateful and isinstance(self.values, Raw)

    def rows_share_input(self, shape: tuple[int, ...]) -> bool:
        """Whether :meth:`compress_rows`' payloads for ``shape`` may share memory with its input (dense
        ones do), so that the input must not be written to while they are in use."""
        return self._structure_for(shape).rows_share_input

    def compress_rows(self, X: Tensor) -> PayloadRows | None:
        """The payloads of ``X[0], …, X[B-1]`` (same shape) in one call; row i equals
        ``compress(X[i])[0]`` exactly. None when unsupported (:meth:`rows_supported`) or when a value is
        not finite (the row-by-row path then raises for that client, as it always has). As with
        :meth:`compress`, dense payloads may share memory with ``X``: don't write to ``X`` after."""
        shape = tuple(X.shape[1:])
        if not self.rows_supported(shape):
            return None
        s = self._structure_for(shape)
        vals, arrays = s.encode_rows(X.reshape(X.shape[0], -1), shape)
        varrays, _ = self.values.encode(vals, None)
        if not np.isfinite(varrays["v"]).all():
            return None
        return PayloadRows(f"{s.name}/{self.values.name}", shape,
                           {**arrays, **{f"v.{k}": a for k, a in varrays.items()}})

    def add_decoded_rows(self, bases: Sequence[Tensor | None] | Tensor, rows: PayloadRows, like: Tensor,
                         sign: float = 1.0) -> list[Tensor]:
        """``bases[i] + sign · decode(rows.payload(i))`` for every row, each a new tensor of its own storage,
        of ``like``'s dtype and device, equal to :meth:`add_decoded` row by row (for payloads this process
        has just made: no validation). ``bases``: the rows' tensors (None is zero), or one (B, *shape)
        contiguous tensor that the rows are added into in place (the caller's scratch; one call for the
        block, then one copy per row out of it). The rows' values are converted and signed once for the
        block (``sign`` = ±1: exact)."""
        if isinstance(bases, Tensor):
            self.add_decoded_block_(bases, rows, sign)
            return [b.clone() for b in bases.unbind(0)]
        values = torch.from_numpy(rows.arrays["v.v"]).to(like.device, like.dtype)
        signed = values if sign == 1.0 else sign * values
        structure = self._structure_for(rows.shape)
        outs = [b.clone() if b is not None else torch.zeros(rows.shape, dtype=values.dtype, device=values.device)
                for b in bases]
        for i, out in enumerate(outs):
            structure.add_rows_(out.view(1, -1), signed[i:i + 1], {k: a[i:i + 1] for k, a in rows.arrays.items()})
        return outs

    def add_decoded_block_(self, block: Tensor, rows: PayloadRows, sign: float = 1.0) -> Tensor:
        """``block[i] += sign · decode(rows.payload(i))`` for every row of the contiguous (B, *shape)
        ``block``, in place, in one call (payloads this process has just made: no validation); equal to
        :meth:`add_decoded` row by row. Returns ``block``."""
        values = torch.from_numpy(rows.arrays["v.v"]).to(block.device, block.dtype)
        self._structure_for(rows.shape).add_rows_(block.view(len(block), -1), values if sign == 1.0 else sign * values,
                                                  rows.arrays)
        return block

    def bits(self, payload: TensorPayload) -> BitCount:
        """Raw bit counts of a (valid) payload, from its codec and shape alone (no structure or value
        codec reads its header), memoised per (codec, shape)."""
        key = (payload.codec, tuple(payload.shape))
        if key not in self._bits:
            self._bits[key] = self._count_bits(key[1])
        return self._bits[key]

    def message_bits(self, message: Mapping[str, TensorPayload]) -> BitCount:
        """Raw bit counts of a (valid) message, summed over its layers' :meth:`bits` (each with the flag
        bit for the codec choice when the compressor can fall back to dense), memoised per sequence of
        (codec, shape)."""
        key = tuple((p.codec, tuple(p.shape)) for p in message.values())
        if key not in self._message_bits:
            self._message_bits[key] = sum((self.bits(p) for p in message.values()), BitCount())
        return self._message_bits[key]

    def _count_bits(self, shape: tuple[int, ...]) -> BitCount:
        s = self._structure_for(shape)
        fallback = BitCount(dense_fallbacks=1) if (s is self._dense and self.structure is not self._dense) else BitCount()
        return s.bits(shape, {}) + self.values.bits(s.n_values(shape), {}) + fallback

    def __call__(self, x: Tensor, ctx: Context | None = None) -> Tensor:
        """``C(x)``: compress and decompress (for analysis and tests)."""
        payload, _ = self.compress(x, ctx)
        return self.decompress(payload, shape=tuple(x.shape), device=x.device, dtype=x.dtype)
