"""The plain reference driver: an in-process loop over ``client_step``/``server_step`` without Flower.

Tests of the math use it, and benchmarks use it as the "plain loop" baseline. One round::

    S = sorted(sample(seed, k))                         # fraction or count of the n clients, seeded
    bc = algorithm.broadcast(server_state, k, seed, n)
    for j in S:  state_j', reply_j = algorithm.client_step(state_j, bc, objective_j, j)
    server_state, outcome = algorithm.server_step(server_state, {j: reply_j}, bc, w)
    for j in outcome.accepted:  state_j = state_j'      # commit only what the server accepted

Per-round rows hold the losses, participants, accepted and rejected counts, uplink bits in every
convention (total, mean and max per accepted client), downlink bits, gradient evaluations and wall
time; ``run_plain(...).frame()`` returns them as a pandas DataFrame.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .algorithms.base import Algorithm, ClientReply
from .metrics import client_rows, round_row
from .objective import SupervisedObjective
from .rng import generator

Tensors = dict[str, Tensor]
Tamper = Callable[[int, int, ClientReply], Any]


def client_weights_from_sizes(sizes: Sequence[int], mode: str = "uniform") -> dict[int, float]:
    """``w_j = 1/n`` (``"uniform"``) or ``n_j / N`` (``"samples"``) from the clients' sample counts."""
    if mode == "uniform":
        return {j: 1.0 / len(sizes) for j in range(len(sizes))}
    if mode == "samples":
        total = sum(sizes)
        return {j: n_j / total for j, n_j in enumerate(sizes)}
    raise ValueError(f"weights must be one of ['uniform', 'samples'], got {mode!r}")


def client_weights(objectives: Sequence[SupervisedObjective], mode: str = "uniform") -> dict[int, float]:
    return client_weights_from_sizes([o.num_samples for o in objectives], mode)


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
class RunResult:
    history: list[dict[str, Any]]
    server_state: dict[str, Any]
    client_states: dict[int, Any]
    client_log: list[dict[str, Any]] = field(default_factory=list)

    def frame(self):
        import pandas as pd

        return pd.DataFrame(self.history)


def run_plain(algorithm: Algorithm, objectives: Sequence[SupervisedObjective], X0: Mapping[str, Tensor],
              rounds: int, *, seed: int = 0, participation: float | int = 1.0, weights: str = "uniform",
              evaluate: Callable[[Tensors], dict[str, float]] | None = None, eval_every: int = 1,
              tamper: Tamper | None = None, on_round: Callable[[dict[str, Any]], None] | None = None) -> RunResult:
    """Run ``rounds`` rounds; ``tamper(round, client, reply)`` may replace replies (fault/attack tests)."""
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    n = len(objectives)
    w = client_weights(objectives, weights)
    server = algorithm.init_server(X0)
    states: dict[int, Any] = {j: None for j in range(n)}
    history, log = [], []
    for k in range(rounds):
        t0 = time.perf_counter()
        S = sample_clients(n, k, seed, participation)
        bc = algorithm.broadcast(server, k, seed, n)
        replies, pending = {}, {}
        for j in S:
            pending[j], reply = algorithm.client_step(states[j], bc, objectives[j], j)
            replies[j] = tamper(k, j, reply) if tamper else reply
        server, outcome = algorithm.server_step(server, replies, bc, w)
        for j in outcome.accepted:
            states[j] = pending[j]
        receivers = n if algorithm.downlink is not None else len(S)
        row = round_row(k, S, replies, outcome, bc, receivers)
        log.extend(client_rows(k, S, replies, outcome))
        if evaluate is not None and ((k + 1) % eval_every == 0 or k == rounds - 1):
            row.update(evaluate(server["X"]))
        row["wall_time"] = time.perf_counter() - t0
        history.append(row)
        if on_round is not None:
            on_round(row)
    return RunResult(history, server, states, log)
