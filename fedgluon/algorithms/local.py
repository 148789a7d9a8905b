"""Local-step baselines: τ local steps per round, the model delta sent through any compressor.

Client j starts from the broadcast X^k, takes τ local steps on its own minibatches and sends
``Δ_j = X_j^{k,τ} − X^k`` (optionally with EF14 residual memory for biased compressors).
Server: ``X^{k+1} = X^k + η_s Σ_{j∈S} w_j Δ_j / Σ_{j∈S} w_j`` (FedAvg, McMahan et al. 2017;
FedOpt's server learning rate η_s). Partial participation: the mean is over the accepted clients;
a rejected client's delta is dropped and its EF14 residual is not advanced.
"""

from __future__ import annotations

from typing import Any, ClassVar

from compressors import Compressor, make_compressor, make_error_feedback
from compressors.error_feedback import step_one

from ..rng import generator
from .base import Algorithm, ClientReply, commit_count


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
        self.compressor = make_compressor(spec)
        self.feedback = make_error_feedback(self.opt["error_feedback"], self.compressor)

    @property
    def uplink(self) -> Compressor:
        return self.compressor

    def local_step(self, X, g, step, est_state):
        return {n: X[n] - self.opt["local_lr"] * g[n] for n in X}, est_state

    def client_step(self, state, bc, objective, j):
        state = state or {}
        X = {n: t.clone() for n, t in bc.model.items()}
        tau, est_state, losses, samples = self.opt["local_steps"], None, [], 0
        for s in range(tau):
            gen = generator(bc.seed, "sample", j, bc.round) if s == 0 else generator(bc.seed, "sample", j, bc.round, s)
            batch = objective.sample_batch(gen)
            loss, g = objective.gradient(X, batch)
            losses.append(loss)
            samples += len(batch[1])
            X, est_state = self.local_step(X, g, bc.round * tau + s, est_state)
        delta = {n: X[n] - bc.model[n] for n in X}
        msg, ef_state, comp = step_one(self.feedback, state.get("ef"), delta, (bc.seed, j, bc.round), state.get("comp"))
        new_state = {**state, "commits": commit_count(state) + 1, "ef": ef_state, "comp": comp}
        return new_state, ClientReply(j, bc.round, msg, losses[0], tau, samples)

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

    def local_step(self, X, g, step, est_state):
        est_state, m = self.est.update(est_state, g)
        X, _ = self.lmo_step.apply(X, m, step)
        return X, est_state

