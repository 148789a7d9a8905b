"""The algorithm interface (docs/DESIGN.md §3) and the plumbing every algorithm shares.

An algorithm is a client step and a server step on dicts of tensors::

    broadcast(server_state, k, ...)                     -> Broadcast (model to compute at, flags, bits)
    client_step(client_state, broadcast, objective, j)  -> (client_state', ClientReply)
    server_step(server_state, {j: reply}, broadcast)    -> (server_state', ServerOutcome)

``client_state'`` is *committed by the driver only if the server accepted j's reply*
(``ServerOutcome.accepted``); a rejected, failed or late client keeps its old state, so client and
server trackers never drift apart (docs/DESIGN.md §2). Replies are processed in client-id order and all
randomness comes from ``fedgluon.rng.generator(seed, purpose, client, round)``.

Subclasses are compositions of named parts: a client-side *estimator* (fedgluon.estimators), an
*uplink* (what is compressed and how the server aggregates it), and a *server update* (the
layer-wise LMO step by default). They override a few small hooks:

* ``local_update(state, grads, bc, j)`` → (new state pieces, tensors to send)
* ``aggregate(server_state, decoded, weights, bc)`` → the server's estimate G
* ``server_update(server_state, G, k)`` → new model X (default: LMO step)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from compressors import BitCount, Compressor, Message, PayloadError, decode_message, decode_messages, make_compressor
from compressors.bits import dense_bits
from compressors.error_feedback import ef21_server_update
from compressors.message import compress_message
from compressors.sparse import SparseTensor, WeightedSum
from compressors.operators import Context

from ..estimators import Estimator, RefreshPolicy, make_estimator
from ..geometry import Geometry
from ..objective import Batch, SupervisedObjective
from ..radius import make_radius_rule
from ..rng import derive_seeds, generator, purpose_code
from ..state_schema import StateSchema
from ..step import LMOStep, StepInfo
from ..vectorised import block_gradients

Tensors = dict[str, Tensor]
State = dict[str, Any]


@dataclass
class Broadcast:
    """What the server sends round k: the model clients compute at, flags, and its bits per client."""

    round: int
    seed: int
    model: Tensors
    flags: dict[str, int] = field(default_factory=dict)
    bits: BitCount = field(default_factory=BitCount)


@dataclass
class ClientReply:
    """A client's reply: its id and round (checked by the server), the payload, and metrics."""

    client: int
    round: int
    message: Message
    loss: float = float("nan")
    grad_evals: int = 0
    samples: int = 0


@dataclass
class ServerOutcome:
    accepted: list[int]
    rejected: dict[int, str]
    uplink: dict[int, BitCount]
    step: StepInfo | None = None


@dataclass
class GradPair:
    """Gradients of one client round: at the broadcast model and, when needed, at the client's X_prev on
    the same batch; or a large-batch gradient on refresh rounds."""

    now: Tensors
    prev: Tensors | None
    refresh: bool
    loss: float
    evals: int
    samples: int


class Algorithm:
    """Shared plumbing; see the module docstring. Options are validated against ``OPTIONS``."""

    name: ClassVar[str] = "base"
    estimator: ClassVar[str | None] = None  # client-side estimator name, or None for the plain gradient
    uses_refresh: ClassVar[bool] = False  # draws a large-batch refresh coin per round
    BASE_OPTIONS: ClassVar[dict[str, Any]] = {
        "lr": 0.02, "schedule": "constant", "power": 0.75, "total": None, "warmup": 0, "final_fraction": 0.0,
        "adaptive": None, "weight_decay": 0.0, "constrained": False,
        "values": "fp32",  # value codec of dense messages ("fp64" for exact float64 runs)
        "downlink": None,  # compressor spec for EF21-P on the model shift (any algorithm)
        "state_dtype": None,  # "float16"/"bfloat16": store the client estimator's state compactly
    }
    OPTIONS: ClassVar[dict[str, Any]] = {}
    # where client blocks compute their vmapped gradients (the run spec's client_device; set by
    # fedgluon.spec.build); the states, estimators and compression stay on the CPU
    client_device: torch.device = torch.device("cpu")

    def __init__(self, geometry: Geometry, **options: Any):
        allowed = {**self.BASE_OPTIONS, **self.OPTIONS}
        unknown = set(options) - set(allowed)
        if unknown:
            raise ValueError(f"algorithm {self.name!r} got unknown option(s) {sorted(unknown)}; "
                             f"allowed: {sorted(allowed)}")
        self.opt = {**allowed, **options}
        self.geometry = geometry
        self.shapes = {p.name: p.shape for p in geometry}
        rule = make_radius_rule(self.opt["lr"], self.opt["schedule"], self.opt["adaptive"], power=self.opt["power"],
                                total=self.opt["total"], warmup=self.opt["warmup"],
                                final_fraction=self.opt["final_fraction"])
        self.lmo_step = LMOStep(geometry, rule, weight_decay=self.opt["weight_decay"],
                                constrained=self.opt["constrained"])
        self.dense = make_compressor({"name": "identity", "values": self.opt["values"]})
        self.downlink = make_compressor(self.opt["downlink"]) if self.opt["downlink"] else None
        est_name = self.estimator_name()
        self.est: Estimator | None = make_estimator(est_name, **self._estimator_options()) if est_name else None
        if self.opt["state_dtype"] not in STATE_DTYPES:
            raise ValueError(f"state_dtype must be one of {list(STATE_DTYPES)}, got {self.opt['state_dtype']!r}")
        self.state_dtype = STATE_DTYPES[self.opt["state_dtype"]]
        self.refresh_policy = None
        if self.uses_refresh:
            prob, period = self.opt.get("refresh_prob"), self.opt.get("refresh_period")
            self.refresh_policy = RefreshPolicy(prob=prob if period is None else None, period=period)

    def estimator_name(self) -> str | None:
        return self.estimator

    def _estimator_options(self) -> dict[str, Any]:
        return {k: self.opt[k] for k in ("beta", "nesterov", "gamma", "clip", "rank", "oversample", "seed")
                if k in self.opt}

    @property
    def uplink(self) -> Compressor:
        """The compressor the server validates replies with."""
        return self.dense

    @property
    def needs_previous(self) -> bool:
        return bool(self.est and self.est.needs_previous)

    # ------------------------------------------------------------------ server: state and broadcast
    def init_server(self, X0: Mapping[str, Tensor]) -> State:
        X = {n: X0[n].detach().clone() for n in self.shapes}
        state: State = {"X": X, "round": 0}
        if self.downlink is not None:
            state["W"] = {n: t.clone() for n, t in X.items()}  # the shadow model every client holds
        return state

    def broadcast(self, server_state: State, k: int, seed: int, num_clients: int) -> Broadcast:
        flags = {}
        if self.refresh_policy is not None:
            flags["refresh"] = int(self.refresh_policy.due(k, generator(seed, "refresh", k)))
        model = server_state["W"] if self.downlink is not None else server_state["X"]
        bits = server_state.get("downlink_bits") or dense_bits(sum(t.numel() for t in model.values()),
                                                               self.dense.values.bits(1, {}).value_bits)
        return Broadcast(k, seed, model, flags, bits)

    # ------------------------------------------------------------------ client
    def batch_for(self, bc: Broadcast, objective: SupervisedObjective, j: int) -> tuple[Batch, bool]:
        """Client j's batch of round k from ``generator(seed, "sample", j, k)``: a large batch on refresh
        rounds (second value True), else a minibatch."""
        return self._batch(bc, objective, generator(bc.seed, "sample", j, bc.round))

    def block_batches(self, bc: Broadcast, objectives: Sequence[SupervisedObjective],
                      js: Sequence[int]) -> dict[int, tuple[Batch, bool]]:
        """:meth:`batch_for` of a block's clients, their generators' seeds derived in one vectorised call
        (:func:`fedgluon.rng.derive_seeds`, equal to ``generator(seed, "sample", j, k)``'s); one generator
        re-seeded per client (seeding sets its whole state, so each draw is that of a fresh generator)."""
        seeds = derive_seeds(bc.seed, "sample", np.asarray(js, dtype=np.int64), bc.round).tolist()
        gen = torch.Generator(device="cpu")
        return {j: self._batch(bc, objectives[j], gen.manual_seed(s)) for j, s in zip(js, seeds)}

    @staticmethod
    def _batch(bc: Broadcast, objective: SupervisedObjective, gen: torch.Generator) -> tuple[Batch, bool]:
        if bc.flags.get("refresh"):
            return objective.large_batch(gen), True
        return objective.sample_batch(gen), False

    def wants_previous(self, state: State, refresh: bool) -> bool:
        """Does this client step also need ∇f_j(X_prev; same batch)?"""
        return not refresh and self.needs_previous and "x_prev" in state

    @staticmethod
    def grad_pair(now: tuple[float, Tensors], prev: tuple[float, Tensors] | None, refresh: bool,
                  batch: Batch) -> GradPair:
        n, calls = len(batch[1]), 1 + (prev is not None)
        return GradPair(now[1], prev[1] if prev is not None else None, refresh, now[0], calls, n * calls)

    def gradients(self, state: State, bc: Broadcast, objective: SupervisedObjective, j: int) -> GradPair:
        """Gradients at the broadcast model (and at X_prev on the same batch when the estimator needs it)."""
        batch, refresh = self.batch_for(bc, objective, j)
        now = objective.gradient(bc.model, batch)
        prev = objective.gradient(state["x_prev"], batch) if self.wants_previous(state, refresh) else None
        return self.grad_pair(now, prev, refresh, batch)

    def block_gradients(self, states: Mapping[int, State], bc: Broadcast,
                        objectives: Sequence[SupervisedObjective], js: Sequence[int]) -> dict[int, GradPair]:
        """:meth:`gradients` of a block of clients at once (``fedgluon.vectorised``): the same batches from
        the same generators; gradients equal to the per-client ones up to rounding (bitwise in float32 here)."""
        drawn = self.block_batches(bc, objectives, js)
        batches = {j: b for j, (b, _) in drawn.items()}
        now = block_gradients(objectives, batches, shared=bc.model, device=self.client_device)
        with_prev = [j for j in js if self.wants_previous(states[j], drawn[j][1])]
        prev = block_gradients(objectives, {j: batches[j] for j in with_prev},
                               per_client={j: states[j]["x_prev"] for j in with_prev},
                               device=self.client_device) if with_prev else {}
        return {j: self.grad_pair(now[j], prev.get(j), drawn[j][1], batches[j]) for j in js}

    def estimate(self, state: State, grads: GradPair) -> tuple[State, Tensors]:
        """The client-side estimator's step (plain gradient when there is none). With ``state_dtype`` the
        estimator's state is stored in that dtype and computed with in the gradients' dtype: it never
        leaves the client, so client and server stay consistent (docs/DESIGN.md §2); the estimate itself is
        rounded once per round."""
        if self.est is None:
            return {}, grads.now
        stored = state.get("est")
        if self.state_dtype is not None:
            stored = _cast_floats(stored, next(iter(grads.now.values())).dtype)
        if grads.refresh and self.est.supports_refresh:
            est_state, v = self.est.refresh(stored, grads.now)
        else:
            est_state, v = self.est.update(stored, grads.now, grads.prev)
        if self.state_dtype is not None:
            est_state = _cast_floats(est_state, self.state_dtype)
        return {"est": est_state}, v

    def local_update(self, state: State, grads: GradPair, bc: Broadcast, j: int) -> tuple[State, Message]:
        """Default uplink: the estimate, dense."""
        new, v = self.estimate(state, grads)
        msg, _ = compress_message(self.dense, v, (bc.seed, j, bc.round))
        return new, msg

    def client_step(self, state: State | None, bc: Broadcast, objective: SupervisedObjective,
                    j: int) -> tuple[State, ClientReply]:
        state = state or {}
        return self.finish_client_step(state, self.gradients(state, bc, objective, j), bc, j)

    def block_local_update(self, states: Sequence[State], grads: Sequence[GradPair], bc: Broadcast,
                           js: Sequence[int]) -> list[tuple[State, Message]]:
        """:meth:`local_update` of a block of clients; uplinks that can compress a block at once override
        it (equal results, client by client)."""
        return [self.local_update(s, g, bc, j) for s, g, j in zip(states, grads, js)]

    def finish_client_step(self, state: State, grads: GradPair, bc: Broadcast, j: int) -> tuple[State, ClientReply]:
        """Estimator, compression and the proposed new state, given the round's gradients."""
        return self.propose(state, grads, bc, j, *self.local_update(state, grads, bc, j))

    def propose(self, state: State, grads: GradPair, bc: Broadcast, j: int, updates: State,
                msg: Message) -> tuple[State, ClientReply]:
        """The proposed new state (committed only if the server accepts) and the reply."""
        new_state = {**state, **updates, "commits": commit_count(state) + 1}
        if self.needs_previous or "x_prev" in state:  # the broadcast tensors themselves: servers never change
            new_state["x_prev"] = dict(bc.model)      # a model in place, so every client shares one copy
        return new_state, ClientReply(j, bc.round, msg, grads.loss, grads.evals, grads.samples)

    def state_schema(self, objective: SupervisedObjective, X0: Mapping[str, Tensor], seed: int) -> StateSchema:
        """The run's client-state schema (:mod:`fedgluon.state_schema`): the layout of the state that one
        throwaway step of client 0 proposes from no state at round 0, at ``X0`` with the run's ``seed``.
        Nothing of the run is touched: every draw comes from its own seeded generator."""
        bc = self.broadcast(self.init_server(X0), 0, seed, 1)
        state, _ = self.client_step(None, bc, objective, 0)
        return StateSchema.of(state)

    def derived_mismatch(self, old: State | None, new: Mapping[str, Any], bc: Broadcast,
                         seen: set[int] | None = None) -> str | None:
        """Why a proposed state disagrees with what the server knows of it (None when it agrees): its
        ``commits`` must be the committed count plus one, and its ``x_prev`` (the model the client last
        computed at) the round's broadcast model. Called on states that fit the schema; ``seen`` holds
        the ids of tensors already found equal (a block's clients share one ``x_prev``)."""
        counted = int(old["commits"]) if old and "commits" in old else 0
        if "commits" in new and int(new["commits"]) != counted + 1:
            return f"state claims {int(new['commits'])} commits, the server counts {counted} + 1"
        seen = set() if seen is None else seen
        for n, t in (new.get("x_prev") or {}).items():
            if t is bc.model[n] or id(t) in seen:
                continue
            if not torch.equal(t, bc.model[n]):
                return f"state leaf 'x_prev/{n}' is not the model of round {bc.round}"
            seen.add(id(t))
        return None

    # A block's clients step in runs whose gradients take about this many bytes (a run's gradients,
    # activations and error-feedback rows then stay near the cache instead of streaming through memory)
    RUN_BYTES: ClassVar[int] = 32 * 2 ** 20

    def client_block(self, states: Mapping[int, State | None], bc: Broadcast,
                     objectives: Sequence[SupervisedObjective], js: Sequence[int]) -> dict[int, tuple[State, ClientReply]]:
        """``client_step`` of a block of virtual clients, in runs of :meth:`run_length` clients whose
        gradients are computed in one vmapped call each (each client's result depends on its own state,
        batch and the broadcast alone, so on neither the block nor the run it is in); algorithms with
        their own ``client_step`` (several local steps) run it client by client."""
        if type(self).client_step is not Algorithm.client_step:
            return {j: self.client_step(states[j], bc, objectives[j], j) for j in js}
        per = self.run_length(bc)
        out: dict[int, tuple[State, ClientReply]] = {}
        for start in range(0, len(js), per):
            out.update(self._client_run(states, bc, objectives, js[start:start + per]))
        return out

    def steps_columns(self) -> bool:
        """Whether :meth:`column_block` may step a block on columns (:mod:`fedgluon.algorithms.columns`)."""
        return False

    def column_block(self, columns: Any, bc: Broadcast, objectives: Sequence[SupervisedObjective]) -> Any:
        """:meth:`client_block` on a block's state columns, where an algorithm can (``FeedbackUplink``);
        None: the caller takes :meth:`client_block`."""
        return None

    def column_runs(self, columns: Any, bc: Broadcast, objectives: Sequence[SupervisedObjective]) -> list[Any] | None:
        """:meth:`column_block` of a block's columns in runs of :meth:`run_length` clients
        (``BlockColumns.runs``: views), as :meth:`client_block` steps a block, so a large block's
        gradients, estimates and trackers stay near the cache; None if any run declines."""
        steps = []
        for run in columns.runs(self.run_length(bc)):
            step = self.column_block(run, bc, objectives)
            if step is None:
                return None
            steps.append(step)
        return steps

    def run_length(self, bc: Broadcast) -> int:
        """Clients per run of a block step: ``RUN_BYTES`` over one client's gradient bytes (two gradients
        for estimators that also need ∇f(X_prev)); at least 1."""
        grad_bytes = sum(t.numel() * t.element_size() for t in bc.model.values()) * (1 + self.needs_previous)
        return max(1, self.RUN_BYTES // max(1, grad_bytes))

    def _client_run(self, states: Mapping[int, State | None], bc: Broadcast, objectives: Sequence[SupervisedObjective],
                    js: Sequence[int]) -> dict[int, tuple[State, ClientReply]]:
        full = [states[j] or {} for j in js]
        grads = self.block_gradients(dict(zip(js, full)), bc, objectives, js)
        pairs = [grads[j] for j in js]
        updates = self.block_local_update(full, pairs, bc, js)
        return {j: self.propose(s, g, bc, j, *u) for j, s, g, u in zip(js, full, pairs, updates)}

    # ------------------------------------------------------------------ server
    def uplink_for(self, bc: Broadcast, reply: ClientReply) -> Compressor:
        """The compressor a reply of this round must use (MARINA/DASHA switch on refresh or first rounds)."""
        return self.uplink

    def validate(self, reply: Any, j: int, bc: Broadcast, sparse: bool = False) -> Tensors:
        """Decode a reply with the uplink compressor's validators; raises PayloadError. With ``sparse``,
        sparse layers stay :class:`~compressors.sparse.SparseTensor` (what the server holds)."""
        return decode_message(self._reply_uplink(reply, j, bc), reply.message, self.shapes, dtype=self._value_dtype,
                              sparse=sparse)

    def value_bound(self, num_clients: int) -> float:
        """The largest ``|v|`` the server accepts in a decoded payload of a run of ``num_clients`` clients:
        ``B = F / (2n)`` with ``F`` the largest finite value of the server's value dtype (float32: 3.4e38).

        It holds each client to a bound of its own, whatever the other clients send and in whatever
        order: the server's aggregates are sums of at most n terms ``w_j v_j`` with weights
        ``w_j ≤ 1`` (the weighted mean, ``Σ_j w_j v_j / Σ_j w_j``, and one round of a tracker,
        ``Σ_j w_j R_j``), so every partial sum is at most ``n·B = F/2`` in magnitude and, added to a
        tracker below ``F/2``, stays finite. A tracker grown over many rounds beyond that, or a server
        optimizer that squares the aggregate (AdamW), can still overflow; the run then stops cleanly
        (fedgluon/federation.py)."""
        return float(torch.finfo(self._value_dtype).max) / (2 * max(1, num_clients))

    def validate_each(self, replies: Mapping[int, Any], bc: Broadcast, sparse: bool = False,
                      max_abs: float | None = None) -> Iterator[tuple[int, Tensors | PayloadError, Compressor | None]]:
        """:meth:`validate` of every reply: yields ``(j, decoded or error, its uplink compressor)`` per
        client (None for a reply whose compressor could not be told), the same results and errors as one
        by one, with the messages of one uplink compressor checked and decoded together
        (:func:`compressors.decode_messages`: one set of array operations per layer for a round's
        top-k / rand-k payloads instead of one per client). With ``max_abs`` (:meth:`value_bound`), a
        decoded value beyond it is a PayloadError for that client."""
        groups: dict[int, tuple[Compressor, dict[int, Any]]] = {}
        for j in sorted(replies):
            try:
                compressor = self._reply_uplink(replies[j], j, bc)
            except PayloadError as err:
                yield j, err, None
                continue
            groups.setdefault(id(compressor), (compressor, {}))[1][j] = replies[j].message
        for compressor, messages in groups.values():
            for j, result in decode_messages(compressor, messages, self.shapes, dtype=self._value_dtype,
                                             sparse=sparse, max_abs=max_abs):
                yield j, result, compressor

    @property
    def _value_dtype(self) -> torch.dtype:
        return torch.float64 if self.opt["values"] == "fp64" else torch.float32

    def _reply_uplink(self, reply: Any, j: int, bc: Broadcast) -> Compressor:
        """The compressor ``reply`` must use, after checking its type, client and round (PayloadError)."""
        if not isinstance(reply, ClientReply):
            raise PayloadError("*", "reply", f"expected a ClientReply, got {type(reply).__name__}")
        if reply.client != j:
            raise PayloadError("*", "client", f"reply claims client {reply.client!r}, expected {j}")
        if reply.round != bc.round:
            raise PayloadError("*", "round", f"reply is for round {reply.round!r}, expected {bc.round}")
        try:
            return self.uplink_for(bc, reply)
        except (AttributeError, TypeError) as err:  # a malformed message an uplink_for could not read
            raise PayloadError("*", "message", f"{type(err).__name__}: {err}") from None

    def aggregate(self, state: State, decoded: Mapping[int, Tensors], weights: Mapping[int, float],
                  bc: Broadcast) -> Tensors | None:
        """Default: the weighted mean of the accepted dense estimates, renormalised over them."""
        return weighted_mean(decoded, weights)

    def server_update(self, state: State, G: Tensors, k: int) -> tuple[Tensors, StepInfo | None]:
        """Default: the layer-wise LMO step ``X + t ⊙ lmo(G)``."""
        return self.lmo_step.apply(state["X"], G, k)

    def server_step(self, state: State, replies: Mapping[int, Any], bc: Broadcast,
                    weights: Mapping[int, float]) -> tuple[State, ServerOutcome]:
        k = bc.round
        decoded, rejected, uplink = DecodedReplies(self, replies, bc), {}, {}
        bound = self.value_bound(len(weights))
        for j, result, compressor in self.validate_each(replies, bc, sparse=True, max_abs=bound):
            if isinstance(result, PayloadError):
                rejected[j] = str(result)
            else:
                decoded.add(j, result)
                uplink[j] = compressor.message_bits(replies[j].message)
        rejected, uplink = dict(sorted(rejected.items())), dict(sorted(uplink.items()))
        state = dict(state)
        info = None
        G = self.aggregate(state, decoded, weights, bc) if decoded else None
        if G is not None:
            state["G"] = G
            X, info = self.server_update(state, G, k)
            state["X"] = X
            if self.downlink is not None:
                state = self._downlink_update(state, k, bc.seed)
        state["round"] = k + 1
        return state, ServerOutcome(sorted(decoded), rejected, uplink, info)

    def _downlink_update(self, state: State, k: int, seed: int) -> State:
        """EF21-P (docs/ALGORITHMS.md §8.2): ``S = C_P(X^{k+1} − W)``, ``W ← W + S``; clients compute at W."""
        assert self.downlink is not None
        shift = {n: state["X"][n] - state["W"][n] for n in self.shapes}
        msg, _ = compress_message(self.downlink, shift, (seed, purpose_code("downlink"), k))
        dtype = next(iter(state["X"].values())).dtype
        S = decode_message(self.downlink, msg, self.shapes, dtype=dtype)
        state["W"] = {n: state["W"][n] + S[n] for n in self.shapes}
        state["downlink_bits"] = self.downlink.message_bits(msg)
        return state


class DecodedReplies(Mapping[int, Tensors]):
    """The accepted replies of a round, decoded: sparse layers as :class:`SparseTensor` (k values and
    indices), kept while they fit in ``budget`` bytes, decoded again on access beyond it, so a round of
    many large clients never holds every dense payload at once (aggregations read each client once, in
    id order). ``self[j]`` is dense; :meth:`terms` gives the stored (possibly sparse) form, which
    :func:`weighted_mean` and :func:`tracker_update` add at the indices. Decoding is deterministic and
    sparse adds equal dense ones, so every result is the same either way."""

    budget: ClassVar[int] = 256 * 2 ** 20

    def __init__(self, algorithm: Algorithm, replies: Mapping[int, Any], bc: Broadcast):
        self.algorithm, self.replies, self.bc = algorithm, replies, bc
        self.decoded: dict[int, dict[str, Tensor | SparseTensor] | None] = {}  # None: decode again on access
        self.kept_bytes = 0

    def add(self, j: int, tensors: Mapping[str, Tensor | SparseTensor]) -> None:
        size = sum(t.nbytes() if isinstance(t, SparseTensor) else t.numel() * t.element_size()
                   for t in tensors.values())
        keep = self.kept_bytes + size <= self.budget
        self.decoded[j] = dict(tensors) if keep else None
        self.kept_bytes += size if keep else 0

    def terms(self, j: int) -> dict[str, Tensor | SparseTensor]:
        tensors = self.decoded[j]
        return tensors if tensors is not None else self.algorithm.validate(self.replies[j], j, self.bc, sparse=True)

    def __getitem__(self, j: int) -> Tensors:
        return {n: t.dense() if isinstance(t, SparseTensor) else t for n, t in self.terms(j).items()}

    def __contains__(self, j: object) -> bool:  # Mapping's default would decode
        return j in self.decoded

    def __iter__(self):
        return iter(self.decoded)

    def __len__(self) -> int:
        return len(self.decoded)


STATE_DTYPES: dict[str | None, torch.dtype | None] = {None: None, "float16": torch.float16,
                                                       "bfloat16": torch.bfloat16}


def _cast_floats(obj: Any, dtype: torch.dtype) -> Any:
    """``obj`` with every floating-point tensor in it cast to ``dtype`` (torch's pytree map; rest kept)."""
    return tree_map(lambda t: t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t, obj)


def commit_count(state: State | None) -> Tensor:
    """How many of this client's rounds have been committed (a 0-d int64 tensor kept in its state)."""
    count = (state or {}).get("commits")
    return count.clone() if isinstance(count, Tensor) else torch.tensor(0, dtype=torch.int64)


class _Terms(Mapping[int, dict[str, Tensor | SparseTensor]]):
    """``DecodedReplies`` seen through :meth:`DecodedReplies.terms` (sparse layers stay sparse)."""

    def __init__(self, replies: DecodedReplies):
        self.replies = replies

    def __getitem__(self, j: int) -> dict[str, Tensor | SparseTensor]:
        return self.replies.terms(j)

    def __iter__(self):
        return iter(self.replies)

    def __len__(self) -> int:
        return len(self.replies)


def _terms(decoded: Mapping[int, Tensors]) -> Mapping[int, Mapping[str, Tensor | SparseTensor]]:
    return _Terms(decoded) if isinstance(decoded, DecodedReplies) else decoded


def weighted_mean(decoded: Mapping[int, Tensors], weights: Mapping[int, float]) -> Tensors:
    """``Σ_j w_j V_j / Σ_j w_j`` over the given clients, summed in client-id order from zero (sparse
    replies added at their indices)."""
    total = sum(weights[j] for j in decoded)
    out, terms = WeightedSum(), _terms(decoded)
    for j in sorted(decoded):
        out.add(weights[j] / total, terms[j])
    return out.result()


def tracker_update(G: Mapping[str, Tensor] | None, decoded: Mapping[int, Tensors], weights: Mapping[int, float],
                   like: Mapping[str, Tensor]) -> Tensors:
    """``G ← G + Σ_{j accepted} w_j R_j`` (absent clients contribute their last tracker, docs/DESIGN.md §2)."""
    start = G if G is not None else {n: torch.zeros_like(like[n]) for n in like}
    return ef21_server_update(start, _terms(decoded), weights)


def compress_with(compressor: Compressor, tensors: Mapping[str, Tensor], bc: Broadcast, j: int,
                  states: Mapping[str, Any] | None = None) -> tuple[Message, dict[str, Any]]:
    """Compress a client's tensors with seeds from (run seed, client, round)."""
    return compress_message(compressor, tensors, (bc.seed, j, bc.round), states)


__all__ = ["Algorithm", "Broadcast", "ClientReply", "Context", "GradPair", "ServerOutcome", "commit_count", "compress_with",
           "tracker_update", "weighted_mean"]
