"""The layer-wise LMO step, shared by the single-machine optimizer and the federated server.

For every parameter i (Gluon Alg. 1; Scion's step in docs/DESIGN.md §2 sign convention)::

    X_i ← (1 − λ · t_i/ρ_i) · X_i + t_i · lmo_i(G_i)

with radius ``t_i`` from the radius rule, multiplier ρ_i from the geometry and decoupled weight
decay λ (Muon's ``p·(1 − lr·wd)``: with a scheduled radius ``t_i/ρ_i = γ_k`` is the learning rate).
Scion's *constrained* mode (docs/ALGORITHMS.md §4) is ``λ = 1``: ``X_i ← (1 − γ)X_i + γ·ρ_i lmo_i(G_i)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from fedgluon.lmo.geometry import Geometry
from fedgluon.lmo.radius import GluonAdaptive, Scheduled

Tensors = dict[str, Tensor]


@dataclass
class StepInfo:
    """What one LMO step did: per-parameter radius and dual norm of the estimate (−<G, lmo(G)>); for a block's
    rows, per-parameter tensors of shape (R,) (float64 radii: each row's value as a single step has it)."""

    radii: dict[str, float] | dict[str, Tensor]
    dual_norms: dict[str, float] | dict[str, Tensor]


@dataclass
class LMOStep:
    """``X ↦ X + t ⊙ lmo(G)`` layer-wise, with weight decay / constrained mode (module doc).

    The tensors are one model's (``(*shape)`` each) or a block's rows (``(R, *shape)`` each: one step per
    row, every row's LMOs of a shape in one batched call, each row's radius from its own dual norms)."""

    geometry: Geometry
    radius_rule: Scheduled | GluonAdaptive
    weight_decay: float = 0.0
    constrained: bool = False

    def __post_init__(self) -> None:
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.constrained and self.weight_decay not in (0.0, 1.0):
            raise ValueError("constrained=True fixes weight_decay to 1; leave weight_decay at 0")

    @property
    def decay(self) -> float:
        return 1.0 if self.constrained else self.weight_decay

    def shrink(self, info: StepInfo, name: str) -> float | Tensor:
        """The weight-decay factor ``1 − λ t_i/ρ_i`` of parameter ``name`` in a step with radii ``info.radii``
        (per row for a block: shape (R,))."""
        return 1.0 - self.decay * info.radii[name] / self.geometry.params[name].radius

    def directions(self, estimate: Mapping[str, Tensor], k: int,
                   given: tuple[Mapping[str, Tensor], Mapping[str, Tensor]] | None = None) -> tuple[Tensors, StepInfo]:
        """The displacement ``t_i lmo_i(G_i)`` of every parameter (before weight decay), per row for a block;
        ``given``: the LMOs and dual norms (:meth:`Geometry.lmo_and_dual`'s pair) computed by the caller."""
        dirs, duals = given if given is not None else self.geometry.lmo_and_dual(estimate)
        one = next(iter(duals.values()), torch.zeros(())).ndim == 0
        if one:
            radii = self.radius_rule.radii(k, self.geometry, duals)
            info = StepInfo(radii={n: float(t) for n, t in radii.items()},
                            dual_norms={n: float(d) for n, d in duals.items()})
            return {n: d * radii[n] for n, d in dirs.items()}, info
        row_radii, host = self._row_radii(duals, k)
        return ({n: d * _per_row(row_radii[n], d) for n, d in dirs.items()},
                StepInfo(radii=row_radii, dual_norms=host))

    def _row_radii(self, duals: Mapping[str, Tensor], k: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Each row's radii, the rule's for that row's dual norms (computed once when it reads none), and the
        dual norms as float64 on the host."""
        rows = len(next(iter(duals.values())))
        host = {n: d.double().cpu() for n, d in duals.items()}
        if self.radius_rule.needs_dual_norms:
            each = [self.radius_rule.radii(k, self.geometry, {n: d[i] for n, d in host.items()})
                    for i in range(rows)]
            radii = {n: torch.tensor([float(r[n]) for r in each], dtype=torch.float64) for n in duals}
        else:
            radii = {n: torch.full((rows,), float(t), dtype=torch.float64)
                     for n, t in self.radius_rule.radii(k, self.geometry, None).items() if n in duals}
        return radii, host

    def decayed(self, x: Tensor, info: StepInfo, name: str, *, inplace: bool = False) -> Tensor:
        """``s_i · x`` with ``s_i`` the step's weight-decay factor (:meth:`shrink`; per row for a block), ``x``
        itself where ``s_i = 1``."""
        s = self.shrink(info, name)
        if isinstance(s, Tensor):
            s = _per_row(s, x)
        elif s == 1.0:
            return x
        return x.mul_(s) if inplace else x * s

    def apply(self, params: Mapping[str, Tensor], estimate: Mapping[str, Tensor], k: int,
              *, inplace: bool = False,
              given: tuple[Mapping[str, Tensor], Mapping[str, Tensor]] | None = None) -> tuple[Tensors, StepInfo]:
        """New parameters after one step (written into ``params`` when ``inplace``; ``given`` as in
        :meth:`directions`)."""
        moves, info = self.directions(estimate, k, given)
        out = {}
        with torch.no_grad():
            for name, x in params.items():
                move = moves[name].to(x.dtype)
                decayed = self.decayed(x, info, name, inplace=inplace)
                out[name] = decayed.add_(move) if inplace else decayed + move
        return out, info


def _per_row(values: Tensor, like: Tensor) -> Tensor:
    """Per-row scalars ``(R,)`` as ``like``'s dtype, shaped to multiply its rows ``(R, *shape)``: each is
    rounded to that dtype first, as a Python float is when it multiplies a tensor."""
    return values.to(like.dtype).to(like.device).reshape(-1, *([1] * (like.ndim - 1)))
