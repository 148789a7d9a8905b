"""The plain reference driver: an in-process loop over ``client_step``/``server_step`` without Flower.

Tests of the math use it, and benchmarks use it as the "plain loop" baseline (docs/DESIGN.md §3,
"Federation and drivers"). The server side is :class:`fedgluon.sim.federation.Federation`, the same object the
Flower strategy uses; this loop only steps the clients, each block once per round over its rows of the
client-state table (``Algorithm.step_block``; ``block_size=1`` steps client by client).
``run_plain(...).frame()`` returns the metrics rows as a pandas DataFrame.

``workers > 1`` steps that many blocks of clients at once, in threads (each with
``torch.get_num_threads() // workers`` torch threads; the server step keeps the caller's). A block's
step reads the committed states and the broadcast and writes nothing another block reads, its
randomness comes from per-client generators, and the replies are merged in block order, so a run
gives the same results with any number of workers (tested). Threads pay off because much of a
block's step holds no lock: torch's and NumPy's kernels release Python's, so one block's top-k
selection runs beside another's gradients. Models with buffers (BatchNorm) step one block at a time
(:func:`fedgluon.clients.objective.thread_model`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor

from fedgluon.algorithms.base import Algorithm, BlockResult, Broadcast, ClientReply
from fedgluon.clients.blocks import by_block, num_blocks
from fedgluon.clients.objective import SupervisedObjective, has_buffers
from fedgluon.clients.table import ClientRows, ClientStateTable
from fedgluon.runtime.gc_pause import gc_paused
from fedgluon.sim.checkpoint import Checkpointer, Snapshot
from fedgluon.sim.faults import FaultPlan
from fedgluon.sim.federation import Evaluate, Federation, client_weights_from_sizes

log = logging.getLogger("fedgluon.sim.driver")
Tamper = Callable[[int, int, ClientReply], Any]


def client_weights(objectives: Sequence[SupervisedObjective], mode: str = "uniform") -> dict[int, float]:
    return client_weights_from_sizes([o.num_samples for o in objectives], mode)


@dataclass
class RunResult:
    history: list[dict[str, Any]]
    server_state: dict[str, Any]
    table: ClientStateTable
    client_log: list[dict[str, Any]] = field(default_factory=list)

    def frame(self):
        import pandas as pd

        return pd.DataFrame(self.history)


def run_plain(algorithm: Algorithm, objectives: Sequence[SupervisedObjective], X0: Mapping[str, Tensor],
              rounds: int, *, seed: int = 0, participation: float | int = 1.0, weights: str = "uniform",
              evaluate: Evaluate | None = None, eval_every: int = 1, tamper: Tamper | None = None,
              on_round: Callable[[dict[str, Any]], None] | None = None, faults: FaultPlan | None = None,
              checkpointer: Checkpointer | None = None, resume: Snapshot | None = None,
              block_size: int = 1, workers: int = 1, max_failed_rounds: int = 0) -> RunResult:
    """Run ``rounds`` rounds (from ``resume``'s round when given). ``evaluate(X, k)`` returns central
    metrics; ``tamper(round, client, reply)`` may replace replies (attack tests); ``faults`` marks the
    tasks it draws as failed (a raise or a missed deadline: no reply) exactly as the Flower engines see
    them; ``block_size > 1`` computes the gradients of each block of clients in one vmapped call;
    ``workers > 1`` steps that many blocks at once; ``max_failed_rounds`` consecutive rounds without an accepted client
    stop the run (0, the default here: never; a run that accepts no client at all stops at its end,
    :class:`~fedgluon.sim.federation.Federation`)."""
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    fed = Federation(algorithm, X0, len(objectives), rounds, seed=seed, participation=participation,
                     weights=client_weights(objectives, weights), evaluate=evaluate, eval_every=eval_every,
                     on_round=on_round, checkpointer=checkpointer, resume=resume, max_failed_rounds=max_failed_rounds,
                     schema=algorithm.state_schema(objectives[0], X0, seed))
    num_blocks(len(objectives), block_size)  # checks block_size
    with block_workers(workers, objectives) as pool:
        _rounds(fed, algorithm, objectives, seed, faults, tamper, block_size, pool)
    return RunResult(fed.history, fed.server_state, fed.table, fed.client_log)


def _rounds(fed: Federation, algorithm: Algorithm, objectives: Sequence[SupervisedObjective], seed: int,
            faults: FaultPlan | None, tamper: Tamper | None, block_size: int, pool: Executor | None) -> None:
    """The rounds, each of ``algorithm.phases`` phases (docs/DESIGN.md §3, "Rounds of several phases")."""
    while not fed.done:
        with gc_paused():
            plan = fed.open_round()
            for phase in range(algorithm.phases):  # one for most algorithms
                kinds = {j: faults.draw(seed, j, plan.k, phase) if faults is not None else None
                         for j in plan.participants}
                failed = {j: FAILURE_REASONS[kind] for j, kind in kinds.items() if kind is not None}
                died = {j: failed[j] for j, kind in kinds.items() if kind == "die"}  # what a runtime would report
                working = [j for j in plan.participants if j not in failed]
                results = step_blocks(algorithm, partial(fed.rows, plan), plan.broadcast, objectives,
                                      list(by_block(working, block_size).values()), pool)
                replies: dict[int, ClientReply] = {}
                for result in results:
                    failed.update(result.failures())
                    for j, reply in result.replies().items():
                        replies[j] = tamper(plan.k, j, reply) if tamper else reply
                args = (dict(sorted(replies.items())), [r.proposal(algorithm.derived) for r in results], failed)
                if phase + 1 < algorithm.phases:
                    plan = fed.advance(plan, *args, died=died)
                else:
                    fed.close_round(plan, *args, died=died)


def step_blocks(algorithm: Algorithm, rows: Callable[[Sequence[int]], ClientRows], bc: Broadcast,
                objectives: Sequence[SupervisedObjective], blocks: list[list[int]],
                pool: Executor | None = None) -> list[BlockResult]:
    """Every block's step over its rows (``rows(block)``: ``Federation.rows`` of the phase, the committed
    rows in a round's first; ``Algorithm.step_block``), on ``pool``'s threads when given; the results of
    its runs, in block order."""
    def step(js: list[int]) -> list[BlockResult]:
        return algorithm.step_block(rows(js), bc, objectives) if js else []

    return [r for runs in (pool.map(step, blocks) if pool is not None and len(blocks) > 1 else map(step, blocks))
            for r in runs]


@contextmanager
def block_workers(workers: int, objectives: Sequence[SupervisedObjective]) -> Iterator[Executor | None]:
    """Threads that step blocks at once (module doc), each with ``torch.get_num_threads() // workers``
    torch threads (at least one); None for one worker, or where a model has buffers (logged)."""
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    if workers > 1 and any(has_buffers(m) for m in {id(o.model): o.model for o in objectives}.values()):
        log.warning("workers=%d ignored: the model has buffers (BatchNorm), which blocks stepping at once in "
                    "threads would update apart; stepping one block at a time", workers)
        workers = 1
    if workers == 1:
        yield None
        return
    threads = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="fedgluon-block", initializer=torch.set_num_threads,
                                initargs=(max(1, threads // workers),)) as pool:
            yield pool
    finally:  # a worker's set_num_threads also set the count that threads started later begin with
        torch.set_num_threads(threads)


# What a Flower engine reports for a task that met an injected fault (fedgluon.sim.faults).
FAILURE_REASONS = {"raise": "InjectedFault: injected fault", "delay": "no reply before the round timeout",
                   "die": "SimulatedActorDeath: injected actor death"}
