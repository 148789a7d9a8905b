"""Value codecs: how a vector of n floats travels. Each is exact, rounding, or unbiased (with ω).

| codec    | arrays                                   | bits                | kind / ω |
| -------- | ---------------------------------------- | ------------------- | -------- |
| fp32     | ``v`` float32 (n)                        | 32 n                | exact (the working precision) |
| fp64     | ``v`` float64 (n)                        | 64 n                | exact for float64 (tests) |
| fp16     | ``v`` float16 (n), ``scale`` float32 (1) | 16 n + 32           | rounding, relative error ≤ 2⁻¹¹ (a) |
| qsgd     | ``norm`` float32 (1), ``q`` packed bits  | n ⌈log2(2s+1)⌉ + 32 | unbiased, ω = min(n/s², √n/s) (b) |
| natural  | ``e`` uint8 (n), ``sign`` packed bits    | 9 n                 | unbiased, ω = 1/8 (c) |
| int2/4/8 | ``q`` b bits, ``scale`` float32 (1)      | b n + 32            | deterministic, α = 1/n (d) |

(a) values scaled into the fp16 range first; (b) Alistarh et al. 2017, Lemma 3.1; (c) Horváth et al.,
"Natural compression", 2019; (d) MuLoCo's low-bit quantiser (arXiv 2505.23725).

QSGD: ``Q(v)_l = ‖v‖₂ · sign(v_l) · ξ_l / s`` with ``ξ_l ∈ {⌊s|v_l|/‖v‖⌋, ⌊…⌋+1}`` rounded up with
probability equal to the fractional part. Levels ``sign·ξ ∈ [−s, s]`` are bit-packed.
Natural: ``|v| ∈ [2^e, 2^{e+1})`` rounds to ``2^{e+1}`` with probability ``(|v| − 2^e)/2^e`` (else
``2^e``), encoded as the float32 biased exponent (1..254, 0 = zero) plus a sign bit. Magnitudes
below 2⁻¹²⁶ round stochastically to 0 or 2⁻¹²⁶ (still unbiased); at 2¹²⁷ and above the exponent
saturates (a bias only for values beyond 1.7e38).
"""

from __future__ import annotations

import contextvars
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from compressors.bits import BitCount
from compressors.payload import DtypeError, MetaError, NonFiniteError, TruncatedError
from fedgluon.core.text import shown

Arrays = dict[str, np.ndarray]


def get_array(arrays: dict[str, Any], key: str, layer: str, dtypes: tuple[type, ...], length: int) -> np.ndarray:
    """Fetch ``arrays[key]`` as (B, ``length``) rows — each row a payload's 1-D array — of one of ``dtypes``."""
    a = arrays.get(key)
    if not isinstance(a, np.ndarray):
        raise TruncatedError(layer, key, f"missing array (got {type(a).__name__})")
    if a.dtype.type not in dtypes:
        raise DtypeError(layer, key, f"dtype {a.dtype} not in {[np.dtype(d).name for d in dtypes]}")
    if a.ndim != 2 or a.shape[1] != length:
        raise TruncatedError(layer, key, f"expected shape ({length},), got {a.shape[1:]}")
    return a


OWN = contextvars.ContextVar("own_payloads", default=False)
"""True while a process decodes payloads it made itself, or ones it already validated
(:meth:`compressors.Compressor.add_decoded_` with ``own=True``): the value and index checks, which
guard against what a client may send, are skipped; layouts (dtypes, lengths) are still read."""


def check_finite(a: np.ndarray, layer: str, key: str) -> None:
    if OWN.get():
        return
    if not np.isfinite(a).all():
        raise NonFiniteError(layer, key, f"{int((~np.isfinite(a)).sum())} NaN/Inf entries")


def _tensor(a: np.ndarray | Tensor, device: torch.device | str | None, dtype: torch.dtype | None = None) -> Tensor:
    """``a`` as a tensor on ``device`` (None: where it is) in ``dtype`` (None: its own)."""
    t = torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a
    return t.to(device=device, dtype=dtype)


class ValueCodec(ABC):
    """Encodes and decodes B rows of n values at once; row i's result depends on row i (and its generator)
    alone. Codecs whose arithmetic involves a per-row scalar or a draw encode row by row
    (:meth:`encode_row`), so every row is computed exactly as a lone vector would be."""

    name: str
    kind: str  # "exact" | "rounding" | "unbiased" | "contractive" (states alpha(n))
    unit_roundoff: float = 0.0
    draws: bool = False  # whether encode uses its generator (else it gets None)
    array_keys: frozenset[str] = frozenset({"v"})  # the arrays of a payload's values (``v.<key>`` on the wire)
    meta_keys: frozenset[str] = frozenset()  # the per-row header fields

    def omega(self, n: int) -> float:
        return 0.0

    def alpha(self, n: int) -> float:
        """``‖Q(v) − v‖² ≤ (1 − α)‖v‖²`` for exact, rounding and contractive codecs on n values, for every v
        (rounding: 1 − u² from the unit roundoff u): a codec whose contraction depends on the data states its
        worst case over all v of length n (int-b: 1/n)."""
        return 1.0 - self.unit_roundoff ** 2

    def encode(self, V: Tensor, gens: list[torch.Generator] | None) -> tuple[Arrays, dict[str, list]]:
        """(B, n) values → (arrays (B, ·), per-row headers); row i draws from ``gens[i]`` (None: no draws)."""
        rows = [self.encode_row(v, gens[i] if gens is not None else None) for i, v in enumerate(V)]
        if not rows:
            rows = [self.encode_row(V.new_zeros(V.shape[1]), None)]
            return {k: np.empty((0, *a.shape), a.dtype) for k, a in rows[0][0].items()}, {k: [] for k in rows[0][1]}
        return ({k: np.stack([r[0][k] for r in rows]) for k in rows[0][0]},
                {k: [r[1][k] for r in rows] for k in rows[0][1]})

    def encode_row(self, v: Tensor, gen: torch.Generator | None) -> tuple[Arrays, dict[str, int | float]]:
        """One row of :meth:`encode`."""
        raise NotImplementedError

    @abstractmethod
    def decode(self, arrays: dict[str, Any], meta: dict[str, Any], n: int, layer: str,
               device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """Validate B rows' arrays (B, ·) and headers (lists) for ``n`` values each and return the (B, n)
        values (raises a PayloadError)."""

    @abstractmethod
    def bits(self, n: int) -> BitCount:
        """The bits of one row of n values: a function of n alone, since a payload's size is fixed by its
        codec and shape (the compressor counts each (codec, shape) once and reuses it)."""


class Raw(ValueCodec):
    """Values as they are, in float32 (``fp32``, the working precision) or float64 (``fp64``)."""

    kind = "exact"

    def __init__(self, dtype: type = np.float32):
        self.dtype = np.dtype(dtype)
        self.name = {np.float32: "fp32", np.float64: "fp64"}[self.dtype.type]

    def encode(self, V, gens):
        return {"v": V.detach().cpu().numpy().astype(self.dtype, copy=False)}, {}

    def decode(self, arrays, meta, n, layer, device=None, dtype=torch.float32):
        a = get_array(arrays, "v", layer, (self.dtype.type,), n)
        check_finite(a, layer, "v")
        return _tensor(a, device, dtype)

    def bits(self, n):
        return BitCount(value_bits=8 * self.dtype.itemsize * n, n_values=n)


class FP16(ValueCodec):
    """Scaled half precision: ``v ≈ scale · fp16(v / scale)`` with ``scale = max|v| / 2^14``."""

    name, kind, unit_roundoff = "fp16", "rounding", 2.0 ** -11
    array_keys = frozenset({"v", "scale"})

    def encode_row(self, v, gen):
        v = v.detach().to("cpu", torch.float32)
        amax = float(v.abs().max()) if v.numel() else 0.0
        scale = np.float32(amax / 2.0 ** 14 if amax > 0 else 1.0)
        if not np.isfinite(scale) or scale == 0:  # subnormal maxima: send unscaled-by-one
            scale = np.float32(1.0)
        return {"v": (v / float(scale)).to(torch.float16).numpy(), "scale": np.array([scale], dtype=np.float32)}, {}

    def decode(self, arrays, meta, n, layer, device=None, dtype=torch.float32):
        a = get_array(arrays, "v", layer, (np.float16,), n)
        s = get_array(arrays, "scale", layer, (np.float32,), 1)
        check_finite(a, layer, "v")
        check_finite(s, layer, "scale")
        if not (s > 0).all():
            raise MetaError(layer, "scale", f"must be positive, got {s[~(s > 0)][0]}")
        out = _tensor(a, device, torch.float32) * _tensor(s, device)
        check_finite(out.cpu().numpy(), layer, "v·scale")
        return out.to(dtype)

    def bits(self, n):
        return BitCount(value_bits=16 * n, n_values=n, scalar_bits=32)


def _pack(codes: np.ndarray, width: int) -> np.ndarray:  # one row
    """Pack non-negative integers < 2^width (width ≤ 16), ``width`` bits each, most significant first."""
    bits = np.unpackbits(codes.astype(">u2").view(np.uint8)).reshape(-1, 16)[:, 16 - width:]
    return np.packbits(bits.reshape(-1))


def _unpack(packed: np.ndarray, n: int, width: int) -> np.ndarray:
    """The (B, n) integers of :func:`_pack`'s rows (B, ⌈n·width/8⌉)."""
    B = len(packed)
    bits = np.unpackbits(packed, axis=1, count=n * width).reshape(B, n, width)
    full = np.zeros((B, n, 16), dtype=np.uint8)
    full[:, :, 16 - width:] = bits
    return np.packbits(full.reshape(B, -1), axis=1).view(">u2").astype(np.int64)


def _decode_levels(arrays: dict[str, Any], scale_key: str, n: int, layer: str, width: int, levels: int,
                   device: Any, dtype: torch.dtype) -> Tensor:
    """``code · scale / levels`` of ``n`` packed ``width``-bit codes (stored offset by ``levels``) and a float32
    ``scale_key`` array (QSGD's norm, the int-b quantisers' scale): the scale must be finite and ≥ 0, and
    every code in ``[-levels, levels]``, or :class:`MetaError` names the array."""
    scale = get_array(arrays, scale_key, layer, (np.float32,), 1)
    check_finite(scale, layer, scale_key)
    if (scale < 0).any():
        raise MetaError(layer, scale_key, f"must be >= 0, got {scale[scale < 0][0]}")
    q = get_array(arrays, "q", layer, (np.uint8,), math.ceil(n * width / 8))
    codes = _unpack(q, n, width) - levels
    if np.abs(codes).max(initial=0) > levels:
        raise MetaError(layer, "q", f"quantisation level outside [-{levels}, {levels}]")
    vals = torch.from_numpy(codes).to(torch.float64) * torch.from_numpy(scale.astype(np.float64) / levels)
    return _tensor(vals, device, dtype)


class QSGD(ValueCodec):
    name, kind, draws = "qsgd", "unbiased", True
    array_keys, meta_keys = frozenset({"norm", "q"}), frozenset({"levels"})

    def __init__(self, levels: int = 15):
        if not (isinstance(levels, int) and 1 <= levels <= 2 ** 15):
            raise ValueError(f"levels must be an integer in [1, 32768] (qsgd's), got {levels!r}")
        self.levels = levels
        self.width = math.ceil(math.log2(2 * levels + 1))

    def omega(self, n: int) -> float:
        s = self.levels
        return min(n / s ** 2, math.sqrt(n) / s)

    def encode_row(self, v, gen):
        v = v.detach().to("cpu", torch.float64)
        norm = float(torch.linalg.vector_norm(v))  # float64: fp32 inputs give an exact ratio |v|/‖v‖
        s = self.levels
        if norm == 0 or not math.isfinite(norm):
            xi = torch.zeros_like(v, dtype=torch.int64)
            norm = 0.0 if norm == 0 else norm
        else:
            r = v.abs() / norm * s
            low = torch.floor(r)
            u = torch.rand(v.shape, generator=gen, dtype=torch.float64)
            xi = (low + (u < (r - low)).to(torch.float64)).to(torch.int64)
        signed = (torch.sign(v).to(torch.int64) * xi + s).numpy()
        return {"norm": np.array([norm], dtype=np.float32), "q": _pack(signed, self.width)}, {"levels": s}

    def decode(self, arrays, meta, n, layer, device=None, dtype=torch.float32):
        for levels in meta.get("levels"):
            if levels != self.levels:
                raise MetaError(layer, "levels", f"expected {self.levels}, got {shown(levels, 40)}")
        return _decode_levels(arrays, "norm", n, layer, self.width, self.levels, device, dtype)

    def bits(self, n):
        return BitCount(value_bits=self.width * n, n_values=n, scalar_bits=32)


class Natural(ValueCodec):
    name, kind, draws = "natural", "unbiased", True
    array_keys = frozenset({"e", "sign"})
    _MIN_EXP, _MAX_EXP = -126, 127

    def omega(self, n: int) -> float:
        return 1.0 / 8.0

    def encode_row(self, v, gen):
        v = v.detach().to("cpu", torch.float64)
        a = v.abs()
        tiny = 2.0 ** self._MIN_EXP
        e = torch.floor(torch.log2(torch.where(a > 0, a, torch.ones_like(a)))).clamp(self._MIN_EXP, self._MAX_EXP)
        low = torch.exp2(e)
        p_up = torch.where(a >= tiny, (a - low) / low, a / tiny)  # below 2^-126: round to 0 or 2^-126
        up = torch.rand(v.shape, generator=gen, dtype=torch.float64) < p_up
        zero = (a == 0) | ((a < tiny) & ~up)
        e_final = torch.where((a >= tiny) & up, (e + 1).clamp(max=self._MAX_EXP), e)
        code = torch.where(zero, torch.zeros_like(e), e_final + 127).to(torch.uint8).numpy()
        sign = np.packbits((v < 0).numpy().astype(np.uint8))
        return {"e": code, "sign": sign}, {}

    def decode(self, arrays, meta, n, layer, device=None, dtype=torch.float32):
        code = get_array(arrays, "e", layer, (np.uint8,), n)
        if (code == 255).any():
            raise MetaError(layer, "e", "exponent code 255 is reserved")
        sign = get_array(arrays, "sign", layer, (np.uint8,), math.ceil(n / 8))
        neg = np.unpackbits(sign, axis=1, count=n).astype(bool)
        mag = np.where(code == 0, 0.0, np.exp2(code.astype(np.float64) - 127))
        vals = torch.from_numpy(np.where(neg, -mag, mag))
        return _tensor(vals, device, dtype)

    def bits(self, n):
        return BitCount(value_bits=9 * n, n_values=n)


class SymmetricInt(ValueCodec):
    """Deterministic b-bit quantisation with a per-tensor scale (``int2``, ``int4``, ``int8``)::

        s = max_l |v_l|,   L = 2^{b−1} − 1,   q_l = round(L v_l / s) ∈ [−L, L],   Q(v)_l = s q_l / L

    the symmetric absmax grid of docs/ALGORITHMS.md §15.3 (contractive with α = 1/n on n values: ``alpha``).
    [RECON] MuLoCo's own definition of its grid was not available: this is the standard quantiser with its
    properties.
    Rounds half to even; ``q + L`` travels in b bits (one code unused), the scale as float32. A non-finite
    input sends zeros.
    """

    kind = "contractive"
    array_keys = frozenset({"q", "scale"})
    _WIDTHS = {"int2": 2, "int4": 4, "int8": 8}

    def __init__(self, name: str = "int2"):
        if name not in self._WIDTHS:
            raise ValueError(f"symmetric int codec must be one of {list(self._WIDTHS)}, got {name!r}")
        self.name, self.width = name, self._WIDTHS[name]
        self.top = 2 ** (self.width - 1) - 1

    def alpha(self, n: int) -> float:
        """The contraction constant on n values: ``‖Q(v) − v‖² ≤ (1 − α)‖v‖²`` with α = 1/n."""
        return 1.0 / max(1, n)

    def encode_row(self, v, gen):
        v = v.detach().to("cpu", torch.float64)
        amax = float(v.abs().max()) if v.numel() else 0.0
        s = float(np.float32(min(amax, float(np.finfo(np.float32).max))))  # the scale that travels
        if s == 0 or not math.isfinite(amax):
            q = torch.zeros(v.shape, dtype=torch.int64)
            s = 0.0
        else:  # round to the grid the decoder rebuilds from the float32 scale
            q = torch.round(v * (self.top / s)).clamp(-self.top, self.top).to(torch.int64)
        return {"q": _pack((q + self.top).numpy(), self.width),
                "scale": np.array([s], dtype=np.float32)}, {}

    def decode(self, arrays, meta, n, layer, device=None, dtype=torch.float32):
        return _decode_levels(arrays, "scale", n, layer, self.width, self.top, device, dtype)

    def bits(self, n):
        return BitCount(value_bits=self.width * n, n_values=n, scalar_bits=32)


VALUE_CODECS: dict[str, Callable[[int], ValueCodec]] = {
    "fp32": lambda levels: Raw(np.float32), "fp64": lambda levels: Raw(np.float64), "fp16": lambda levels: FP16(),
    "qsgd": QSGD, "natural": lambda levels: Natural(), "int2": lambda levels: SymmetricInt("int2"),
    "int4": lambda levels: SymmetricInt("int4"), "int8": lambda levels: SymmetricInt("int8"),
}
"""Every value codec by name, built from QSGD's ``levels`` (which the others ignore): a codec is registered here
once, and then works under every structure (``compressor.values``)."""


def make_value_codec(name: str, levels: int = 15) -> ValueCodec:
    if name not in VALUE_CODECS:
        raise ValueError(f"values must be one of {list(VALUE_CODECS)}, got {name!r}")
    return VALUE_CODECS[name](levels)
