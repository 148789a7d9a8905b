"""Local-step baselines: τ local steps per round, the model delta sent through any compressor.

Client j starts from the broadcast X^k, takes τ local steps on its own minibatches and sends
``Δ_j = X_j^{k,τ} − X^k`` (optionally with EF14 residual memory for biased compressors).
Server: ``X^{k+1} = X^k + η_s Σ_{j∈S} w_j Δ_j / Σ_{j∈S} w_j`` (FedAvg, McMahan et al. 2017;
FedOpt's server learning rate η_s). Partial participation: the mean is over the accepted clients;
a rejected client's delta is dropped and its EF14 residual is not advanced.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from compressors import check_contractive, make_compressor, make_error_feedback
from fedgluon.algorithms.base import Algorithm, BlockGrads, BlockResult, Broadcast
from fedgluon.algorithms.block import feedback_step
from fedgluon.clients.objective import SupervisedObjective
from fedgluon.clients.table import ClientRows
from fedgluon.clients.vectorised import stacked_gradients
from fedgluon.core.rng import generator

Tensors = dict[str, Tensor]


class FedAvg(Algorithm):
    """``fedavg`` — τ local SGD steps ``X ← X − η ∇f_j(X; ξ_s)``."""

    name = "fedavg"
    OPTIONS: ClassVar[dict[str, Any]] = {"local_steps": 5, "local_lr": 0.05, "server_lr": 1.0,
                                         "compressor": {"name": "identity"}, "error_feedback": "none"}

    def __init__(self, geometry, **options):
        super().__init__(geometry, **options)
        if self.opt["local_steps"] < 1:
            raise ValueError(f"local_steps must be >= 1, got {self.opt['local_steps']}")
        if self.opt["error_feedback"] not in ("none", "ef14"):
            raise ValueError(f"error_feedback must be one of ['none', 'ef14'], got {self.opt['error_feedback']!r}")
        spec = self.opt["compressor"]
        if isinstance(spec, dict) and spec.get("name") == "identity" and "values" not in spec:
            spec = {**spec, "values": self.opt["values"]}
        self.compressor = make_compressor(spec, "algorithm.compressor")
        check_contractive(self.opt["error_feedback"], self.compressor, self.shapes)
        self.feedback = make_error_feedback(self.opt["error_feedback"], self.compressor)

    def local_step(self, X: Tensors, g: Tensors, step: int, est_state: Any, first: Tensor) -> tuple[Tensors, Any]:
        """One local step of the block, ``X ← X − η g`` row by row."""
        return {n: X[n] - self.opt["local_lr"] * g[n] for n in X}, est_state

    def local_steps(self, rows: ClientRows, bc: Broadcast, objectives: Sequence[SupervisedObjective],
                    est_state: Any = None, first: Tensor | bool = True) -> tuple[Tensors, Any, BlockGrads]:
        """τ local steps of every row from the broadcast model (step 0 on the round's batch, step s on
        ``generator(seed, "sample", j, k, s)``): the rows' models after them, the local optimiser's state
        (``est_state`` at step 0; ``first``, per row or for all: step 0 is a first step, which restarts it)
        and the metrics."""
        grads = self.gradients(rows, bc, objectives)
        tau, js = self.opt["local_steps"], rows.clients
        X = {n: t.expand(len(js), *t.shape) for n, t in bc.model.items()}
        first = torch.full((len(js),), first) if isinstance(first, bool) else first
        X, est_state = self.local_step(X, grads.now, bc.round * tau, est_state, first)
        for s in range(1, tau):
            batches = [objectives[j].sample_batch(generator(bc.seed, "sample", j, bc.round, s)) for j in js]
            _, g = stacked_gradients(objectives, js, batches, stacked=X, device=self.client_device)
            X, est_state = self.local_step(X, g, bc.round * tau + s, est_state, torch.zeros(len(js), dtype=torch.bool))
            for i, b in enumerate(batches):
                grads.samples[i] += len(b[1])
        grads.evals[:] = [tau] * len(js)
        return X, est_state, grads

    def send_local(self, rows: ClientRows, bc: Broadcast, grads: BlockGrads, payload: Tensors,
                   state: Mapping[str, Any] | None = None) -> BlockResult:
        """The block's result: ``payload`` through the uplink with its error feedback, the proposed state
        (``state`` plus the feedback's pieces) and the metrics of :meth:`local_steps`."""
        pieces, groups = feedback_step(self.feedback, rows.tree, payload, bc, rows)
        return BlockResult(rows.clients, bc.round, groups, {**(state or {}), **pieces}, grads.loss, grads.evals,
                           grads.samples)

    def client_step(self, rows, bc, objectives):
        """:meth:`local_steps` from :meth:`inner_start`, then ``Δ = X^τ − X^k`` through the uplink with its error
        feedback; the state the steps leave to the next round is :meth:`inner_kept`'s."""
        est_state, first = self.inner_start(rows)
        X, est_state, grads = self.local_steps(rows, bc, objectives, est_state, first)
        return self.send_local(rows, bc, grads, {n: X[n] - bc.model[n] for n in X}, self.inner_kept(est_state))

    def inner_start(self, rows: ClientRows) -> tuple[Any, Tensor]:
        """The local steps' starting state and first-step mask: none and every row first (restarted each
        round; methods that keep an inner optimizer across rounds read it from ``rows``)."""
        return None, torch.ones(len(rows), dtype=torch.bool)

    def inner_kept(self, est_state: Any) -> dict[str, Any]:
        """The state pieces the local steps leave to the next round: none (restarted each round)."""
        return {}

    def server_update(self, state, G, k):
        eta = self.opt["server_lr"]
        return {n: state["X"][n] + eta * G[n] for n in G}, None


class LocalGluon(FedAvg):
    """``local-gluon`` — τ local layer-wise LMO steps ``X_i ← X_i + t_i lmo_i(M_i)`` with EMA momentum
    ``M ← βM + (1−β)g`` restarted each round; radius ``t`` from the run's schedule at step kτ + s.
    With τ = 1, β = 0 and one client (or identical clients) it is ``gluon`` with β = 0."""

    name = "local-gluon"
    estimator = "ema"
    OPTIONS = {**{k: v for k, v in FedAvg.OPTIONS.items() if k != "local_lr"}, "beta": 0.0, "local_steps": 5}

    def local_step(self, X, g, step, est_state, first):
        """``M ← βM + (1−β)g`` (restarted each round: ``first`` at step 0), then each row's layer-wise LMO
        step ``X_i ← X_i + t_i lmo_i(M_i)`` (the block's rows in one step: :class:`LMOStep` on rows)."""
        est_state, m = self.est.update(est_state if est_state is not None else self.est.zero_state(g), g, None, first)
        return self.lmo_step.apply(X, m, step)[0], est_state
