"""Polar factor ``polar(G) = U Vᵀ`` of (batches of) matrices: Newton–Schulz and exact SVD (docs/ALGORITHMS.md §1.2).

The spectral LMO is ``−U Vᵀ`` for ``G = U Σ Vᵀ`` (docs/DESIGN.md §2); :mod:`fedgluon.lmo.norms` adds the sign.
Both oracles batch over leading dimensions (same-shape matrices in one call):

* :class:`NewtonSchulz` — ``X ← a X + b (X Xᵀ) X + c (X Xᵀ)² X`` from ``X₀ = G / ‖G‖_F``, Muon's quintic or the
  Polar Express coefficients (arXiv 2505.16932, Alg. 1: safety factor 1.01 on every polynomial but the last,
  ``X₀ = G / (1.01 ‖G‖_F)``); its singular values land in a band around 1 (``tests/unit/test_polar.py``).
* :class:`SVDPolar` — exact ``U Vᵀ``; directions with ``σ ≤ tol`` map to 0 (docs/DESIGN.md §2).

``dtype="auto"``: NS in bf16 on CUDA, fp32 on the CPU, fp64 inputs in fp64 (docs/DESIGN.md §5).
``compile=True`` runs the iterations through ``torch.compile`` (meant for CUDA; its first call per shape compiles;
README, "Benchmarks", and ``benchmarks/bench_lmo.py --compile``); on the CPU the result equals the eager one (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

QUINTIC: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)

# arXiv 2505.16932, Algorithm 1 (degree 5, before the safety factor). The last polynomial is the
# fixed point the schedule converges to; steps beyond the list repeat it.
_POLAR_EXPRESS_RAW: tuple[tuple[float, float, float], ...] = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
POLAR_EXPRESS_SAFETY = 1.01

CoefficientName = Literal["quintic", "polar_express"]
DtypeName = Literal["auto", "float32", "float64", "bfloat16", "float16"]


def coefficient_schedule(name: CoefficientName, steps: int) -> list[tuple[float, float, float]]:
    """Per-step ``(a, b, c)`` for ``steps`` iterations of the named scheme."""
    if steps < 1:
        raise ValueError(f"ns_steps must be >= 1, got {steps}")
    if name == "quintic":
        return [QUINTIC] * steps
    if name == "polar_express":
        s = POLAR_EXPRESS_SAFETY
        safe = [(a / s, b / s**3, c / s**5) for (a, b, c) in _POLAR_EXPRESS_RAW[:-1]]
        table = safe + [_POLAR_EXPRESS_RAW[-1]]
        return table[:steps] + [table[-1]] * max(0, steps - len(table))
    raise ValueError(f"ns_coefficients must be one of ['quintic', 'polar_express'], got {name!r}")


def resolve_dtype(dtype: DtypeName, like: Tensor) -> torch.dtype:
    """The dtype NS runs in: bf16 on CUDA, fp32 on CPU (fp64 stays fp64) when ``"auto"``."""
    if dtype == "auto":
        if like.is_cuda:
            return torch.bfloat16
        return torch.float64 if like.dtype == torch.float64 else torch.float32
    table = {"float32": torch.float32, "float64": torch.float64,
             "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ValueError(f"ns_dtype must be one of ['auto', {', '.join(map(repr, table))}], got {dtype!r}")
    return table[dtype]


def _frobenius_normalise(G: Tensor, safety: float) -> Tensor:
    """``G / (safety‖G‖_F)`` per matrix, robust to tiny and huge scales (pre-divides by max |G|)."""
    amax = G.abs().amax(dim=(-2, -1), keepdim=True)
    X = G / torch.where(amax > 0, amax, torch.ones_like(amax))
    fro = torch.linalg.matrix_norm(X, ord="fro", keepdim=True)
    return X / torch.where(fro > 0, fro * safety, torch.ones_like(fro))


def _iterate(X: Tensor, schedule: tuple[tuple[float, float, float], ...], safety: float) -> Tensor:
    """``X₀ = X / (safety‖X‖_F)``, then ``X ← a X + b (X Xᵀ) X + c (X Xᵀ)² X`` per ``(a, b, c)``."""
    X = _frobenius_normalise(X, safety)
    for a, b, c in schedule:
        A = X @ X.mT
        B = _fused_matmul(A, A, A, beta=b, alpha=c)  # b A + c A²
        X = _fused_matmul(X, B, X, beta=a, alpha=1.0)  # a X + B X
    return X


_COMPILED: list = []  # torch.compile(_iterate), made on first use (importing torch._dynamo is slow)


def _compiled_iterate():
    if not _COMPILED:
        _COMPILED.append(torch.compile(_iterate, dynamic=False))
    return _COMPILED[0]


def _fused_matmul(C: Tensor, A: Tensor, B: Tensor, *, beta: float, alpha: float) -> Tensor:
    """``beta·C + alpha·A@B`` in one BLAS call for 2-D and 3-D (batched) operands."""
    if C.ndim == 2:
        return torch.addmm(C, A, B, beta=beta, alpha=alpha)
    if C.ndim == 3:
        return torch.baddbmm(C, A, B, beta=beta, alpha=alpha)
    return beta * C + alpha * (A @ B)


@dataclass(frozen=True)
class NewtonSchulz:
    """Approximate ``U Vᵀ`` by ``steps`` odd-quintic Newton–Schulz iterations (see module doc)."""

    steps: int = 5
    coefficients: CoefficientName = "quintic"
    dtype: DtypeName = "auto"
    compile: bool = False  # run the iterations through torch.compile (module doc)

    def __post_init__(self) -> None:
        coefficient_schedule(self.coefficients, self.steps)  # validates both fields
        if not isinstance(self.compile, bool):
            raise ValueError(f"ns_compile must be true or false, got {self.compile!r}")

    def __call__(self, G: Tensor) -> Tensor:
        if G.ndim < 2:
            raise ValueError(f"polar factor needs a matrix, got shape {tuple(G.shape)}")
        work = resolve_dtype(self.dtype, G)
        wide = G.shape[-2] <= G.shape[-1]
        X = G if wide else G.mT  # iterate on the wide orientation: X Xᵀ is the smaller Gram
        safety = POLAR_EXPRESS_SAFETY if self.coefficients == "polar_express" else 1.0
        schedule = tuple(coefficient_schedule(self.coefficients, self.steps))
        X = (_compiled_iterate() if self.compile else _iterate)(X.to(work), schedule, safety)
        X = X if wide else X.mT
        return X.to(G.dtype)


@dataclass(frozen=True)
class SVDPolar:
    """Exact ``U Vᵀ`` by SVD; directions with ``σ ≤ rtol · σ_max`` (or σ = 0) map to 0."""

    rtol: float | None = None  # default: max(m, n) · eps(dtype)

    def __call__(self, G: Tensor) -> Tensor:
        if G.ndim < 2:
            raise ValueError(f"polar factor needs a matrix, got shape {tuple(G.shape)}")
        work = torch.float64 if G.dtype == torch.float64 else torch.float32
        X = G.to(work)
        amax = X.abs().amax(dim=(-2, -1), keepdim=True)
        X = X / torch.where(amax > 0, amax, torch.ones_like(amax))
        U, S, Vh = torch.linalg.svd(X, full_matrices=False)
        rtol = self.rtol if self.rtol is not None else max(G.shape[-2:]) * torch.finfo(work).eps
        keep = (S > rtol * S[..., :1]) & (S > 0)
        out = (U * keep.unsqueeze(-2).to(work)) @ Vh
        return out.to(G.dtype)


PolarOracle = NewtonSchulz | SVDPolar


def make_polar(method: str = "newton_schulz", *, steps: int = 5, coefficients: CoefficientName = "quintic",
               dtype: DtypeName = "auto", compile: bool = False) -> PolarOracle:
    """Build a polar oracle from config values (``method`` ∈ {"newton_schulz", "svd"}; ``compile``
    applies to Newton–Schulz only)."""
    if method == "newton_schulz":
        return NewtonSchulz(steps=steps, coefficients=coefficients, dtype=dtype, compile=compile)
    if compile is not False:
        raise ValueError(f"ns_compile applies to spectral_method 'newton_schulz', got {method!r}")
    if method == "svd":
        return SVDPolar()
    raise ValueError(f"spectral_method must be one of ['newton_schulz', 'svd'], got {method!r}")
