"""The server side of a run, shared by every engine: state, one round's bookkeeping, checkpoints.

Engines only move messages. Each round::

    plan = federation.open_round()            # sample S (seeded), broadcast X^k + flags
    ... the engine gets replies (and proposed client states) from the clients in plan.participants ...
    federation.close_round(plan, replies, proposed, failed)

``close_round`` stops the run, before touching any state, when a failure says a worker process died
(:class:`~fedgluon.checkpoint.ActorDeathError`: Flower's Ray actor pool keeps sending tasks to a dead
actor, so the run would silently lose clients); otherwise it runs the algorithm's ``server_step``
(which validates every payload first), stops with :class:`~fedgluon.checkpoint.NonFiniteStateError`
if the server's own step produced NaN/Inf, commits the proposed states of accepted clients only
(DESIGN §2), logs rejections and failures with their reasons, records the metrics row, evaluates
every ``eval_every`` rounds, and hands the checkpointer a snapshot. Stops write the state from
*before* the round, so a resumed run replays that round exactly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .algorithms.base import Algorithm, Broadcast, ClientReply
from .checkpoint import ActorDeathError, Checkpointer, NonFiniteStateError, RunStopped, Snapshot
from .faults import actor_death
from .metrics import client_rows, round_row
from .rng import generator
from .state_schema import StateSchema

log = logging.getLogger("fedgluon.federation")

Evaluate = Callable[[Mapping[str, Tensor], int], dict[str, float]]  # (model, round) -> metrics


def client_weights_from_sizes(sizes: Sequence[int], mode: str = "uniform") -> dict[int, float]:
    """``w_j = 1/n`` (``"uniform"``) or ``n_j / N`` (``"samples"``) from the clients' sample counts."""
    if mode == "uniform":
        return {j: 1.0 / len(sizes) for j in range(len(sizes))}
    if mode == "samples":
        total = sum(sizes)
        return {j: n_j / total for j, n_j in enumerate(sizes)}
    raise ValueError(f"weights must be one of ['uniform', 'samples'], got {mode!r}")


def sample_clients(num_clients: int, k: int, seed: int, participation: float | int) -> list[int]:
    """Sorted participants of round k: a fraction in (0, 1] or a count of clients, drawn with a seeded
    CPU generator (full participation draws nothing)."""
    if isinstance(participation, float) and not isinstance(participation, bool):
        if not 0 < participation <= 1:
            raise ValueError(f"participation fraction must be in (0, 1], got {participation}")
        m = max(1, round(participation * num_clients))
    else:
        m = int(participation)
        if not 1 <= m <= num_clients:
            raise ValueError(f"clients per round must be in [1, {num_clients}], got {m}")
    if m == num_clients:
        return list(range(num_clients))
    perm = torch.randperm(num_clients, generator=generator(seed, "participants", k))
    return sorted(perm[:m].tolist())


@dataclass
class RoundPlan:
    k: int
    participants: list[int]
    broadcast: Broadcast
    started: float


class Federation:
    """Server state, every client's committed state and the run's records (module docstring)."""

    def __init__(self, algorithm: Algorithm, X0: Mapping[str, Tensor], num_clients: int, rounds: int, *,
                 seed: int = 0, participation: float | int = 1.0, weights: Mapping[int, float] | None = None,
                 evaluate: Evaluate | None = None, eval_every: int = 1,
                 on_round: Callable[[dict[str, Any]], None] | None = None,
                 checkpointer: Checkpointer | None = None, resume: Snapshot | None = None,
                 schema: StateSchema):
        self.algorithm, self.num_clients, self.rounds, self.seed = algorithm, num_clients, rounds, seed
        self.schema = schema
        self.participation, self.evaluate, self.eval_every = participation, evaluate, eval_every
        self.on_round, self.checkpointer = on_round, checkpointer
        self.weights: dict[int, float] = dict(weights or {})
        if resume is None:
            self.next_round = 0
            self.server_state = algorithm.init_server(X0)
            self.client_states: dict[int, Any] = {j: None for j in range(num_clients)}
            self.history: list[dict[str, Any]] = []
            self.client_log: list[dict[str, Any]] = []
        else:
            if sorted(resume.client_states) != list(range(num_clients)):
                raise ValueError(f"checkpoint holds states of {len(resume.client_states)} clients, "
                                 f"the run has {num_clients}")
            if not 0 <= resume.next_round <= rounds:
                raise ValueError(f"checkpoint is at round {resume.next_round}, the run has {rounds} rounds")
            for j, state in sorted(resume.client_states.items()):
                why = None if state is None else schema.mismatch(state)
                if why:
                    raise ValueError(f"checkpoint: client {j}'s state does not fit this run's client-state schema: "
                                     f"{why}")
            self.next_round = resume.next_round
            self.server_state, self.client_states = resume.server_state, dict(resume.client_states)
            self.history, self.client_log = list(resume.history), list(resume.client_log)

    @property
    def done(self) -> bool:
        return self.next_round >= self.rounds

    def snapshot(self) -> Snapshot:
        return Snapshot(self.next_round, self.server_state, self.client_states, self.history, self.client_log)

    # ------------------------------------------------------------------ one round
    def open_round(self) -> RoundPlan:
        k = self.next_round
        S = sample_clients(self.num_clients, k, self.seed, self.participation)
        bc = self.algorithm.broadcast(self.server_state, k, self.seed, self.num_clients)
        return RoundPlan(k, S, bc, time.perf_counter())

    def close_round(self, plan: RoundPlan, replies: Mapping[int, ClientReply], proposed: Mapping[int, Any],
                    failed: Mapping[int, str] | None = None,
                    pre_rejected: Mapping[int, str] | None = None) -> dict[str, Any]:
        """Apply round ``plan.k``'s replies; ``failed`` maps clients without a usable reply to the reason,
        ``pre_rejected`` those whose reply could not even be parsed."""
        k, S, bc = plan.k, plan.participants, plan.broadcast
        failed = dict(failed or {})
        deaths = {j: line for j, why in failed.items() if (line := actor_death(why))}
        if deaths:
            j, line = min(deaths.items())
            self._stop(ActorDeathError, f"round {k}: the worker running client {j} died ({line}); Flower's Ray "
                                        f"actor pool does not replace dead actors, so the run stops here")
        pre_rejected = {**(pre_rejected or {}), **self._unfit_states(replies, proposed, bc)}
        replies = {j: r for j, r in replies.items() if j not in pre_rejected}
        started = time.perf_counter()
        state, outcome = self.algorithm.server_step(self.server_state, replies, bc, self.weights)
        server_time = time.perf_counter() - started
        bad = [n for n, t in state["X"].items() if not bool(torch.isfinite(t).all())]
        if bad:
            self._stop(NonFiniteStateError, f"round {k}: the server step produced NaN/Inf in {bad}")
        self.server_state = state
        outcome.rejected.update(pre_rejected)
        for j in outcome.accepted:
            self.client_states[j] = proposed[j]
        for j, why in sorted(outcome.rejected.items()):
            log.warning("round %d: rejected client %d: %s", k, j, why)
        for j, why in sorted(failed.items()):
            log.warning("round %d: client %d failed: %s", k, j, _last_line(why))
        self.client_log.extend(client_rows(k, S, replies, outcome, failed))
        receivers = self.num_clients if self.algorithm.downlink is not None else len(S)
        row = round_row(k, S, replies, outcome, bc, receivers, failed=len(failed))
        if self.evaluate is not None and ((k + 1) % self.eval_every == 0 or k + 1 == self.rounds):
            row.update(self.evaluate(self.server_state["X"], k))
        row["server_time"] = server_time
        row["wall_time"] = time.perf_counter() - plan.started
        self.history.append(row)
        self.next_round = k + 1
        if self.on_round is not None:
            self.on_round(row)
        if self.checkpointer is not None:
            self.checkpointer.after_round(k, self.snapshot)
        return row

    def _unfit_states(self, replies: Mapping[int, ClientReply], proposed: Mapping[int, Any],
                      bc: Broadcast) -> dict[int, str]:
        """The replying clients whose proposed state does not fit the client-state schema or disagrees with
        what the server derives itself (:meth:`Algorithm.derived_mismatch`), with the reason: their
        payloads are rejected before the server step, so their state is never committed."""
        out, seen = {}, set()
        for j in sorted(replies):
            state = proposed.get(j)
            why = self.schema.mismatch(state)
            if why is None:
                why = self.algorithm.derived_mismatch(self.client_states.get(j), state, bc, seen)
            if why is not None:
                out[j] = f"state: {why}"
        return out

    def _stop(self, error: type[RunStopped], message: str) -> None:
        """Checkpoint the state from before the current round (if checkpointing) and raise ``error``."""
        path = None
        if self.checkpointer is not None:
            path = self.checkpointer.save(self.snapshot())
            message += f"; checkpoint of round {self.next_round} in {path}"
        log.error(message)
        raise error(message, self.next_round, path)


def _last_line(text: str) -> str:
    lines = [ln for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[-1] if lines else text
