"""Per-layer norms, their unit-ball LMOs and dual norms (one class per norm, after Scion).

Every norm here is ``‖X‖ = c · base(X)`` for a positive shape factor ``c`` (docs/DESIGN.md §2, "Norm
scaling"), so its unit-ball minimiser and dual norm carry the inverse factor::

    lmo(G) = argmin_{‖U‖ ≤ 1} <G, U> = (1/c) · lmo_base(G),      ‖G‖_* = (1/c) · base_*(G)

and ``<G, lmo(G)> = −‖G‖_*``, ``‖lmo(G)‖ = 1`` (0 for G = 0); the sign convention of docs/DESIGN.md §2.
Every method acts on a batch ``(B, *param_shape)`` of same-shape parameters; ``norm``/``dual`` return ``(B,)``.
The classes' base norms, LMOs and duals (after LIONS-EPFL/scion ``scion.py``): docs/ALGORITHMS.md §1.1.

``Identity`` is *not* a norm ball: its "LMO" is ``−G/c``, so the step follows the estimate itself. It serves
parameters whose estimator already returns the step direction, such as the AdamW part of the Muon-MVR
reference form (:class:`fedgluon.lmo.estimators.MuonMVR`); with another estimator it is plain (momentum) SGD.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedgluon.lmo.polar import NewtonSchulz, PolarOracle, SVDPolar


def _safe(x: Tensor) -> Tensor:
    return torch.where(x > 0, x, torch.ones_like(x))


def _unit_and_norm(G: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """``(G/‖G‖₂, ‖G‖₂)`` over ``dims`` (keepdim), robust to under/overflow; 0 where G = 0."""
    amax = G.abs().amax(dim=dims, keepdim=True)
    scaled = G / _safe(amax)
    n = torch.linalg.vector_norm(scaled, dim=dims, keepdim=True)
    return scaled / _safe(n), n * amax


def _batch_dims(G: Tensor) -> tuple[int, ...]:
    return tuple(range(1, G.ndim))


@dataclass(frozen=True)
class Norm(ABC):
    """``‖X‖ = factor · base(X)`` on tensors of one parameter shape (batched over dim 0)."""

    factor: float = 1.0
    name: str = field(default="norm", init=False)

    def __post_init__(self) -> None:
        if not (self.factor > 0 and math.isfinite(self.factor)):
            raise ValueError(f"norm factor must be a positive finite number, got {self.factor}")

    @abstractmethod
    def _lmo_base(self, G: Tensor) -> Tensor: ...

    @abstractmethod
    def _norm_base(self, X: Tensor) -> Tensor: ...

    @abstractmethod
    def _dual_base(self, G: Tensor) -> Tensor: ...

    def lmo(self, G: Tensor) -> Tensor:
        """Unit-ball minimiser ``argmin_{‖U‖≤1} <G, U>`` for each of the B tensors in ``G``."""
        return self._lmo_base(G) / self.factor

    def norm(self, X: Tensor) -> Tensor:
        return self._norm_base(X) * self.factor

    def dual(self, G: Tensor) -> Tensor:
        """Exact dual norm ``‖G‖_*`` (the spectral norm uses singular values, not NS)."""
        return self._dual_base(G) / self.factor

    def lmo_and_dual(self, G: Tensor) -> tuple[Tensor, Tensor]:
        """``(lmo(G), −<G, lmo(G)>)``: the dual norm as a by-product of the LMO.

        Exact for every norm but NS-spectral, where it is the NS estimate of ‖G‖_* (the one a step
        actually realises); this is what adaptive radii use.
        """
        U = self.lmo(G)
        return U, -(G * U).flatten(1).sum(dim=1)

    def describe(self) -> str:
        return f"{self.name}(c={self.factor:.4g})"


@dataclass(frozen=True)
class Spectral(Norm):
    """``c · σ_max`` of the ``(shape[0], prod(shape[1:]))`` reshape; conv kernels included.

    The polar factor comes from ``oracle`` (Newton–Schulz by default, or exact SVD).
    """

    oracle: PolarOracle = field(default_factory=NewtonSchulz)
    name: str = field(default="spectral", init=False)

    @staticmethod
    def _as_matrix(G: Tensor) -> Tensor:
        return G.reshape(G.shape[0], G.shape[1], -1) if G.ndim > 2 else G.unsqueeze(-1)

    def _lmo_base(self, G: Tensor) -> Tensor:
        return -self.oracle(self._as_matrix(G)).reshape(G.shape)

    def _norm_base(self, X: Tensor) -> Tensor:
        return torch.linalg.matrix_norm(self._as_matrix(X).to(_exact(X)), ord=2).to(X.dtype)

    def _dual_base(self, G: Tensor) -> Tensor:
        return torch.linalg.matrix_norm(self._as_matrix(G).to(_exact(G)), ord="nuc").to(G.dtype)

    def describe(self) -> str:
        kind = "svd" if isinstance(self.oracle, SVDPolar) else \
            f"ns{self.oracle.steps}-{self.oracle.coefficients}"
        return f"spectral[{kind}](c={self.factor:.4g})"


def _exact(X: Tensor) -> torch.dtype:
    return torch.float64 if X.dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class Sign(Norm):
    """``c · max |X_ij|``; LMO ``−sign(G)/c``, dual ``Σ|G|/c`` (Scion's Sign; c = d_in normalised)."""

    name: str = field(default="sign", init=False)

    def _lmo_base(self, G: Tensor) -> Tensor:
        return -torch.sign(G)

    def _norm_base(self, X: Tensor) -> Tensor:
        return X.abs().flatten(1).amax(dim=1)

    def _dual_base(self, G: Tensor) -> Tensor:
        return G.abs().flatten(1).sum(dim=1)


@dataclass(frozen=True)
class _GroupedEuclidean(Norm):
    """``c · max_g ‖X_g‖₂`` over groups g, the slices of X along :meth:`_dims` (by default all of X: one
    group); LMO ``−G_g/(c‖G_g‖₂)`` per group, dual ``Σ_g ‖G_g‖₂/c``."""

    def _dims(self, G: Tensor) -> tuple[int, ...]:
        return _batch_dims(G)

    def _lmo_base(self, G: Tensor) -> Tensor:
        return -_unit_and_norm(G, self._dims(G))[0]

    def _group_norms(self, G: Tensor) -> Tensor:
        n = _unit_and_norm(G, self._dims(G))[1]
        return n.flatten(1) if n.ndim > 1 else n.unsqueeze(1)

    def _norm_base(self, X: Tensor) -> Tensor:
        return self._group_norms(X).amax(dim=1)

    def _dual_base(self, G: Tensor) -> Tensor:
        return self._group_norms(G).sum(dim=1)

    def _matrix_axis(self, G: Tensor, dim: int) -> tuple[int, ...]:
        """``(dim,)``, the axis of a block of matrices ``G`` (B, d_out, d_in) whose slices are the groups."""
        if G.ndim != 3:
            raise ValueError(f"{self.name} norm needs 2-D parameters, got shape {tuple(G.shape[1:])}")
        return (dim,)


@dataclass(frozen=True)
class ColNorm(_GroupedEuclidean):
    """``c · max_j ‖X[:, j]‖₂`` (columns of the stored (d_out, d_in) matrix)."""

    name: str = field(default="col", init=False)

    def _dims(self, G: Tensor) -> tuple[int, ...]:
        return self._matrix_axis(G, 1)


@dataclass(frozen=True)
class RowNorm(_GroupedEuclidean):
    """``c · max_i ‖X[i, :]‖₂`` (rows; for an embedding table, one row per token)."""

    name: str = field(default="row", init=False)

    def _dims(self, G: Tensor) -> tuple[int, ...]:
        return self._matrix_axis(G, 2)


@dataclass(frozen=True)
class Euclidean(_GroupedEuclidean):
    """``c · ‖X‖_F``; with ``c = 1/sqrt(numel)`` this is the RMS norm of Scion's BiasRMS."""

    name: str = field(default="euclidean", init=False)


@dataclass(frozen=True)
class RMS(Euclidean):
    """RMS norm ``‖x‖₂ / sqrt(d)`` (Euclidean with c = 1/sqrt(d)): LMO ``−sqrt(d) g/‖g‖₂``, dual ``sqrt(d)‖g‖₂``."""

    name: str = field(default="rms", init=False)


def rms(shape: tuple[int, ...]) -> RMS:
    """The RMS norm for parameters of ``shape``."""
    return RMS(factor=1.0 / math.sqrt(max(1, math.prod(shape))))


@dataclass(frozen=True)
class Identity(Euclidean):
    """Not an LMO (module doc): ``lmo(G) = −G/c``; norm ``c‖X‖_F`` and dual ``‖G‖_F/c`` for reporting.

    :meth:`lmo_and_dual` returns this Euclidean dual norm, not ``−<G, lmo(G)> = ‖G‖_F²/c``.
    """

    name: str = field(default="identity", init=False)

    def _lmo_base(self, G: Tensor) -> Tensor:
        return -G

    def lmo_and_dual(self, G: Tensor) -> tuple[Tensor, Tensor]:
        return self.lmo(G), self.dual(G)
