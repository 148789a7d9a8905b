"""Compression operators = a *structure* (which numbers travel) ∘ a *value codec* (how they travel).

Structures, applied per tensor (per layer):

| structure     | sends                                        | kind                 | constant |
| ------------- | -------------------------------------------- | -------------------- | -------- |
| dense         | all d values                                 | exact                | |
| topk          | k largest |x_l| and their indices            | contractive          | α = k/d |
| randk         | k uniform coordinates (+ indices), ×d/k      | unbiased             | ω = d/k − 1 |
| randk_seeded  | as randk; indices regenerated from a seed    | unbiased             | ω = d/k − 1 |
| svd           | rank-r truncated SVD factors U_rΣ_r, V_r     | contractive          | α = r/min(m, n) |
| rsvd          | randomized SVD factors (LiMuon's RSVD)       | biased, no guarantee | (measured in tests) |
| powersgd      | one warm-started power step: P = orth(MQ), Q' = MᵀP | biased, no guarantee | (measured in tests) |

The per-layer sizes ``k_i = clamp(⌈ratio·d_i⌉, min_k, d_i)``, the dense fallback of the low-rank structures
and the composition rules: docs/ALGORITHMS.md §1.3 (proofs in :meth:`Compressor.properties`); PowerSGD: §11.1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from compressors.bits import BitCount
from compressors.payload import (
    CodecError,
    MetaError,
    PayloadRows,
    RowMessage,
    ShapeError,
    TensorPayload,
)
from compressors.sparse import SparseRows, SparseTensor
from compressors.structures import Context, Dense, State, Structure, _Sparse
from compressors.values import OWN, Raw, ValueCodec
from fedgluon.core.text import shown


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
        self._message_bits: dict[tuple, BitCount] = {}

    def __repr__(self) -> str:
        return f"Compressor({self.structure!r}, values={self.values.name})"

    def options(self) -> dict[str, Any]:
        """This compressor as a config mapping, every setting at the value it runs with, defaults included
        (``make_compressor`` of it builds the same compressor)."""
        s = self.structure
        out: dict[str, Any] = {"name": self.name, **({f.name: getattr(s, f.name) for f in fields(s)}
                                                      if is_dataclass(s) else {})}
        out["values"] = self.values.name
        if hasattr(self.values, "levels"):  # QSGD's
            out["levels"] = self.values.levels
        return out

    def _structure_for(self, shape: tuple[int, ...]) -> Structure:
        return self.structure if self.structure.active(shape) else self._dense

    def properties(self, shape: tuple[int, ...]) -> Properties:
        """Kind and constant on ``shape``.

        Proof sketch of the contractive ∘ unbiased rule: with y = C(x), z = Q(y)/(1+ω),
        E‖z − x‖² ≤ ‖y‖²/(1+ω) − 2<y, x>/(1+ω) + ‖x‖² = (‖y−x‖² − ‖x‖²)/(1+ω) + ‖x‖²
        ≤ (1 − α/(1+ω))‖x‖². Rounding with unit roundoff u after C: ‖R(y) − x‖ ≤ u‖y‖ + ‖y − x‖
        ≤ (u(1+s) + s)‖x‖ with s = √(1−α). A contractive codec (int-b, ``‖Q(y) − y‖² ≤ (1 − α_Q)‖y‖²``)
        enters the same bound with u = √(1 − α_Q); where the bound reaches 1 no constant is claimed ("biased").
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
            return Properties("contractive", alpha=1 - _relative_error(v, n) ** 2)
        if s.kind == "unbiased":
            if v.kind == "exact":
                return Properties("unbiased", omega=s.omega(shape))
            if v.kind == "unbiased":
                s_omega = s.omega(shape)
                assert s_omega is not None  # an unbiased structure states its ω
                return Properties("unbiased", omega=(1 + s_omega) * (1 + v.omega(n)) - 1)
            return Properties("biased")
        alpha = s.alpha(shape)
        assert alpha is not None
        if v.kind == "exact":
            return Properties("contractive", alpha=alpha)
        if v.kind == "unbiased":
            return Properties("contractive", alpha=alpha / (1 + v.omega(n)))
        root = math.sqrt(1 - alpha)
        bound = root + _relative_error(v, n) * (1 + root)
        return Properties("contractive", alpha=1 - bound ** 2) if bound < 1 else Properties("biased")

    # ------------------------------------------------------------------ encode / decode
    @property
    def draws(self) -> bool:
        """Whether encoding reads the rows' contexts (random structures or values, or compressor state)."""
        return self.structure.draws or self.values.draws or self.structure.stateful

    def encode(self, X: Tensor, ctxs: Sequence[Context] | None = None) -> tuple[PayloadRows, list[State | None]]:
        """The payloads of ``X[0], …, X[B-1]`` (B tensors of one shape) and their new compressor states:
        row i is client i's payload, drawn from ``ctxs[i]`` (its seed and state; default ``Context()``),
        the same whatever the other rows. Dense payloads may share memory with ``X``: don't write to ``X``
        while they are in use."""
        shape = tuple(X.shape[1:])
        ctxs = list(ctxs) if ctxs is not None else [Context()] * len(X)
        s = self._structure_for(shape)
        vals, arrays, meta, states = s.encode(X.reshape(len(X), -1), shape, ctxs)
        gens = [c.generator("quantise") for c in ctxs] if self.values.draws else None
        varrays, vmeta = self.values.encode(vals, gens)
        arrays = {**arrays, **{f"v.{k}": a for k, a in varrays.items()}}
        return PayloadRows(f"{s.name}/{self.values.name}", shape, arrays, {**meta, **vmeta}), states

    def compress(self, x: Tensor, ctx: Context | None = None) -> tuple[TensorPayload, State | None]:
        """:meth:`encode` of one tensor: its payload and new state (None for stateless structures)."""
        rows, states = self.encode(x.unsqueeze(0), [ctx or Context()])
        return rows.payload(0), states[0]

    def decompress(self, payload: TensorPayload, *, shape: tuple[int, ...] | None = None, layer: str = "?",
                   device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                   sparse: bool = False) -> Tensor | SparseTensor:
        """Validate ``payload`` (against ``shape`` when given) and return the tensor it encodes; with
        ``sparse``, a sparse structure returns it as a :class:`SparseTensor`: :meth:`decode_rows` of a
        block of one."""
        if not isinstance(payload, TensorPayload):
            raise CodecError(layer, "payload", f"expected a TensorPayload, got {type(payload).__name__}")
        try:
            pshape = tuple(int(s) for s in payload.shape)
        except (TypeError, ValueError):
            raise ShapeError(layer, "shape", f"not a tuple of integers: {shown(payload.shape, 60)}") from None
        out = self.decode_rows(PayloadRows.of(payload, pshape), shape=shape, layer=layer, device=device, dtype=dtype,
                               sparse=sparse)
        return out.tensor(0) if isinstance(out, SparseRows) else out[0]

    def decode_rows(self, rows: PayloadRows, *, shape: tuple[int, ...] | None = None, layer: str = "?",
                    device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                    sparse: bool = False) -> Tensor | SparseRows:
        """Validate payload rows (against ``shape`` when given) and :meth:`decode` them. The container
        checks (shape, codec, array and header keys, header types) come first; a PayloadError names the
        first failure, so one bad row fails the whole block (decode the rows alone to tell them apart)."""
        pshape = tuple(rows.shape)
        if shape is not None and pshape != tuple(shape):
            raise ShapeError(layer, "shape", f"expected {tuple(shape)}, got {pshape}")
        if any(s < 0 for s in pshape):
            raise ShapeError(layer, "shape", f"negative dimension in {pshape}")
        s = self._structure_for(pshape)
        allowed = {f"{s.name}/{self.values.name}"}  # the one codec id this compressor emits for the shape
        if not isinstance(rows.codec, str) or rows.codec not in allowed:
            raise CodecError(layer, "codec", f"expected one of {sorted(allowed)}, got {shown(rows.codec, 60)}")
        arrays, meta = rows.arrays, rows.meta
        if not isinstance(arrays, dict) or not isinstance(meta, dict):
            raise CodecError(layer, "arrays", "arrays and meta must be dicts")
        want = set(s.array_keys) | {f"v.{k}" for k in self.values.array_keys}
        if set(arrays) != want:
            raise CodecError(layer, "arrays", f"expected keys {sorted(want)}, got {sorted(map(str, arrays))}")
        want_meta = set(s.meta_keys | self.values.meta_keys)
        if set(meta) != want_meta:
            raise MetaError(layer, "meta", f"expected keys {sorted(want_meta)}, got {sorted(map(str, meta))}")
        for key, values in meta.items():
            for value in values:
                if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                    raise MetaError(layer, str(key), f"header values must be numbers, got {type(value).__name__}")
        return self.decode(rows, layer=layer, device=device, dtype=dtype, sparse=sparse)

    def decode(self, rows: PayloadRows, *, layer: str = "own", device: torch.device | str | None = None,
               dtype: torch.dtype | None = None, sparse: bool = False) -> Tensor | SparseRows:
        """The (B, *shape) tensors that payload rows encode (``rows.shape``' structure and this compressor's
        value codec; the arrays are checked — lengths, dtypes, indices, finiteness — and a PayloadError
        names the first failure); with ``sparse``, a sparse structure returns a :class:`SparseRows`."""
        s = self._structure_for(rows.shape)
        n = s.n_values(rows.shape)
        vals = self.values.decode({k[2:]: a for k, a in rows.arrays.items() if k.startswith("v.")}, rows.meta, n, layer,
                                  device=device, dtype=dtype or torch.float32)
        if s.kind == "contractive" and self.values.kind == "unbiased":  # the composition rule's 1/(1+ω)
            vals = vals / (1 + self.values.omega(n))
        if sparse and isinstance(s, _Sparse):
            return s.decode_sparse(vals, rows.arrays, rows.meta, rows.shape, layer)
        return s.decode(vals, rows.arrays, rows.meta, rows.shape, layer)

    def add_decoded_(self, out: Tensor, rows: PayloadRows, sign: float = 1.0) -> Tensor:
        """``out[i] += sign · decode(row i)`` for every row of the (B, *shape) ``out``, in place, and returns
        it: sparse rows add their k values at their indices (distinct positions: the dense sum's values,
        :mod:`compressors.sparse`), others the decoded tensor; ``sign · value`` is rounded first, then
        added. For payloads this process has made (error feedback on a client's own message) or has
        already validated (the server deriving a tracker): the value and index checks are skipped
        (:data:`compressors.values.OWN`)."""
        token = OWN.set(True)
        try:
            decoded = self.decode(rows, device=out.device, dtype=out.dtype, sparse=True)
        finally:
            OWN.reset(token)
        if isinstance(decoded, SparseRows):
            decoded.add_into_(out, sign)
        else:
            out += sign * decoded
        return out

    def sparse_rows(self, shape: tuple[int, ...]) -> bool:
        """Whether :meth:`decode` with ``sparse`` gives :class:`SparseRows` for ``shape`` (a sparse structure)."""
        return isinstance(self._structure_for(shape), _Sparse)

    def bits(self, payload: TensorPayload) -> BitCount:
        """Raw bit counts of a (valid) payload: :meth:`message_bits` of a message of one layer."""
        return self.message_bits({"": payload})

    def message_bits(self, message: Mapping[str, TensorPayload]) -> BitCount:
        """Raw bit counts of a (valid) message, summed over its layers (each with the flag bit for the codec
        choice when the compressor can fall back to dense), memoised per sequence of (codec, shape)."""
        # a row's codec and shape are its group's
        payloads = message.layers if isinstance(message, RowMessage) else message
        key = tuple((p.codec, tuple(p.shape)) for p in payloads.values())
        if key not in self._message_bits:
            self._message_bits[key] = sum((self._count_bits(shape) for _, shape in key), BitCount())
        return self._message_bits[key]

    def _count_bits(self, shape: tuple[int, ...]) -> BitCount:
        s = self._structure_for(shape)
        fell_back = s is self._dense and self.structure is not self._dense
        fallback = BitCount(dense_fallbacks=1) if fell_back else BitCount()
        return s.bits(shape) + self.values.bits(s.n_values(shape)) + fallback

    def __call__(self, x: Tensor, ctx: Context | None = None) -> Tensor:
        """``C(x)``: compress and decompress (for analysis and tests)."""
        payload, _ = self.compress(x, ctx)
        out = self.decompress(payload, shape=tuple(x.shape), device=x.device, dtype=x.dtype)
        assert isinstance(out, Tensor)  # not sparse=True: dense
        return out


def unbiased_omega(compressor: Compressor, shapes: Mapping[str, tuple[int, ...]], who: str) -> float:
    """The largest variance ω of ``compressor`` over these layer shapes, for an algorithm (``who``: MARINA,
    DASHA) whose analysis needs ``E[Q(x)] = x``; ValueError where a layer's compressor is not unbiased
    (top-k, low rank, deterministic int-b)."""
    props = [compressor.properties(tuple(shape)) for shape in shapes.values()]
    if any(p.kind not in ("unbiased", "identity") for p in props):
        raise ValueError(f"compressor must be unbiased for {who} (E[Q(x)] = x: randk, randk_seeded, qsgd, natural "
                         f"or identity), got {compressor!r}")
    return max((p.omega or 0.0 for p in props), default=0.0)


def _relative_error(values: ValueCodec, n: int) -> float:
    """u with ``‖Q(y) − y‖ ≤ u‖y‖`` on n values: ``√(1 − α)`` (a rounding codec's unit roundoff)."""
    return math.sqrt(1 - values.alpha(n))
