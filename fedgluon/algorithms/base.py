"""The algorithm interface and the plumbing every algorithm shares.

docs/DESIGN.md §3, "Algorithm interface" (``broadcast``, ``client_step`` over a block of rows, ``server_step``;
the hooks ``local_update``, ``reply_group``, ``aggregate``, ``server_update``) and "Rounds of several phases"
(``phases``, ``server_phase``, the commit rule across phases); §2 for the commit rule and the randomness.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from compressors import BitCount, Compressor, PayloadError, decode_message, decode_messages, make_compressor
from compressors.bits import dense_bits
from compressors.error_feedback import check_contractive
from compressors.message import compress_block, compress_message
from fedgluon.algorithms.aggregate import DecodedReplies, Terms, weighted_mean
from fedgluon.algorithms.block import BlockGrads, BlockResult, PayloadGroup, concat
from fedgluon.algorithms.messages import Broadcast, ClientReply, ServerOutcome
from fedgluon.clients.blocks import run_slices
from fedgluon.clients.objective import Batch, SupervisedObjective
from fedgluon.clients.state_schema import StateSchema
from fedgluon.clients.table import ClientRows, nest
from fedgluon.clients.vectorised import stacked_gradients
from fedgluon.core.rng import derive_seeds, generator, purpose_code
from fedgluon.lmo.estimators import OPTIONS as ESTIMATOR_OPTIONS
from fedgluon.lmo.estimators import Estimator, RefreshPolicy, make_estimator
from fedgluon.lmo.geometry import Geometry
from fedgluon.lmo.radius import make_radius_rule
from fedgluon.lmo.step import LMOStep, StepInfo

Tensors = dict[str, Tensor]
State = dict[str, Any]


class Algorithm:
    """Shared plumbing; see the module docstring. Options are validated against ``OPTIONS``."""

    name: ClassVar[str] = "base"
    estimator: ClassVar[str | None] = None  # client-side estimator name, or None for the plain gradient
    uses_refresh: ClassVar[bool] = False  # draws a large-batch refresh coin per round
    phases: ClassVar[int] = 1  # client phases per round (docs/DESIGN.md §3)
    BASE_OPTIONS: ClassVar[dict[str, Any]] = {
        "lr": 0.02, "schedule": "constant", "power": 0.75, "total": None, "warmup": 0, "final_fraction": 0.0,
        "adaptive": None, "weight_decay": 0.0, "constrained": False,
        "values": "fp32",  # value codec of dense messages ("fp64" for exact float64 runs)
        "downlink": None,  # compressor spec for EF21-P on the model shift (any algorithm)
        "state_dtype": None,  # "float16"/"bfloat16": store the client estimator's state compactly
    }
    OPTIONS: ClassVar[dict[str, Any]] = {}
    compressor: Compressor | None = None  # the uplink compressor of a compressing method (set in its __init__)
    # where client blocks compute their vmapped gradients (the run spec's client_device; set by
    # fedgluon.config.spec.build); the states, estimators and compression stay on the CPU
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
        self.dense = make_compressor({"name": "identity", "values": self.opt["values"]}, "algorithm")
        self.downlink = make_compressor(self.opt["downlink"], "algorithm.downlink") if self.opt["downlink"] else None
        if self.downlink is not None:
            check_contractive("EF21-P", self.downlink, self.shapes, "downlink")
        est_name = self.estimator_name()
        own = {k: self.opt[k] for k in ESTIMATOR_OPTIONS if k in self.opt}  # make_estimator takes its estimator's
        self.est: Estimator | None = make_estimator(est_name, **own) if est_name else None
        if self.opt["state_dtype"] not in STATE_DTYPES:
            raise ValueError(f"state_dtype must be one of {list(STATE_DTYPES)}, got {self.opt['state_dtype']!r}")
        self.state_dtype = STATE_DTYPES[self.opt["state_dtype"]]
        self.refresh_policy = None
        if self.uses_refresh:
            prob, period = self.opt.get("refresh_prob"), self.opt.get("refresh_period")
            self.refresh_policy = RefreshPolicy(prob=prob if period is None else None, period=period)

    def estimator_name(self) -> str | None:
        return self.estimator

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
        return Broadcast(k, seed, model, flags, server_state.get("downlink_bits") or self.dense_bits(model))

    def dense_bits(self, tensors: Mapping[str, Tensor]) -> BitCount:
        """The bits of ``tensors`` sent dense at the run's value width (a broadcast's model, its extra terms)."""
        return dense_bits(sum(t.numel() for t in tensors.values()), self.dense.values.bits(1).value_bits)

    # ------------------------------------------------------------------ client: one step over a block
    def gradients(self, rows: ClientRows, bc: Broadcast, objectives: Sequence[SupervisedObjective]) -> BlockGrads:
        """The block's gradients at the broadcast model and, when the estimator needs them, at each row's
        ``X_prev`` (the model of round ``seen``) on the same batch: rows grouped by that round, each group
        in vmapped calls (:func:`fedgluon.clients.vectorised.stacked_gradients`). Client j's batch of round k
        comes from ``generator(seed, "sample", j, k)`` (the block's seeds from
        :func:`fedgluon.core.rng.derive_seeds`; one generator re-seeded per client, which sets its whole
        state): a large batch on refresh rounds, else a minibatch."""
        js, refresh = rows.clients, bool(bc.flags.get("refresh"))
        seeds = derive_seeds(bc.seed, "sample", np.asarray(js, dtype=np.int64), bc.round).tolist()
        gen = torch.Generator(device="cpu")
        batches: list[Batch] = [(objectives[j].large_batch if refresh else objectives[j].sample_batch)(
            gen.manual_seed(s)) for j, s in zip(js, seeds)]
        loss, now = stacked_gradients(objectives, js, batches, shared=bc.model, device=self.client_device)
        has_prev = torch.zeros(len(js), dtype=torch.bool)
        prev = None
        if self.needs_previous and not refresh:
            has_prev = rows.seen >= 0
            for r in sorted(set(rows.seen[has_prev].tolist())):
                at = (rows.seen == r).nonzero().flatten().tolist()
                _, g = stacked_gradients(objectives, [js[i] for i in at], [batches[i] for i in at],
                                         shared=rows.models[r], device=self.client_device)
                if len(at) == len(js):
                    prev = g
                    break
                prev = prev if prev is not None else {n: torch.zeros_like(t) for n, t in now.items()}
                for n in prev:
                    prev[n][at] = g[n]
        calls = [1 + int(p) for p in has_prev.tolist()]
        return BlockGrads(now, prev, has_prev, refresh, loss, calls,
                          [len(b[1]) * c for b, c in zip(batches, calls)])

    def estimate(self, state: State | None, grads: BlockGrads, first: Tensor) -> tuple[State, Tensors]:
        """The client-side estimator's block step (the plain gradient when there is none); ``first`` marks
        the rows that step for the first time. With ``state_dtype`` the estimator's state is stored in that
        dtype and computed with in the gradients' dtype: it never leaves the client (docs/DESIGN.md §2)."""
        if self.est is None:
            return {}, grads.now
        stored = (state or {}).get("est")
        if stored is None:
            stored = self.est.zero_state(grads.now)
        elif self.state_dtype is not None:
            stored = _cast_floats(stored, next(iter(grads.now.values())).dtype)
        if grads.refresh and self.est.supports_refresh:
            est_state, v = self.est.refresh(stored, grads.now, first)
        else:
            est_state, v = self.est.update(stored, grads.now, grads.prev, first)
        if self.state_dtype is not None:
            est_state = _cast_floats(est_state, self.state_dtype)
        return {"est": est_state}, v

    def local_update(self, state: State | None, grads: BlockGrads, bc: Broadcast,
                     rows: ClientRows) -> tuple[State, dict[str, PayloadGroup]]:
        """The proposed state pieces and the payload groups of a block; default: the estimate, dense."""
        new, v = self.estimate(state, grads, rows.first)
        return new, self.send("dense", v, bc, rows)

    def send(self, group: str, tensors: Mapping[str, Tensor], bc: Broadcast, rows: ClientRows,
             at: Sequence[int] | None = None) -> dict[str, PayloadGroup]:
        """``tensors`` ((B', *shape): the block's rows ``at``, default all) compressed with the group's
        compressor, row i with seeds from (run seed, its client, round)."""
        at = list(range(len(rows))) if at is None else list(at)
        seeds = [(bc.seed, rows.clients[i], bc.round) for i in at]
        layers, _ = compress_block(self.compressor_of(group), tensors, seeds)
        return {group: PayloadGroup(at, layers)}

    def client_step(self, rows: ClientRows, bc: Broadcast, objectives: Sequence[SupervisedObjective]) -> BlockResult:
        """One round of a block of clients (docs/DESIGN.md §3, "Algorithm interface"): gradients, estimator,
        uplink; the proposed state is committed by the server for accepted clients only."""
        grads = self.gradients(rows, bc, objectives)
        updates, groups = self.local_update(rows.tree, grads, bc, rows)
        return BlockResult(rows.clients, bc.round, groups, {**(rows.tree or {}), **updates}, grads.loss,
                           grads.evals, grads.samples)

    # A block steps in runs whose gradients take about this many bytes (a run's gradients, activations
    # and error-feedback rows then stay near the cache instead of streaming through memory)
    RUN_BYTES: ClassVar[int] = 32 * 2 ** 20

    def run_length(self, bc: Broadcast) -> int:
        """Clients per run of a block step: ``RUN_BYTES`` over one client's gradient bytes (two gradients
        for estimators that also need ∇f(X_prev)); at least 1."""
        grad_bytes = sum(t.numel() * t.element_size() for t in bc.model.values()) * (1 + self.needs_previous)
        return max(1, self.RUN_BYTES // max(1, grad_bytes))

    def step_block(self, rows: ClientRows, bc: Broadcast,
                   objectives: Sequence[SupervisedObjective]) -> list[BlockResult]:
        """:meth:`client_step` of a block in runs of :meth:`run_length` clients, one result per run; a run that
        raises ``ArithmeticError`` goes row by row, failing rows in ``failed`` (docs/DESIGN.md §3)."""
        parts = run_slices(len(rows), self.run_length(bc))
        results = [self._isolated(rows.part(part), bc, objectives) for part in parts]
        if self.derived:  # the server computes these itself: drop them now, not at the round's end
            for r in results:
                r.state = nest(r.proposal(self.derived).columns)
        return results

    def _isolated(self, rows: ClientRows, bc: Broadcast, objectives: Sequence[SupervisedObjective]) -> BlockResult:
        try:
            return self.client_step(rows, bc, objectives)
        except ArithmeticError as err:
            if len(rows) == 1:
                return BlockResult(rows.clients, bc.round, {}, rows.tree, [float("nan")], [0], [0],
                                   {0: f"{type(err).__name__}: {err}"})
            return concat([self._isolated(rows.part(slice(i, i + 1)), bc, objectives) for i in range(len(rows))])

    # prefixes of state paths the server derives itself from a client's old row and its accepted payload,
    # never taken from a reply (``derive_state``); they do not travel back
    derived: ClassVar[tuple[str, ...]] = ()

    def derive_state(self, columns: Mapping[str, Tensor], clients: Sequence[int], decoded: DecodedReplies,
                     first: Collection[int]) -> None:
        """Update, in place, the state columns under :attr:`derived` of the client-state table (``columns``:
        path → (n, *shape), row j client j) for the accepted ``clients``, from their committed rows and
        their accepted payloads as the server step decoded them (``decoded[j]``); ``first``: the
        clients whose first participation this was. Called at commit time, after the server step
        succeeded. Nothing by default."""

    def state_schema(self, objective: SupervisedObjective, X0: Mapping[str, Tensor], seed: int) -> StateSchema:
        """The run's client-state schema (:mod:`fedgluon.clients.state_schema`): the layout of one row of the state
        that a throwaway step of client 0 proposes from no state at round 0, at ``X0`` with the run's
        ``seed``. Nothing of the run is touched: every draw comes from its own seeded generator."""
        bc = self.broadcast(self.init_server(X0), 0, seed, 1)
        result = self.client_step(ClientRows.fresh([0]), bc, [objective])
        return StateSchema.of(tree_map(lambda t: t[0], result.state))

    # ------------------------------------------------------------------ server
    def reply_group(self, bc: Broadcast, first: bool) -> str:
        """The payload group a client's reply of this round belongs to, from the server's own flags and
        whether it is the client's first participation (``"dense"`` or ``"uplink"``; MARINA sends dense on
        refresh rounds, DASHA a client's first message). Client and server both ask this. By default
        ``"uplink"`` for a method with a ``compressor``, ``"dense"`` for the others."""
        return "dense" if self.compressor is None else "uplink"

    def compressor_of(self, group: str) -> Compressor:
        """The compressor of a payload group: dense, or the method's ``compressor`` (dense without one)."""
        return self.dense if group == "dense" or self.compressor is None else self.compressor

    def validate(self, reply: Any, j: int, bc: Broadcast, first: bool = False, sparse: bool = False) -> Tensors:
        """Decode a reply with its group's compressor's validators; raises PayloadError. With ``sparse``,
        sparse layers stay :class:`~compressors.sparse.SparseTensor` (what the server holds)."""
        return decode_message(self._reply_uplink(reply, j, bc, first), reply.message, self.reply_shapes(bc),
                              dtype=self._value_dtype, sparse=sparse)

    def reply_shapes(self, bc: Broadcast) -> Mapping[str, tuple[int, ...]]:
        """Layer → shape of a reply's payload in ``bc``'s phase: the model's shapes by default; a method that
        sends several tensors per layer, or other shapes in some phase, names them here. The server decodes
        and bounds replies with it."""
        return self.shapes

    def value_bound(self, num_clients: int) -> float:
        """The largest ``|v|`` the server accepts in a decoded payload of a run of ``num_clients`` clients:
        ``B = F / (2n)`` with ``F`` the largest finite value of the server's value dtype (float32: 3.4e38).

        It holds each client to a bound of its own, whatever the other clients send and in whatever
        order: the server's aggregates are sums of at most n terms ``w_j v_j`` with weights
        ``w_j ≤ 1`` (the weighted mean, ``Σ_j w_j v_j / Σ_j w_j``, and one round of a tracker,
        ``Σ_j w_j R_j``), so every partial sum is at most ``n·B = F/2`` in magnitude and, added to a
        tracker below ``F/2``, stays finite. Its limits: README, "Interrupted runs, faults and stops"."""
        return float(torch.finfo(self._value_dtype).max) / (2 * max(1, num_clients))

    def accept_each(self, replies: Mapping[int, Any], bc: Broadcast, weights: Mapping[int, float],
                    first: Collection[int], add: Callable[[int, Tensors], None], sparse: bool = False
                    ) -> tuple[dict[int, str], dict[int, BitCount]]:
        """:meth:`validate` every reply, with values bounded by :meth:`value_bound`: ``add(j, decoded)`` for
        each accepted one, in client order; returns the rejected clients' reasons and the accepted ones'
        uplink bits, by client. The same results and errors as one by one, with the messages of one
        uplink compressor checked and decoded together (:func:`compressors.decode_messages`: one set of
        array operations per layer for a round's top-k / rand-k payloads instead of one per client)."""
        groups: dict[int, tuple[Compressor, dict[int, Any]]] = {}
        rejected, uplink = {}, {}
        for j in sorted(replies):
            try:
                compressor = self._reply_uplink(replies[j], j, bc, j in first)
            except PayloadError as err:
                rejected[j] = str(err)
                continue
            groups.setdefault(id(compressor), (compressor, {}))[1][j] = replies[j].message
        for compressor, messages in groups.values():
            for j, result in decode_messages(compressor, messages, self.reply_shapes(bc), dtype=self._value_dtype,
                                             sparse=sparse, max_abs=self.value_bound(len(weights))):
                if isinstance(result, PayloadError):
                    rejected[j] = str(result)
                else:
                    add(j, result)
                    uplink[j] = compressor.message_bits(replies[j].message)
        return dict(sorted(rejected.items())), dict(sorted(uplink.items()))

    @property
    def _value_dtype(self) -> torch.dtype:
        return torch.float64 if self.opt["values"] == "fp64" else torch.float32

    def _reply_uplink(self, reply: Any, j: int, bc: Broadcast, first: bool) -> Compressor:
        """The compressor ``reply`` must use, after checking its type, client, round and payload group
        (PayloadError)."""
        if not isinstance(reply, ClientReply):
            raise PayloadError("*", "reply", f"expected a ClientReply, got {type(reply).__name__}")
        if reply.client != j:
            raise PayloadError("*", "client", f"reply claims client {reply.client!r}, expected {j}")
        if reply.round != bc.round:
            raise PayloadError("*", "round", f"reply is for round {reply.round!r}, expected {bc.round}")
        group = self.reply_group(bc, first)
        if reply.group != group:
            raise PayloadError("*", "group", f"reply is in payload group {str(reply.group)[:40]!r}, expected {group!r}")
        return self.compressor_of(group)

    def aggregate(self, state: State, decoded: Mapping[int, Terms], weights: Mapping[int, float],
                  bc: Broadcast) -> Tensors | None:
        """Default: the weighted mean of the accepted estimates, renormalised over them. A decoded layer may be
        sparse (:class:`~compressors.sparse.SparseTensor`: ``.dense()``); :func:`~compressors.sparse.weighted_sum`
        adds either kind."""
        return weighted_mean(decoded, weights)

    def server_update(self, state: State, G: Tensors, k: int) -> tuple[Tensors, StepInfo | None]:
        """Default: the layer-wise LMO step ``X + t ⊙ lmo(G)``."""
        return self.lmo_step.apply(state["X"], G, k)

    def server_step(self, state: State, replies: Mapping[int, Any], bc: Broadcast,
                    weights: Mapping[int, float], first: Collection[int] = ()) -> tuple[State, ServerOutcome]:
        """Validate every reply (``first``: the clients whose first participation this is), aggregate the
        accepted ones and step; the outcome says who was accepted and why others were rejected."""
        k = bc.round
        decoded = DecodedReplies(lambda j: self.validate(replies[j], j, bc, j in first, sparse=True))
        rejected, uplink = self.accept_each(replies, bc, weights, first, decoded.add, sparse=True)
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
        return state, ServerOutcome(sorted(decoded), rejected, uplink, info, decoded)

    def server_phase(self, state: State, replies: Mapping[int, Any], bc: Broadcast, weights: Mapping[int, float],
                     first: Collection[int] = ()) -> tuple[Broadcast, ServerOutcome]:
        """The server's answer to phase ``bc.phase`` of a round with several phases (not the last;
        docs/DESIGN.md §3, "Rounds of several phases"): validate the replies as :meth:`server_step` does
        and return the next phase's broadcast and who was accepted. The server state is not changed.
        Single-phase algorithms never get here."""
        raise NotImplementedError(f"{self.name} has {self.phases} phase(s) per round")

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


STATE_DTYPES: dict[str | None, torch.dtype | None] = {None: None, "float16": torch.float16,
                                                       "bfloat16": torch.bfloat16}


def _cast_floats(obj: Any, dtype: torch.dtype) -> Any:
    """``obj`` with every floating-point tensor in it cast to ``dtype`` (torch's pytree map; rest kept)."""
    return tree_map(lambda t: t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t, obj)


__all__ = ["Algorithm", "BlockGrads", "BlockResult", "Broadcast", "ClientReply", "PayloadGroup",
           "ServerOutcome"]
