"""Layer-wise geometry: for every named parameter, its role, norm (with shape factor), LMO, dual
norm and radius multiplier ρ_i (docs/DESIGN.md §3 "Geometry").

Roles. Shape alone cannot tell an embedding or an output head from a hidden matrix, so models
declare them: a model may carry ``parameter_roles = {"head.*": "head", "tok_emb.*": "embedding"}``
(fnmatch patterns on parameter names), or the caller passes ``roles=``. Undeclared parameters get
a role from their shape: ≥3-D → ``conv``, 2-D → ``hidden``, ≤1-D → ``vector``.

Presets (role → norm, with shape factors c): :data:`PRESETS`, tabled in docs/ALGORITHMS.md §1.1 (Scion's
SpectralConv divides by k² for a k×k kernel). ``muon_mvr`` is the Muon-MVR code's geometry (ALGORITHMS §6,
:class:`fedgluon.lmo.estimators.MuonMVR`); it goes by shape, not role.

Overrides: ``[{"pattern": "head.*", "norm": "col", "factor": 2.0, "radius": 16.0}, ...]``; later
entries win. ``norm`` is one of :data:`NORM_NAMES`; without ``factor`` the norm's default rule for
that shape is used. ``radius`` multipliers can also be given per role (``radius={"head": 16}``).

Device (``lmo_device``; README, "Running on Flower and Ray", **GPU**): where the spectral LMOs run. ``"auto"``
(default) moves each stacked group of spectral matrices on the CPU to the GPU when torch sees one and back
(tensors on a GPU stay there); ``"same"`` runs every LMO where its tensors are; ``"cpu"`` / ``"cuda"`` /
``"cuda:N"`` name a device. Other norms always run where their tensors are. NS runs in bf16 on a GPU, so compare
runs made on the same kind of machine, or set ``lmo_device: same``.
"""

from __future__ import annotations

import fnmatch
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from fedgluon.core.devices import resolve_device
from fedgluon.lmo.norms import ColNorm, Euclidean, Identity, Norm, RowNorm, Sign, Spectral, rms
from fedgluon.lmo.polar import CoefficientName, DtypeName, PolarOracle, make_polar

_T = TypeVar("_T")

ROLES = ("hidden", "conv", "embedding", "head", "vector")
PRESETS = ("scion", "muon", "euclidean", "sign", "muon_mvr")
Tensors = dict[str, Tensor]


def _d_out_d_in(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) < 2:
        return (math.prod(shape) if shape else 1), 1
    return shape[0], math.prod(shape[1:])


def _scion_spectral_factor(shape: tuple[int, ...]) -> float:
    d_out, d_in = _d_out_d_in(shape)
    k = math.prod(shape[2:]) if len(shape) > 2 else 1
    c_in = shape[1] if len(shape) > 2 else d_in
    return k * math.sqrt(c_in / d_out)


def _muon_spectral_factor(shape: tuple[int, ...]) -> float:
    d_out, d_in = _d_out_d_in(shape)
    return 1.0 / math.sqrt(max(1.0, d_out / d_in))


def _moonlight_spectral_factor(shape: tuple[int, ...]) -> float:
    """``1/(0.2·sqrt(max(d_out, d_in)))``: the LMO step is then ``lr·0.2·sqrt(max(m, n))·UVᵀ`` (Moonlight)."""
    return 1.0 / (0.2 * math.sqrt(max(_d_out_d_in(shape))))


NormFactory = Callable[[tuple[int, ...], PolarOracle, "float | None"], Norm]


def _spectral(rule: Callable[[tuple[int, ...]], float]) -> NormFactory:
    return lambda shape, oracle, f: Spectral(factor=f if f is not None else rule(shape), oracle=oracle)


NORMS: dict[str, NormFactory] = {
    "spectral": _spectral(_scion_spectral_factor),
    "spectral_muon": _spectral(_muon_spectral_factor),
    "spectral_unscaled": _spectral(lambda shape: 1.0),
    "sign": lambda shape, o, f: Sign(factor=f if f is not None else float(_d_out_d_in(shape)[1])),
    "sign_unscaled": lambda shape, o, f: Sign(factor=f if f is not None else 1.0),
    "col": lambda shape, o, f: ColNorm(factor=f if f is not None else 1.0 / math.sqrt(shape[0])),
    "row": lambda shape, o, f: RowNorm(factor=f if f is not None else 1.0 / math.sqrt(shape[-1])),
    "rms": lambda shape, o, f: rms(shape) if f is None else Euclidean(factor=f),
    "euclidean": lambda shape, o, f: Euclidean(factor=f if f is not None else 1.0),
    "spectral_moonlight": _spectral(_moonlight_spectral_factor),
    "identity": lambda shape, o, f: Identity(factor=f if f is not None else 1.0),
}
NORM_NAMES = tuple(NORMS)

_PRESET_RULES: dict[str, dict[str, str]] = {
    "scion": {"hidden": "spectral", "conv": "spectral", "embedding": "row", "head": "sign", "vector": "rms"},
    "muon": {"hidden": "spectral_muon", "conv": "spectral_muon", "embedding": "row", "head": "sign",
             "vector": "rms"},
    "euclidean": {r: "euclidean" for r in ROLES},
    "sign": {r: "sign_unscaled" for r in ROLES},
}


def _preset_norm(preset: str, role: str, shape: tuple[int, ...]) -> str:
    """The norm a preset gives a parameter: by role, except ``muon_mvr``, which goes by shape as its code does."""
    if preset == "muon_mvr":
        return "spectral_moonlight" if len(shape) == 2 else "identity"
    return _PRESET_RULES[preset][role]


def check_muon_mvr_reference(geometry: Geometry, field_name: str) -> None:
    """ValueError unless ``geometry`` is shaped like the Muon-MVR code's: every 2-D parameter spectral and
    every other one ``identity`` (the ``muon_mvr`` preset), which the ``reference`` form of ``muon_mvr1/2``
    needs: that form hands the LMO the momentum of matrices and the finished AdamW direction of the rest."""
    wrong = [p.name for p in geometry if not isinstance(p.norm, Spectral if len(p.shape) == 2 else Identity)]
    if wrong:
        raise ValueError(f"{field_name} 'reference' needs geometry.preset 'muon_mvr' (2-D parameters spectral, "
                         f"the others identity); parameters {wrong} have other norms")


@dataclass(frozen=True)
class ParamGeometry:
    """One parameter's geometry: the norm it is measured in and its radius multiplier ρ_i."""

    name: str
    shape: tuple[int, ...]
    role: str
    norm: Norm
    radius: float = 1.0


def _choose(name: str, patterns: Iterable[tuple[str, _T]]) -> _T | None:
    hit = None
    for pattern, value in patterns:
        if fnmatch.fnmatchcase(name, pattern):
            hit = value
    return hit


def _role_from_shape(shape: tuple[int, ...]) -> str:
    return "conv" if len(shape) >= 3 else "hidden" if len(shape) == 2 else "vector"


def resolve_lmo_device(name: str) -> torch.device | None:
    """The device ``lmo_device`` names (module doc), or None for "where the tensors are" (``same``, and
    ``auto`` without a GPU); ValueError naming the field for anything else, or for a GPU torch cannot see."""
    if name == "same":
        return None
    device = resolve_device("geometry.lmo_device", name, extra=("same",))
    return None if name == "auto" and device.type == "cpu" else device


def _lead(t: Tensor, shape: tuple[int, ...], name: str) -> torch.Size:
    """The axes of ``t`` before parameter ``name``'s shape (none for one model, (R,) for a block's rows)."""
    if t.ndim < len(shape) or tuple(t.shape[t.ndim - len(shape):]) != shape:
        raise ValueError(f"{name!r} has shape {tuple(t.shape)}: expected {shape} or (rows, *{shape})")
    return t.shape[:t.ndim - len(shape)]


def _check_choice(field_name: str, value: object, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{field_name} must be one of {list(allowed)}, got {value!r}")


class Geometry:
    """The per-parameter geometry of a model, with batched LMO / dual-norm application."""

    def __init__(self, params: Iterable[ParamGeometry], lmo_device: str = "auto"):
        self.params: dict[str, ParamGeometry] = {p.name: p for p in params}
        self.lmo_device = lmo_device
        self._device = resolve_lmo_device(lmo_device)  # None: where the tensors are
        groups: dict[tuple[Norm, tuple[int, ...]], list[str]] = defaultdict(list)
        for p in self.params.values():
            groups[(p.norm, p.shape)].append(p.name)
        self._groups = dict(groups)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_shapes(
        cls,
        shapes: Mapping[str, Sequence[int]],
        *,
        preset: str = "scion",
        roles: Mapping[str, str] | None = None,
        overrides: Sequence[Mapping[str, Any]] = (),
        radius: Mapping[str, float] | None = None,
        spectral_method: str = "newton_schulz",
        ns_steps: int = 5,
        ns_coefficients: CoefficientName = "quintic",
        ns_dtype: DtypeName = "auto",
        ns_compile: bool = False,
        lmo_device: str = "auto",
    ) -> Geometry:
        """Assign norms to named shapes by role rules, the preset, then pattern overrides."""
        _check_choice("geometry.preset", preset, PRESETS)
        oracle = make_polar(spectral_method, steps=ns_steps, coefficients=ns_coefficients, dtype=ns_dtype,
                            compile=ns_compile)
        role_patterns = list((roles or {}).items())
        for pattern, role in role_patterns:
            _check_choice(f"geometry.roles[{pattern!r}]", role, ROLES)
        for key in radius or {}:
            _check_choice("geometry.radius key", key, ROLES)
        for i, o in enumerate(overrides):
            unknown = set(o) - {"pattern", "norm", "factor", "radius"}
            if unknown or "pattern" not in o:
                raise ValueError(f"geometry.overrides[{i}] takes keys pattern (required), norm, factor, "
                                 f"radius; got {sorted(o)}")
            if "norm" in o:
                _check_choice(f"geometry.overrides[{i}].norm", o["norm"], NORM_NAMES)
        params = []
        for name, shape in shapes.items():
            shape = tuple(int(s) for s in shape)
            role = _choose(name, role_patterns) or _role_from_shape(shape)
            norm_name = _preset_norm(preset, str(role), shape)
            factor = None
            rho = float((radius or {}).get(role, 1.0))
            for o in overrides:
                if fnmatch.fnmatchcase(name, str(o["pattern"])):
                    norm_name = str(o.get("norm", norm_name))
                    factor = float(o["factor"]) if o.get("factor") is not None else factor
                    rho = float(o["radius"]) if o.get("radius") is not None else rho
            if rho <= 0 or not math.isfinite(rho):
                raise ValueError(f"radius multiplier of {name!r} must be positive and finite, got {rho}")
            norm = NORMS[norm_name](shape, oracle, factor)
            params.append(ParamGeometry(name, shape, str(role), norm, rho))
        return cls(params, lmo_device)

    @classmethod
    def from_model(cls, model: nn.Module, **kwargs) -> Geometry:
        """Geometry of ``model``'s trainable parameters; roles from ``model.parameter_roles``."""
        roles = dict(getattr(model, "parameter_roles", {}) or {})
        roles.update(kwargs.pop("roles", None) or {})
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
        return cls.from_shapes(shapes, roles=roles, **kwargs)

    # ------------------------------------------------------------------ application
    def __iter__(self):
        return iter(self.params.values())

    def __len__(self) -> int:
        return len(self.params)

    def _apply(self, tensors: Mapping[str, Tensor], fn: Callable[[Norm, Tensor], object]) -> dict:
        """Run ``fn(norm, stacked)`` once per (norm, shape) group. A tensor is one parameter ``(*shape)`` or a
        block's rows of it ``(R, *shape)`` (the same R for every tensor); ``stacked`` is ``(P·R, *shape)``,
        the group's P parameters' rows in one batch, and each result comes back with the tensor's leading
        axes: ``(*lead, *result)`` (a dual norm per row: ``(R,)``)."""
        out: dict[str, object] = {}
        first: torch.Size | None = None
        for (norm, shape), names in self._groups.items():
            present = [n for n in names if n in tensors]
            if not present:
                continue
            leads = {n: _lead(tensors[n], shape, n) for n in present}
            first = leads[present[0]] if first is None else first
            if any(lead != first for lead in leads.values()):
                raise ValueError(f"every tensor must have the same leading axes (one model: none; a block: its "
                                 f"rows), got {tuple(first)} and others among {present}: {leads}")
            lead = first
            stacked = torch.cat([tensors[n].reshape(-1, *shape) for n in present])
            home = stacked.device
            target = self._target(norm, home)
            result = fn(norm, stacked if target == home else stacked.to(target))
            parts = result if isinstance(result, tuple) else (result,)
            if target != home:
                parts = tuple(r.to(home) for r in parts)
            rows = math.prod(lead)
            for i, n in enumerate(present):
                picked = tuple(r[i * rows:(i + 1) * rows].reshape((*lead, *r.shape[1:])) for r in parts)
                out[n] = picked if isinstance(result, tuple) else picked[0]
        return out

    def _target(self, norm: Norm, home: torch.device) -> torch.device:
        """Where a group of ``norm`` lying on ``home`` is computed (module doc, "Device")."""
        if self._device is None or not isinstance(norm, Spectral):
            return home
        if self.lmo_device == "auto" and home.type != "cpu":
            return home
        return self._device

    def lmo(self, tensors: Mapping[str, Tensor]) -> Tensors:
        """Layer-wise unit-ball minimisers ``lmo_i(G_i)``; same-shape matrices in one batched call."""
        return self._apply(tensors, lambda norm, G: norm.lmo(G))

    def lmo_and_dual(self, tensors: Mapping[str, Tensor]) -> tuple[Tensors, Tensors]:
        """``(lmo_i(G_i), −<G_i, lmo_i(G_i)>)`` for every i (see :meth:`Norm.lmo_and_dual`)."""
        both = self._apply(tensors, lambda norm, G: norm.lmo_and_dual(G))
        return ({n: v[0] for n, v in both.items()}, {n: v[1] for n, v in both.items()})

    def dual_norms(self, tensors: Mapping[str, Tensor]) -> Tensors:
        """Exact dual norms ``‖G_i‖_(i)*`` (nuclear norm by SVD for spectral layers)."""
        return self._apply(tensors, lambda norm, G: norm.dual(G))

    def norms(self, tensors: Mapping[str, Tensor]) -> Tensors:
        """Primal norms ``‖X_i‖_(i)``."""
        return self._apply(tensors, lambda norm, X: norm.norm(X))

    def describe(self) -> list[dict[str, object]]:
        """One row per parameter: name, shape, role, norm, radius (for logs and the CLI)."""
        return [{"name": p.name, "shape": "x".join(map(str, p.shape)) or "scalar", "role": p.role,
                 "norm": p.norm.describe(), "radius": p.radius} for p in self.params.values()]
