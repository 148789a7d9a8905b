"""``fedgluon.lmo.optim.Gluon``: one ``torch.optim.Optimizer`` for Muon, Scion, Gluon, Gluon-MVR,
Muon-MVR1/2, Gluon-SARAH and LiMuon, assembled from named parts::

    estimate = estimator(g(X^k; ξ_k) [, g(X^{k−1}; ξ_k)])       # fedgluon.lmo.estimators
    X_i     ← (1 − λ t_i/ρ_i) X_i + t_i · lmo_i(estimate_i)     # fedgluon.lmo.step, per-layer geometry

Every parameter (1-D, conv and embeddings included) gets its own norm from the geometry.

**Closure protocol.** Estimators that need the gradient at the previous iterate on the *same*
minibatch (``mvr``, ``muon_mvr2``, ``sarah``, ``limuon``) call the closure twice per step: once
at ``X^k`` and once with the parameters temporarily set to ``X^{k−1}``. The closure must therefore
compute the loss on a batch it captured (not draw a new one) and call ``backward()``::

    for x, y in loader:
        def closure():
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)

SARAH/PAGE refreshes its estimate with a large-batch gradient on the steps its
:class:`~fedgluon.lmo.estimators.RefreshPolicy` draws (step 0 always); pass
``opt.step(closure, refresh_closure=big_closure)``, where ``big_closure`` computes the loss on a
large batch. A forward pass at ``X^{k−1}`` also updates BatchNorm running statistics; evaluate such
models in ``eval()`` mode in the closure if that matters.

**Two forms of Muon-MVR** (docs/ALGORITHMS.md §6): ``Gluon(model, method="muon-mvr2")`` is fedgluon's,
``Gluon(model, method="muon-mvr2", form="reference", lr=3e-3)`` the published code's update
(:class:`~fedgluon.lmo.estimators.MuonMVR` states it in full).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from fedgluon.core.rng import generator
from fedgluon.lmo.estimators import FORMS, Estimator, RefreshPolicy, make_estimator
from fedgluon.lmo.estimators import OPTIONS as ESTIMATOR_OPTIONS
from fedgluon.lmo.geometry import Geometry, check_muon_mvr_reference
from fedgluon.lmo.radius import make_radius_rule, make_schedule
from fedgluon.lmo.step import LMOStep, StepInfo

# Method presets: defaults that a user's keyword arguments override.
METHODS: dict[str, dict[str, Any]] = {
    "muon": {"preset": "muon", "estimator": "ema", "beta": 0.95, "nesterov": True},
    "scion": {"preset": "scion", "estimator": "ema", "beta": 0.9},
    "gluon": {"preset": "scion", "estimator": "ema", "beta": 0.9, "schedule": "polynomial", "power": 0.75},
    "gluon-mvr": {"preset": "scion", "estimator": "mvr", "beta": 0.9, "schedule": "polynomial", "power": 2 / 3},
    "muon-mvr1": {"preset": "muon", "estimator": "muon_mvr1", "beta": 0.95, "gamma": 0.025},
    "muon-mvr2": {"preset": "muon", "estimator": "muon_mvr2", "beta": 0.95, "gamma": 0.025},
    "gluon-sarah": {"preset": "scion", "estimator": "sarah", "refresh_prob": 0.1, "schedule": "polynomial",
                    "power": 0.5},
    "limuon": {"preset": "muon", "estimator": "limuon", "beta": 0.9, "rank": 8},
}


def _keyword_only(fn: Callable[..., Any]) -> tuple[str, ...]:
    return tuple(n for n, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY)


_GEOMETRY_KEYS = _keyword_only(Geometry.from_shapes)
_ESTIMATOR_KEYS = tuple(k for k in ESTIMATOR_OPTIONS if k != "seed")  # the optimizer's own seed seeds LiMuon
_SCHEDULE_KEYS = _keyword_only(make_schedule)


def _method_config(method: str, options: Mapping[str, Any], estimator: Estimator | str | None) -> dict[str, Any]:
    """The method's defaults updated by the user's options; ``form="reference"`` (muon-mvr1/2 only) makes
    ``muon_mvr`` the default geometry preset (see :class:`Gluon`)."""
    cfg = dict(METHODS[method])
    form = options.get("form", "fedgluon")
    if form not in FORMS:
        raise ValueError(f"form must be one of {list(FORMS)}, got {form!r}")
    if form == "reference":
        name = estimator.name if isinstance(estimator, Estimator) else estimator or cfg["estimator"]
        if isinstance(estimator, Estimator) and getattr(estimator, "form", None) != "reference":
            raise ValueError("form 'reference' with a prebuilt estimator needs MuonMVR(form='reference')")
        if name not in ("muon_mvr1", "muon_mvr2"):
            raise ValueError(f"form 'reference' applies to methods ['muon-mvr1', 'muon-mvr2'] (estimators "
                             f"muon_mvr1/2), got method {method!r} with estimator {name!r}")
        cfg["preset"] = "muon_mvr"
    cfg.update(options)
    return cfg


class Gluon(torch.optim.Optimizer):
    """Layer-wise LMO optimizer (see the module docstring for the closure protocol).

    Args:
        params: an ``nn.Module`` (its geometry then sees ``parameter_roles``) or an iterable of
            ``(name, parameter)`` pairs such as ``model.named_parameters()``.
        lr: base radius γ; each layer moves by ``t_i = γ_k ρ_i`` (or the adaptive rule).
        method: one of :data:`METHODS` (defaults for the preset, estimator and schedule).
        geometry: a prebuilt :class:`Geometry`; otherwise built from ``preset``, ``roles``,
            ``overrides``, ``radius`` (per-role multipliers), ``spectral_method``, ``ns_*``.
        estimator: an :class:`Estimator` or its name, configured by ``beta``, ``nesterov``,
            ``gamma``, ``clip``, ``rank``, ``oversample`` (and ``adamw_betas``, ``adamw_eps`` with ``form``).
        schedule: a name from :data:`fedgluon.lmo.radius.SCHEDULES` or a callable ``k -> γ_k``,
            configured by ``power``, ``total``, ``warmup``, ``final_fraction``.
        adaptive: ``{"L0": ..., "L1": ...}`` to use Gluon's adaptive radius instead of a schedule.
        weight_decay, constrained: see :mod:`fedgluon.lmo.step`.
        refresh_prob / refresh_period: SARAH/PAGE refresh policy; ``seed`` seeds its coins.
        form: ``"fedgluon"`` (default) or ``"reference"`` (``muon-mvr1``/``muon-mvr2`` only; module doc): makes
            ``muon_mvr`` the default geometry preset and needs a geometry of that shape. The code's defaults are
            ``lr=3e-3``, β = 0.95, γ = 0.025 and ``weight_decay=0``; pass ``lr=3e-3`` to match it (the
            optimizer's default lr stays 0.02).
    """

    def __init__(self, params: nn.Module | Iterable[tuple[str, Tensor]], lr: float = 0.02, *,
                 method: str = "scion", geometry: Geometry | None = None,
                 estimator: Estimator | str | None = None, schedule: str | Callable[[int], float] | None = None,
                 adaptive: Mapping[str, Any] | None = None, weight_decay: float = 0.0, constrained: bool = False,
                 refresh_prob: float | None = None, refresh_period: int | None = None, seed: int = 0,
                 **options: Any):
        if method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
        cfg = _method_config(method, options, estimator)
        unknown = set(options) - set(_GEOMETRY_KEYS) - set(_ESTIMATOR_KEYS) - set(_SCHEDULE_KEYS)
        if unknown:
            raise TypeError(f"Gluon got unknown options {sorted(unknown)}; allowed: "
                            f"{sorted(_GEOMETRY_KEYS + _ESTIMATOR_KEYS + _SCHEDULE_KEYS)}")
        if isinstance(params, nn.Module):
            module: nn.Module | None = params
            named: list[tuple[str, Tensor]] = [(n, p) for n, p in params.named_parameters() if p.requires_grad]
        else:
            module, named = None, list(params)
            if named and not isinstance(named[0], tuple):
                raise TypeError("Gluon needs named parameters: pass the model or model.named_parameters()")
        if not named:
            raise ValueError("Gluon got no parameters")
        self.names = [n for n, _ in named]
        if geometry is None:
            gkw = {k: cfg[k] for k in _GEOMETRY_KEYS if k in cfg}
            if module is not None:
                geometry = Geometry.from_model(module, **gkw)
            else:
                geometry = Geometry.from_shapes({n: tuple(p.shape) for n, p in named}, **gkw)
        missing = [n for n in self.names if n not in geometry.params]
        if missing:
            raise ValueError(f"geometry has no entry for parameters {missing}")
        self.geometry = geometry
        if cfg.get("form") == "reference":
            check_muon_mvr_reference(geometry, "form")

        if isinstance(estimator, Estimator):
            self.estimator = estimator
        else:
            ekw = {k: cfg[k] for k in _ESTIMATOR_KEYS if k in cfg}
            if (estimator or cfg["estimator"]) == "limuon":
                ekw["seed"] = seed
            self.estimator = make_estimator(estimator or cfg["estimator"], **ekw)
        rule = make_radius_rule(lr, schedule if schedule is not None else cfg.get("schedule", "constant"), adaptive,
                                **{k: cfg[k] for k in _SCHEDULE_KEYS if k in cfg})
        self.lmo_step = LMOStep(geometry, rule, weight_decay=weight_decay, constrained=constrained)
        self.refresh_policy: RefreshPolicy | None = None
        if self.estimator.supports_refresh:
            rp = refresh_prob if refresh_prob is not None else (None if refresh_period else cfg.get("refresh_prob"))
            self.refresh_policy = RefreshPolicy(prob=rp, period=refresh_period)
        self.seed = seed
        self.last_info: StepInfo | None = None
        self._est_state: dict[str, dict[str, Tensor]] | None = None
        self._x_prev: dict[str, Tensor] | None = None
        super().__init__([p for _, p in named], {"lr": lr, "step_count": 0})

    # ------------------------------------------------------------------ state as dicts by name
    def _params(self) -> dict[str, Tensor]:
        return dict(zip(self.names, self.param_groups[0]["params"]))

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state plus the estimator state and X^{k−1} (dicts keyed by name)."""
        out = super().state_dict()
        out["fedgluon"] = {"estimator": self._est_state, "x_prev": self._x_prev}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("fedgluon", {"estimator": None, "x_prev": None})
        super().load_state_dict(state_dict)
        self._est_state, self._x_prev = extra["estimator"], extra["x_prev"]

    def _grads(self) -> dict[str, Tensor]:
        out = {}
        for name, p in self._params().items():
            if p.grad is None:
                raise RuntimeError(f"parameter {name!r} has no gradient; did the closure call backward()?")
            out[name] = p.grad.detach().clone()
        return out

    def _gradient_at(self, closure: Callable[[], Any], point: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Gradients from ``closure()``, evaluated at ``point`` (then restored) if given."""
        params = self._params()
        saved = {n: p.detach().clone() for n, p in params.items()} if point is not None else None
        with torch.no_grad():
            if point is not None:
                for n, p in params.items():
                    p.copy_(point[n])
            for p in params.values():
                p.grad = None
        with torch.enable_grad():
            closure()
        grads = self._grads()
        if saved is not None:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(saved[n])
        return grads

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None,
             refresh_closure: Callable[[], Any] | None = None):
        group = self.param_groups[0]
        k = int(group["step_count"])
        params = self._params()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        g_now = self._grads()
        state = self._est_state

        refresh = self.refresh_policy is not None and self.refresh_policy.due(
            k, generator(self.seed, "refresh", k))
        if refresh and (k > 0 or refresh_closure is not None):
            if refresh_closure is None:
                raise ValueError(f"step {k} is a SARAH/PAGE refresh: pass refresh_closure (a large-batch closure)")
            g_large = self._gradient_at(refresh_closure)
            state, estimate = self.estimator.step_one(state, g_large, refresh=True)
        else:
            g_prev = None
            if self.estimator.needs_previous and state is not None:
                if closure is None:
                    raise ValueError(f"estimator {self.estimator.name!r} needs step(closure): it evaluates the "
                                     "gradient at the previous iterate on the same batch")
                g_prev = self._gradient_at(closure, self._x_prev)
            state, estimate = self.estimator.step_one(state, g_now, g_prev)
        for n, p in params.items():  # leave .grad as the gradient at X^k
            p.grad = g_now[n]
        self._est_state = state
        if self.estimator.needs_previous:
            self._x_prev = {n: p.detach().clone() for n, p in params.items()}
        _, self.last_info = self.lmo_step.apply(params, estimate, k, inplace=True)
        group["step_count"] = k + 1
        return loss


def minibatch_epoch(opt: Gluon, model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 32, *,
                    generator: torch.Generator | None = None,
                    loss_fn: Callable[[Tensor, Tensor], Tensor] = torch.nn.functional.cross_entropy,
                    refresh_closure: Callable[[], Any] | None = None,
                    after_step: Callable[[], None] | None = None) -> None:
    """One pass over ``(x, y)`` in minibatches of a ``torch.randperm`` order (``generator``, or torch's
    default generator), one ``opt.step(closure, refresh_closure=...)`` per batch (the closure protocol
    in the module docstring); ``after_step()`` runs after every step."""
    perm = torch.randperm(len(x), generator=generator)
    for i in range(0, len(x), batch_size):
        idx = perm[i:i + batch_size]

        def closure(idx: Tensor = idx) -> Tensor:
            opt.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            return loss

        opt.step(closure, refresh_closure=refresh_closure)
        if after_step is not None:
            after_step()
