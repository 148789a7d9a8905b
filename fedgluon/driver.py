"""The plain reference driver: an in-process loop over ``client_step``/``server_step`` without Flower.

Tests of the math use it, and benchmarks use it as the "plain loop" baseline. One round::

    S = sorted(sample(seed, k))                         # fraction or count of the n clients, seeded
    bc = algorithm.broadcast(server_state, k, seed, n)
    for j in S:  state_j', reply_j = algorithm.client_step(state_j, bc, objective_j, j)
    server_state, outcome = algorithm.server_step(server_state, {j: reply_j}, bc, w)
    for j in outcome.accepted:  state_j = state_j'      # commit only what the server accepted

The server side (sampling, ``server_step``, commits, rows, checkpoints) is
:class:`fedgluon.federation.Federation`, the same object the Flower strategy uses; this loop only
calls the clients. Per-round rows hold the losses, participants, accepted and rejected counts,
uplink bits in every convention (total, mean and max per accepted client), downlink bits, gradient evaluations and wall
time; ``run_plain(...).frame()`` returns them as a pandas DataFrame.

Blocks step on columns where the algorithm can (``Algorithm.column_block``, fedgluon/algorithms/columns.py:
EF21 uplinks with elementwise estimators): each client's committed state is then a tree of row views of
its block's columns (one set per run of ``Algorithm.run_length`` clients, the runs ``client_block``
steps a block in), and the next round hands the block those columns again instead of stacking its
clients' states (:class:`fedgluon.held_columns.HeldTrees`, which copies the states out of columns
that only some of their clients still hold); a block whose states are not one step's columns (after
a partial commit, or with partial participation) has them stacked first. The column step equals the
per-client one bitwise (tested), so ``columns=False`` (every block by ``client_block``) gives the same
run.

``workers > 1`` steps that many blocks of clients at once, in threads (each with
``torch.get_num_threads() // workers`` torch threads; the server step keeps the caller's). A block's
step reads the committed states and the broadcast and writes nothing another block reads, its
randomness comes from per-client generators, and the replies are merged in block order, so a run
gives the same results with any number of workers (tested). Threads pay off because much of a
block's step holds no lock: torch's and NumPy's kernels release Python's, so one block's top-k
selection runs beside another's gradients. Models with buffers (BatchNorm) step one block at a time
(:func:`fedgluon.objective.thread_model`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .algorithms.base import Algorithm, Broadcast, ClientReply
from .algorithms.columns import BlockColumns, BlockStep, stacked_columns
from .blocks import by_block, num_blocks, run_slices
from .checkpoint import Checkpointer, Snapshot
from .faults import FaultPlan
from .federation import Evaluate, Federation, client_weights_from_sizes
from .gc_pause import gc_frozen, gc_paused
from .held_columns import HeldColumns, HeldTrees
from .objective import SupervisedObjective, has_buffers

log = logging.getLogger("fedgluon.driver")
Tensors = dict[str, Tensor]
Tamper = Callable[[int, int, ClientReply], Any]


def client_weights(objectives: Sequence[SupervisedObjective], mode: str = "uniform") -> dict[int, float]:
    return client_weights_from_sizes([o.num_samples for o in objectives], mode)


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
              evaluate: Evaluate | None = None, eval_every: int = 1, tamper: Tamper | None = None,
              on_round: Callable[[dict[str, Any]], None] | None = None, faults: FaultPlan | None = None,
              checkpointer: Checkpointer | None = None, resume: Snapshot | None = None,
              block_size: int = 1, workers: int = 1, columns: bool = True, max_failed_rounds: int = 0) -> RunResult:
    """Run ``rounds`` rounds (from ``resume``'s round when given). ``evaluate(X, k)`` returns central
    metrics; ``tamper(round, client, reply)`` may replace replies (attack tests); ``faults`` marks the
    tasks it draws as failed (a raise or a missed deadline: no reply) exactly as the Flower engines see
    them; ``block_size > 1`` computes the gradients of each block of clients in one vmapped call;
    ``workers > 1`` steps that many blocks at once; ``columns`` lets blocks step on their state columns
    (module doc; the same results); ``max_failed_rounds`` consecutive rounds without an accepted client
    stop the run (0, the default here: never; a run that accepts no client at all stops at its end,
    :class:`~fedgluon.federation.Federation`)."""
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    fed = Federation(algorithm, X0, len(objectives), rounds, seed=seed, participation=participation,
                     weights=client_weights(objectives, weights), evaluate=evaluate, eval_every=eval_every,
                     on_round=on_round, checkpointer=checkpointer, resume=resume, max_failed_rounds=max_failed_rounds,
                     schema=algorithm.state_schema(objectives[0], X0, seed))
    num_blocks(len(objectives), block_size)  # checks block_size
    with gc_frozen(), block_workers(workers, objectives) as pool:
        _rounds(fed, algorithm, objectives, seed, faults, tamper, block_size, pool,
                HeldTrees() if columns and block_size > 1 and algorithm.steps_columns() else None)
    return RunResult(fed.history, fed.server_state, fed.client_states, fed.client_log)


def _rounds(fed: Federation, algorithm: Algorithm, objectives: Sequence[SupervisedObjective], seed: int,
            faults: FaultPlan | None, tamper: Tamper | None, block_size: int, pool: Executor | None,
            held: HeldColumns[dict[str, Any]] | None) -> None:
    while not fed.done:
        with gc_paused():
            plan = fed.open_round()
            replies, pending = {}, {}
            kinds = {j: faults.draw(seed, j, plan.k) if faults is not None else None for j in plan.participants}
            failed = {j: FAILURE_REASONS[kind] for j, kind in kinds.items() if kind is not None}
            died = {j: failed[j] for j, kind in kinds.items() if kind == "die"}  # what a runtime would report
            working = [j for j in plan.participants if j not in failed]
            out = _step_blocks(algorithm, fed.client_states, plan.broadcast, objectives,
                               list(by_block(working, block_size).values()), pool, held)
            for j in working:
                pending[j], reply = out[j]
                replies[j] = tamper(plan.k, j, reply) if tamper else reply
            try:
                fed.close_round(plan, replies, pending, failed, died=died)
            finally:  # also when the run stops: no committed state keeps partly committed columns alive
                if held is not None:
                    held.settle(fed.client_states)


def _step_blocks(algorithm: Algorithm, states: Mapping[int, Any], bc: Broadcast, objectives: Sequence[SupervisedObjective],
                 blocks: list[list[int]], pool: Executor | None,
                 held: HeldColumns[dict[str, Any]] | None = None) -> dict[int, tuple[Any, ClientReply]]:
    """Every block's step, on ``pool``'s threads when given, merged in block order. With ``held``, a block
    steps in runs of ``Algorithm.run_length`` clients (as ``client_block`` does: a run's gradients,
    states and rows stay near the cache), each by ``column_block`` on its columns where it can, else by
    ``client_block``; column steps are offered to ``held`` (here, in order, not in the threads)."""
    def run(js: list[int]) -> BlockStep | dict[int, tuple[Any, ClientReply]]:
        columns = _columns_of(held, states, js) if held is not None else None
        got = algorithm.column_block(columns, bc, objectives) if columns is not None else None
        return got if got is not None else algorithm.client_block(states, bc, objectives, js)

    def step(js: list[int]) -> list[BlockStep | dict[int, tuple[Any, ClientReply]]]:
        per = algorithm.run_length(bc) if held is not None else len(js)  # as client_block steps its runs
        return [run(js[rows]) for rows in run_slices(len(js), per)]

    out: dict[int, tuple[Any, ClientReply]] = {}
    for runs in (pool.map(step, blocks) if pool is not None and len(blocks) > 1 else map(step, blocks)):
        for got in runs:
            if isinstance(got, BlockStep):
                results = got.results()
                assert held is not None
                held.offer(got.states, got.clients, {j: state for j, (state, _) in results.items()})
                got = results
            out.update(got)
    return out


def _columns_of(held: HeldColumns[dict[str, Any]], states: Mapping[int, Any], js: list[int]) -> BlockColumns | None:
    """The committed states of block ``js`` as columns: none yet (every state None), the column tree they
    are views of, or else their trees stacked (after a block was only partly committed, or with partial
    participation); None where they cannot be (the block steps client by client)."""
    if len(js) < 2:
        return None
    trees = [states[j] for j in js]
    if all(t is None for t in trees):
        return BlockColumns(js, None)
    tree = held.source_for(js, states)
    if tree is None:
        tree = stacked_columns(trees)
    return BlockColumns(js, tree) if tree is not None else None


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


# What a Flower engine reports for a task that met an injected fault (fedgluon.faults).
FAILURE_REASONS = {"raise": "InjectedFault: injected fault", "delay": "no reply before the round timeout",
                   "die": "SimulatedActorDeath: injected actor death"}
