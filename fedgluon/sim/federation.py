"""The server side of a run, shared by every engine: state, one round's bookkeeping, checkpoints.

What a round does is docs/DESIGN.md §3 ("Federation and drivers", "Client state", "Rounds of several phases") and
§6. Engines only move messages: :meth:`Federation.open_round`, then the replies of ``plan.participants`` to
:meth:`Federation.close_round` (those of a phase before the last to :meth:`Federation.advance`, whose accepted
clients step next on :meth:`Federation.rows`). ``close_round`` stops the run, before touching any state, when the
*runtime* says a worker process died (``died``: the engine's word, from Ray/Flower error codes, never from a
client's own text; :class:`~fedgluon.sim.checkpoint.ActorDeathError`: Flower's Ray actor pool keeps sending tasks
to a dead actor, so the run would silently lose clients), and with
:class:`~fedgluon.sim.checkpoint.NonFiniteStateError` when the server state (model, aggregate/estimator,
optimizer) or the central evaluation (test loss and accuracy, the gradient's dual norm) is NaN/Inf. These stops
write the state from *before* the round, so a resumed run replays that round exactly. A client whose first-phase
reply reports a loss that is not finite is rejected (:func:`_non_finite_losses`). Reasons a client sent are
clipped to :data:`MAX_CLIENT_TEXT` characters. A round of several phases sums each accepted client's uplink bits
over its phases and records per-phase bit columns (``up_phase<p>_*``, ``down_phase<p>_*_total``), the round's
downlink as their sum, and ``phases`` (round trips, for the simulated time of fedgluon.exp.experiment).

A run also stops (:class:`NoProgressError`, after the round, with a checkpoint of the state after
it) when ``max_failed_rounds`` consecutive rounds accepted no client, and at its last round when no
client was accepted in any round: such a run is never reported complete.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from compressors import CONVENTIONS, BitCount
from fedgluon.algorithms.base import Algorithm, Broadcast, ClientReply, ServerOutcome
from fedgluon.algorithms.block import Proposal
from fedgluon.clients.state_schema import StateSchema
from fedgluon.clients.table import ClientRows, ClientStateTable, nest
from fedgluon.core.rng import generator
from fedgluon.core.text import MAX_CLIENT_TEXT, first_line, last_line, shown
from fedgluon.sim.checkpoint import ActorDeathError, Checkpointer, NonFiniteStateError, RunStopped, Snapshot
from fedgluon.sim.metrics import bit_columns, client_rows, round_row
from fedgluon.tasks.registry import EVAL_METRICS

log = logging.getLogger("fedgluon.sim.federation")

Evaluate = Callable[[Mapping[str, Tensor], int], dict[str, float]]  # (model, round) -> metrics

FINITE_METRICS = (*EVAL_METRICS, "grad_dual_norm")
"""The central evaluation's metrics that stop the run when NaN or infinite."""
SMALLER_RADIUS = ("start a new run with a smaller radius (algorithm.lr, or its schedule); "
                  "a resume may not change it")


class NoProgressError(RunStopped):
    """No client was accepted in ``max_failed_rounds`` consecutive rounds, or in any round of the run."""


def clip_text(text: object, limit: int = MAX_CLIENT_TEXT) -> str:
    """``str(text)`` cut to at most about ``limit`` characters: its head and its tail (where a traceback
    names the error) around a note of how much was cut; never raises (:func:`fedgluon.core.text.shown`)."""
    return shown(text, limit, as_repr=False)


def _non_finite_losses(replies: Mapping[int, ClientReply], phase: int) -> dict[int, str]:
    """Clients whose reply in a round's first phase reports a loss that is not a finite number: rejected,
    so that no client's word puts a NaN or an Inf into the round's ``train_loss`` (a later phase's loss is
    never read: the round's loss is its first phase's)."""
    if phase:
        return {}
    def finite(x: object) -> bool:
        try:
            return not isinstance(x, bool) and math.isfinite(x)  # type: ignore[arg-type]
        except (TypeError, ValueError, OverflowError):
            return False

    return {j: f"loss: not a finite number ({shown(r.loss, 40)}; a diverging client, or a bad reply)"
            for j, r in replies.items() if not finite(r.loss)}


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
class PhaseCarry:
    """What the phases of a round before the current one left (docs/DESIGN.md §3, "Rounds of several
    phases"): the clients sampled, those failed or rejected with the reason, the accepted clients' uplink
    bits and metrics so far, their proposed rows (``pending``: client → (proposal, row)), and per-phase bit
    columns."""

    sampled: list[int]
    failed: dict[int, str] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)
    uplink: dict[int, BitCount] = field(default_factory=dict)
    metrics: dict[int, tuple[float, int, int]] = field(default_factory=dict)
    pending: dict[int, tuple[Proposal, int]] = field(default_factory=dict)
    columns: dict[str, float] = field(default_factory=dict)


@dataclass
class RoundPlan:
    k: int
    participants: list[int]  # the clients that step in this phase (after phase 0: those accepted so far)
    broadcast: Broadcast
    started: float
    carry: PhaseCarry | None = None  # None in a round's first phase


class Federation:
    """Server state, every client's committed state and the run's records (docs/DESIGN.md §3,
    "Federation and drivers")."""

    def __init__(self, algorithm: Algorithm, X0: Mapping[str, Tensor], num_clients: int, rounds: int, *,
                 seed: int = 0, participation: float | int = 1.0, weights: Mapping[int, float] | None = None,
                 evaluate: Evaluate | None = None, eval_every: int = 1,
                 on_round: Callable[[dict[str, Any]], None] | None = None,
                 checkpointer: Checkpointer | None = None, resume: Snapshot | None = None,
                 max_failed_rounds: int = 0, schema: StateSchema):
        self.algorithm, self.num_clients, self.rounds, self.seed = algorithm, num_clients, rounds, seed
        self.max_failed_rounds = max_failed_rounds  # 0: never stop for rounds without an accepted client
        self.participation, self.evaluate, self.eval_every = participation, evaluate, eval_every
        self.on_round, self.checkpointer = on_round, checkpointer
        self.weights: dict[int, float] = dict(weights or {})
        self.table = ClientStateTable(schema, num_clients, keep_models=algorithm.needs_previous)
        if resume is None:
            self.next_round = 0
            self.server_state = algorithm.init_server(X0)
            self.history: list[dict[str, Any]] = []
            self.client_log: list[dict[str, Any]] = []
        else:
            if not 0 <= resume.next_round <= rounds:
                raise ValueError(f"checkpoint is at round {resume.next_round}, the run has {rounds} rounds")
            try:
                self.table.load_state_dict(resume.client_states)
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"checkpoint: {err}") from None
            self.next_round = resume.next_round
            self.server_state = resume.server_state
            self.history, self.client_log = list(resume.history), list(resume.client_log)
            if self.done and (why := self._no_progress()) is not None:
                raise NoProgressError(f"{why}; nothing to resume: start a new run", self.next_round)

    @property
    def done(self) -> bool:
        return self.next_round >= self.rounds

    def snapshot(self) -> Snapshot:
        return Snapshot(self.next_round, self.server_state, self.table.state_dict(), self.history, self.client_log)

    # ------------------------------------------------------------------ one round
    def open_round(self) -> RoundPlan:
        k = self.next_round
        S = sample_clients(self.num_clients, k, self.seed, self.participation)
        bc = self.algorithm.broadcast(self.server_state, k, self.seed, self.num_clients).as_sent()
        return RoundPlan(k, S, bc, time.perf_counter())

    def close_round(self, plan: RoundPlan, replies: Mapping[int, ClientReply], proposed: Sequence[Proposal],
                    failed: Mapping[int, str] | None = None, pre_rejected: Mapping[int, str] | None = None,
                    died: Mapping[int, str] | None = None) -> dict[str, Any]:
        """Apply round ``plan.k``'s replies; ``proposed``: per run of a block its clients, proposed state
        columns and payload groups (:class:`~fedgluon.algorithms.block.Proposal`); ``failed`` maps clients
        without a usable reply to the reason, ``pre_rejected`` those whose reply could not even be parsed,
        ``died`` those whose worker process the runtime reports dead (an error code of Ray/Flower, not a
        client's message)."""
        k, S, bc = plan.k, plan.participants, plan.broadcast
        failed = {j: clip_text(why) for j, why in (failed or {}).items()}
        pre_rejected, replies, first = self._screen(plan, replies, proposed, pre_rejected, died)
        if plan.carry is not None:
            S, failed, replies = self._merge_phases(plan, failed, replies)
        started = time.perf_counter()
        state, outcome = self.algorithm.server_step(self.server_state, replies, bc, self.weights, first)
        server_time = time.perf_counter() - started
        bad = _non_finite_state(state)
        self._require_finite(k, [f"the server state ({', '.join(bad[:4])}{' …' if len(bad) > 4 else ''})"]
                             if bad else [])
        outcome.rejected.update(pre_rejected)
        outcome.rejected = {j: clip_text(why) for j, why in outcome.rejected.items()}
        receivers = self.num_clients if self.algorithm.downlink is not None else len(S)
        phase_columns: dict[str, float] = {}
        if plan.carry is not None:
            outcome, phase_columns = self._last_phase(plan, outcome)
        row = round_row(k, S, replies, outcome, bc, receivers, failed=len(failed)) | phase_columns
        if self.evaluate is not None and ((k + 1) % self.eval_every == 0 or k + 1 == self.rounds):
            metrics = self.evaluate(state["X"], k)
            self._require_finite(k, [f"the central evaluation's {m} ({metrics[m]})" for m in FINITE_METRICS
                                     if m in metrics and not math.isfinite(metrics[m])])
            row.update(metrics)
        self.server_state = state
        self._commit(proposed, outcome, first, k, bc)
        self.table.settle()
        for j, why in sorted(outcome.rejected.items()):
            log.warning("round %d: rejected client %d: %s", k, j, why)
        for j, why in sorted(failed.items()):
            log.warning("round %d: client %d failed: %s", k, j, last_line(why))
        self.client_log.extend(client_rows(k, S, replies, outcome, failed))
        row["server_time"] = server_time
        row["wall_time"] = time.perf_counter() - plan.started
        self.history.append(row)
        self.next_round = k + 1
        if self.on_round is not None:
            self.on_round(row)
        why = self._no_progress()
        if why is not None:
            self._stop(NoProgressError, f"{why}; fix the cause (see the failed and rejected reasons in "
                                        f"clients.csv) and resume")
        if self.checkpointer is not None:
            self.checkpointer.after_round(k, self.snapshot)
        return row

    # ------------------------------------------------------------------ rounds of several phases
    def advance(self, plan: RoundPlan, replies: Mapping[int, ClientReply], proposed: Sequence[Proposal],
                failed: Mapping[int, str] | None = None, pre_rejected: Mapping[int, str] | None = None,
                died: Mapping[int, str] | None = None) -> RoundPlan:
        """Close a phase before the round's last (docs/DESIGN.md §3, "Rounds of several phases"; arguments as
        :meth:`close_round`): the algorithm's ``server_phase`` validates the replies and answers with the
        next phase's broadcast; nothing is committed and the server state is unchanged. The clients it
        accepted step in the next phase on the rows they proposed here; the others are out of the round."""
        pre_rejected, replies, first = self._screen(plan, replies, proposed, pre_rejected, died)
        carry = plan.carry if plan.carry is not None else PhaseCarry(list(plan.participants))
        answer, outcome = self.algorithm.server_phase(self.server_state, replies, plan.broadcast, self.weights, first)
        answer = answer.as_sent()
        accepted = set(outcome.accepted)
        carry.failed.update({j: clip_text(why) for j, why in (failed or {}).items()})
        carry.rejected.update({j: clip_text(why) for j, why in {**outcome.rejected, **pre_rejected}.items()})
        carry.columns.update(_phase_columns(plan, outcome))
        for j in sorted(accepted):
            carry.uplink[j] = carry.uplink.get(j, BitCount()) + outcome.uplink[j]
            loss, evals, samples = carry.metrics.get(j, (replies[j].loss, 0, 0))
            carry.metrics[j] = (loss, evals + replies[j].grad_evals, samples + replies[j].samples)
        carry.pending = {j: (prop, i) for prop in proposed for i, j in enumerate(prop.clients) if j in accepted}
        return RoundPlan(plan.k, sorted(accepted), answer, plan.started, carry)

    def rows(self, plan: RoundPlan, clients: Sequence[int]) -> ClientRows:
        """The rows ``clients`` step on in ``plan``'s phase: their committed rows in a round's first phase,
        the rows they proposed in the phase before in a later one."""
        base = self.table.rows(clients)
        if plan.carry is None:
            return base
        pending = plan.carry.pending
        paths = pending[clients[0]][0].columns if clients else {}
        tree = nest({path: torch.stack([pending[j][0].columns[path][pending[j][1]] for j in clients])
                     for path in paths})
        return ClientRows(list(clients), tree, base.commits, base.seen, base.models)

    def _merge_phases(self, plan: RoundPlan, failed: dict[int, str], replies: Mapping[int, ClientReply]
                      ) -> tuple[list[int], dict[int, str], dict[int, ClientReply]]:
        """The last phase's view of the whole round: every sampled client, the failures of every phase,
        and each reply with the loss of the client's first phase and the work of all its phases."""
        carry = plan.carry
        assert carry is not None
        merged = {}
        for j, r in replies.items():
            loss, evals, samples = carry.metrics.get(j, (r.loss, 0, 0))
            merged[j] = replace(r, loss=loss, grad_evals=evals + r.grad_evals, samples=samples + r.samples)
        return carry.sampled, {**carry.failed, **failed}, merged

    def _last_phase(self, plan: RoundPlan, outcome: ServerOutcome) -> tuple[ServerOutcome, dict[str, float]]:
        """The outcome of a round of several phases (rejections of every phase; each accepted client's
        uplink bits summed over its phases) and the columns of its metrics row: the per-phase bit columns
        (:func:`_phase_columns`) and the round's downlink, their sum."""
        carry = plan.carry
        assert carry is not None
        phases = plan.broadcast.phase + 1
        columns = {"phases": float(phases), **carry.columns, **_phase_columns(plan, outcome)}
        columns.update({f"down_{c}_total": sum(columns[f"down_phase{p}_{c}_total"] for p in range(phases))
                        for c in CONVENTIONS})  # the round's downlink: its phases' (replaces round_row's)
        outcome.rejected = {**carry.rejected, **outcome.rejected}
        outcome.uplink = {j: carry.uplink.get(j, BitCount()) + bits for j, bits in outcome.uplink.items()}
        return outcome, columns

    def _screen(self, plan: RoundPlan, replies: Mapping[int, ClientReply], proposed: Sequence[Proposal],
                pre_rejected: Mapping[int, str] | None, died: Mapping[int, str] | None
                ) -> tuple[dict[int, str], dict[int, ClientReply], set[int]]:
        """Stop if a worker ``died``; else the clients rejected before the server step (``pre_rejected``, unfit
        states, non-finite losses), the others' replies, and which of those are first commits."""
        if died:
            j = min(died)
            self._stop(ActorDeathError, f"round {plan.k}: the worker running client {j} died "
                                        f"({first_line(clip_text(died[j], 300))}); Flower's Ray actor pool "
                                        f"does not replace dead actors, so the run stops here")
        rejected = {**(pre_rejected or {}), **self._unfit_states(replies, proposed)}
        rejected.update(_non_finite_losses(replies, plan.broadcast.phase))
        replies = {j: r for j, r in replies.items() if j not in rejected}
        return rejected, replies, set((self.table.commits == 0).nonzero().flatten().tolist()) & set(replies)

    def _commit(self, proposed: Sequence[Proposal], outcome: ServerOutcome, first: set[int], k: int,
                bc: Broadcast) -> None:
        """Commit the accepted clients' rows: the columns they sent, and the ones the server derives from
        their old rows and accepted payloads (``Algorithm.derive_state``); then their commit counts and
        ``seen`` rounds."""
        accepted = set(outcome.accepted)
        for prop in proposed:
            self.table.write_accepted(prop.clients, prop.columns, accepted)
        ids = sorted(accepted)
        if self.algorithm.derived and ids:
            self.algorithm.derive_state(self.table.columns, ids, outcome.decoded, first)
        self.table.mark(ids, k, bc.model)

    def _unfit_states(self, replies: Mapping[int, ClientReply], proposed: Sequence[Proposal]) -> dict[int, str]:
        """The replying clients of blocks whose proposed state columns do not fit the client-state schema
        (:meth:`ClientStateTable.check`), with the reason, and replying clients no block proposes a state
        for: their payloads are rejected before the server step, so nothing of theirs is committed."""
        out, covered = {}, set()
        for prop in proposed:
            why = self.table.check(prop.columns, len(prop.clients), self.algorithm.derived)
            covered.update(prop.clients)
            if why is not None:
                out.update({j: f"state: {why}" for j in prop.clients if j in replies})
        out.update({j: "state: the reply came without a proposed state" for j in replies if j not in covered})
        return out

    def _require_finite(self, k: int, bad: Sequence[str]) -> None:
        """Stop the run, with the state from before round ``k``, when ``bad`` names non-finite quantities."""
        if bad:
            self._stop(NonFiniteStateError, f"round {k}: NaN/Inf in {', '.join(bad)}; {SMALLER_RADIUS}")

    def _no_progress(self) -> str | None:
        """Why the run must stop for want of accepted clients, or None: the last ``max_failed_rounds``
        rounds (when > 0) accepted none, or the run is over and none of its rounds accepted any."""
        rows = self.history
        trailing = next((i for i, row in enumerate(reversed(rows)) if row.get("accepted", 0)), len(rows))
        if self.max_failed_rounds and trailing >= self.max_failed_rounds:
            return (f"round {self.next_round - 1}: no client was accepted in the last {trailing} rounds "
                    f"(max_failed_rounds={self.max_failed_rounds})")
        if self.done and rows and trailing == len(rows):
            return f"no client was accepted in any of the run's {len(rows)} rounds"
        return None

    def _stop(self, error: type[RunStopped], message: str) -> None:
        """Checkpoint the state from before the current round (if checkpointing) and raise ``error``."""
        path = None
        if self.checkpointer is not None:
            path = self.checkpointer.save(self.snapshot())
            message += f"; checkpoint of round {self.next_round} in {path}"
        log.error(message)
        raise error(message, self.next_round, path)


def _phase_columns(plan: RoundPlan, outcome: ServerOutcome) -> dict[str, float]:
    """Phase p's bit columns: ``up_phase<p>_*`` over the clients it accepted, ``down_phase<p>_<convention>_total``
    what its broadcast cost its receivers."""
    bc = plan.broadcast
    down = {f"down_phase{bc.phase}_{c}_total": float(bc.bits.total(c) * len(plan.participants)) for c in CONVENTIONS}
    return {**bit_columns(f"up_phase{bc.phase}", outcome.uplink), **down}


def _non_finite_state(state: Mapping[str, Any]) -> list[str]:
    """The server state's tensors holding a NaN/Inf, by path (``X.w``, ``G.w``, ``optimizer.state.0.exp_avg``)."""
    bad: list[str] = []

    def visit(obj: Any, path: str) -> None:
        if isinstance(obj, Tensor):
            if obj.is_floating_point() and not bool(torch.isfinite(obj).all()):
                bad.append(path)
        elif isinstance(obj, Mapping):
            for key, value in obj.items():
                visit(value, f"{path}.{key}" if path else str(key))
        elif isinstance(obj, (list, tuple)):
            for i, value in enumerate(obj):
                visit(value, f"{path}.{i}")

    visit(state, "")
    return bad
