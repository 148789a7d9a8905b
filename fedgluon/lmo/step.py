"""The layer-wise LMO step, shared by the single-machine optimizer and the federated server.

For every parameter i (Gluon Alg. 1; Scion's step in docs/DESIGN.md §2 sign convention)::

    X_i ← (1 − λ · t_i/ρ_i) · X_i + t_i · lmo_i(G_i)

with radius ``t_i`` from the radius rule, multiplier ρ_i from the geometry and decoupled weight
decay λ (Muon's ``p·(1 − lr·wd)``: with a scheduled radius ``t_i/ρ_i = γ_k`` is the learning rate).
Scion's *constrained* mode is ``λ = 1``: ``X_i ← (1 − γ)X_i + γ·ρ_i lmo_i(G_i)``, a Frank–Wolfe step
that keeps ``‖X_i‖ ≤ ρ_i`` once inside the ball.
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
    """What one LMO step did: per-parameter radius and dual norm of the estimate (−<G, lmo(G)>)."""

    radii: dict[str, float]
    dual_norms: dict[str, float]


@dataclass
class LMOStep:
    """``X ↦ X + t ⊙ lmo(G)`` layer-wise, with weight decay / constrained mode (module doc)."""

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

    def shrink(self, info: StepInfo, name: str) -> float:
        """The weight-decay factor ``1 − λ t_i/ρ_i`` of parameter ``name`` in a step with radii ``info.radii``."""
        return 1.0 - self.decay * info.radii[name] / self.geometry.params[name].radius

    def directions(self, estimate: Mapping[str, Tensor], k: int) -> tuple[Tensors, StepInfo]:
        """The displacement ``t_i lmo_i(G_i)`` of every parameter (before weight decay)."""
        dirs, duals = self.geometry.lmo_and_dual(estimate)
        radii = self.radius_rule.radii(k, self.geometry, duals)
        info = StepInfo(radii={n: float(t) for n, t in radii.items()},
                        dual_norms={n: float(d) for n, d in duals.items()})
        return {n: d * radii[n] for n, d in dirs.items()}, info

    def apply(self, params: Mapping[str, Tensor], estimate: Mapping[str, Tensor], k: int,
              *, inplace: bool = False) -> tuple[Tensors, StepInfo]:
        """New parameters after one step (written into ``params`` when ``inplace``)."""
        moves, info = self.directions(estimate, k)
        out = {}
        with torch.no_grad():
            for name, x in params.items():
                shrink = self.shrink(info, name)
                move = moves[name].to(x.dtype)
                if inplace:
                    out[name] = x.mul_(shrink).add_(move) if shrink != 1.0 else x.add_(move)
                else:
                    out[name] = x * shrink + move if shrink != 1.0 else x + move
        return out, info
