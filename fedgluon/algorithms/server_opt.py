"""Non-LMO baselines: a torch optimizer on the server, applied to the (compressed) aggregate.

Clients send plain stochastic gradients through EF21 with a contractive compressor (identity by default), so
the server's ``G = Σ_j w_j G_j`` tracks the mean gradient (docs/ALGORITHMS.md §8.1) — or through EF14 / no
feedback (``error_feedback``), the PowerSGD recipe with ``compressor: powersgd``; the server then takes
a ``torch.optim.SGD`` (momentum) or ``torch.optim.AdamW`` step with ``.grad = G`` at the learning rate
``lr · schedule(k)`` of the run's schedule (``constant`` by default; Gluon's ``adaptive`` rule does not
apply). The optimizer's state lives in the server state as its ``state_dict`` (plain tensors, so it
checkpoints), and each step works on copies: the previous server state is never modified. This is what
"Adam vs Muon vs Gluon" sweeps compare against. Partial participation and rejection follow EF21.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch

from fedgluon.algorithms.ef21 import FeedbackUplink


def torch_step(make_optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer], X: Mapping[str, torch.Tensor],
               G: Mapping[str, torch.Tensor], lr: float, saved: dict[str, Any] | None
               ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One step of a torch optimizer on copies of ``X`` with ``.grad = G`` at learning rate ``lr``, from its
    ``saved`` ``state_dict`` (None: a fresh optimizer): the new model and the optimizer's new ``state_dict``.
    Neither ``X`` nor ``saved`` is modified."""
    X = {n: t.detach().clone() for n, t in X.items()}
    optimizer = make_optimizer(list(X.values()))
    if saved is not None:
        optimizer.load_state_dict(copy.deepcopy(saved))
    for group in optimizer.param_groups:
        group["lr"] = lr
    for n, p in X.items():
        p.grad = G[n].to(p.dtype).clone()
    optimizer.step()
    for p in X.values():
        p.grad = None
    return X, optimizer.state_dict()


class _TorchServer(FeedbackUplink):
    OPTIONS = {**FeedbackUplink.OPTIONS, "compressor": {"name": "identity"}}

    def make_optimizer(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        raise NotImplementedError

    def __init__(self, geometry, **options):
        super().__init__(geometry, **options)
        if self.opt["adaptive"] is not None:
            raise ValueError(f"algorithm {self.name!r} takes a schedule, not Gluon's adaptive radius "
                             f"(got adaptive={self.opt['adaptive']!r})")

    def init_server(self, X0):
        state = super().init_server(X0)
        state["optimizer"] = None  # the optimizer's state_dict after the first step
        return state

    def server_update(self, state, G, k):
        X, state["optimizer"] = torch_step(self.make_optimizer, state["X"], G, self.lmo_step.radius_rule.base(k),
                                           state.get("optimizer"))
        return X, None


class ServerSGD(_TorchServer):
    """``sgd`` — ``torch.optim.SGD(lr, momentum, nesterov, weight_decay)`` on the aggregate G: with
    ``g = G + λX``, ``b ← μb + g`` (``b = g`` at first), ``X ← X − η(g + μb)`` (Nesterov) or ``X ← X − ηb``."""

    name = "sgd"
    OPTIONS: ClassVar[dict[str, Any]] = {**_TorchServer.OPTIONS, "momentum": 0.9, "nesterov": False}

    def make_optimizer(self, params):
        return torch.optim.SGD(params, lr=self.opt["lr"], momentum=self.opt["momentum"],
                               nesterov=self.opt["nesterov"], weight_decay=self.opt["weight_decay"])


class ServerAdamW(_TorchServer):
    """``adamw`` — ``torch.optim.AdamW(lr, betas, eps, weight_decay)`` on the aggregate G (Loshchilov and
    Hutter): ``m ← β₁m + (1−β₁)G``, ``v ← β₂v + (1−β₂)G²``, ``X ← X(1 − ηλ) − η m̂/(√v̂ + ε)`` with the
    bias-corrected ``m̂ = m/(1−β₁ᵗ)``, ``v̂ = v/(1−β₂ᵗ)``."""

    name = "adamw"
    OPTIONS: ClassVar[dict[str, Any]] = {**_TorchServer.OPTIONS, "lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8}

    def make_optimizer(self, params):
        return torch.optim.AdamW(params, lr=self.opt["lr"], betas=tuple(self.opt["betas"]), eps=self.opt["eps"],
                                 weight_decay=self.opt["weight_decay"])
