"""``GluonStrategy``: a Flower ``Strategy`` that runs any fedgluon algorithm's server step.

What a round does is docs/DESIGN.md §3 ("Federation and drivers", "Rounds of several phases", "Flower apps
and transport"): ``configure_train`` sends each node holding sampled clients a ``train`` message,
``aggregate_train`` reads the replies (``fedgluon.flower.wire``) and hands them to ``Federation.advance`` (each
phase but the last, whose next phase goes out over the grid Flower handed ``configure_train``) and
``Federation.close_round``. Before the first round :meth:`GluonStrategy.connect` maps Flower's random node ids
to blocks with a ``query`` handshake (:meth:`GluonStrategy.hello`): a node with a bad answer is rejected and
logged, and the clients of a block no node holds fail every round. A second reply from the same node is
ignored. Rejections and failures are logged with their reason, client text clipped
(``fedgluon.sim.federation.clip_text``).

A failed reply counts as a dead worker, which stops the run, only by its Flower error code
(:func:`runtime_failure`): any code but ``CLIENT_APP_RAISED_EXCEPTION``, and only where the runtime is
the simulation's (``deaths_stop_run``: Flower's Ray actor pool does not replace a dead actor). On a Flower
deployment the code is a remote node's word, which a node can forge, and its SuperNode starts a new
ClientApp process for the next message: the code fails that block's clients for the round, never the run.
What the reply's reason says, and a node's own ``failed`` record, only fail the clients concerned. A reply
that defeats every check (an exception no check foresaw) rejects its block's clients; it never stops the
server. Client-sent values in messages go through :func:`fedgluon.core.text.shown`, which never raises.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedgluon.algorithms import Algorithm
from fedgluon.clients.blocks import block_clients, block_of, by_block, num_blocks
from fedgluon.clients.state_schema import StateSchema
from fedgluon.core.text import shown
from fedgluon.flower.wire import BlockRead, read_replies, rows_to_record, tensors_to_record
from fedgluon.runtime.gc_pause import RoundPause, round_pauses
from fedgluon.runtime.trace import phase
from fedgluon.sim.checkpoint import Checkpointer, Snapshot
from fedgluon.sim.federation import Evaluate, Federation, RoundPlan, client_weights_from_sizes, clip_text

log = logging.getLogger("fedgluon.strategy")

SAMPLE_CAP = 2 ** 31 - 1  # the most samples a node may report for one client at the handshake
NO_NODE = "no node holds this client's block (rejected or missing at the handshake)"
REPLY_RECORDS = {"failed", "info", "replies", "meta"}  # a train reply's records (fedgluon.flower.client_app)



def runtime_failure(code: int) -> bool:
    """Whether a Flower error reply's ``code`` says the runtime lost the task (the worker process died, the
    node or the reply is gone, the app could not load): any of flwr's ``ErrorCode`` values except
    ``CLIENT_APP_RAISED_EXCEPTION``, which is the ClientApp's own exception and fails only its clients.
    The reason text is never read: a client can write anything there."""
    from flwr.common.constant import ErrorCode

    return code != ErrorCode.CLIENT_APP_RAISED_EXCEPTION


class HandshakeError(ValueError):
    """A node's answer to the handshake query is unusable; the node is rejected."""


class GluonStrategy(Strategy):
    """Drive ``algorithm`` over Flower messages (docs/DESIGN.md §3, "Flower apps and transport"). The server
    side of every round is a :class:`fedgluon.sim.federation.Federation` (shared with the plain driver), made with
    this call's keywords of the same names; ``resume`` continues a checkpointed run, ``checkpointer`` writes
    checkpoints. ``weights``: the mode of the client weights
    (:func:`~fedgluon.sim.federation.client_weights_from_sizes`), from ``sizes``, each client's number of samples
    where the server knows them (the nodes must report the same), else from the nodes' counts."""

    def __init__(self, algorithm: Algorithm, X0: Mapping[str, Any], num_clients: int, *, schema: StateSchema,
                 seed: int = 0, participation: float | int = 1.0, weights: str = "uniform",
                 evaluate: Evaluate | None = None, eval_every: int = 1,
                 on_round: Callable[[dict[str, Any]], None] | None = None, rounds: int = 0,
                 checkpointer: Checkpointer | None = None, resume: Snapshot | None = None, block_size: int = 1,
                 sizes: Sequence[int] | None = None, max_failed_rounds: int = 0, deaths_stop_run: bool = True):
        self.algorithm = algorithm
        self.deaths_stop_run = deaths_stop_run  # module docstring: False on a Flower deployment
        self.num_clients = num_clients
        self.block_size = block_size
        self.num_nodes = num_blocks(num_clients, block_size)
        self.weights_mode = weights
        self.sizes = list(sizes) if sizes is not None else None
        self.federation = Federation(algorithm, X0, num_clients, rounds, seed=seed, participation=participation,
                                     evaluate=evaluate, eval_every=eval_every, on_round=on_round,
                                     checkpointer=checkpointer, resume=resume, max_failed_rounds=max_failed_rounds,
                                     schema=schema)
        self.node_of: dict[int, int] = {}
        self.partition_of: dict[int, int] = {}
        self.ray_nodes: set[str] = set()
        self.node_devices: set[tuple[str, str]] = set()  # (client device, Ray GPU ids) as the nodes report them
        self._round: RoundPlan | None = None
        self._expected: dict[int, list[int]] = {}  # the round's sampled clients by block (by_block), once per round
        self._early: dict[int, tuple[Message, BlockRead]] = {}  # replies read as they came (read_reply)
        self._grid: Grid | None = None  # rounds of several phases send their later phases here
        self._timeout: float | None = None
        self._pause: RoundPause | None = None  # the round's GC pause, while start runs the rounds

    @property
    def server_state(self) -> dict[str, Any]:
        return self.federation.server_state


    @property
    def history(self) -> list[dict[str, Any]]:
        return self.federation.history

    @property
    def client_log(self) -> list[dict[str, Any]]:
        return self.federation.client_log

    # ------------------------------------------------------------------ handshake
    def connect(self, grid: Grid, timeout: float) -> None:
        """Learn each connected node's block, virtual clients and sample counts (``serve`` has waited for the
        ``num_blocks`` nodes: fedgluon.flower.deployment.wait_for_nodes); ``timeout`` bounds the handshake.

        A node whose answer :meth:`hello` refuses is logged and left out; the clients of a block no node
        holds fail every round (``max_failed_rounds`` then stops a run that cannot progress). The weights
        come from the server's own sample counts when it has them, else from the nodes' checked counts."""
        msgs = [Message(RecordDict(), dst_node_id=n, message_type="query", group_id="hello")
                for n in sorted(grid.get_node_ids())]
        sizes: dict[int, int] = {}
        for reply in grid.send_and_receive(msgs, timeout=max(1.0, timeout)):
            node = reply.metadata.src_node_id
            try:
                block, counts = self.hello(reply)
            except HandshakeError as err:
                log.warning("handshake: rejected node %s: %s", node, clip_text(err, 300))
                continue
            except Exception:  # noqa: BLE001 - an answer no check foresaw: the node is out, the bug logged loudly
                log.error("handshake: rejected node %s: its answer raised", node, exc_info=True)
                continue
            self.node_of[block], self.partition_of[node] = node, block
            sizes.update(counts)
        unheld = sorted(set(range(self.num_nodes)) - set(self.node_of))
        if unheld:
            log.warning("handshake: no node holds block(s) %s; their clients fail every round", unheld)
        if self.sizes is None and len(sizes) < self.num_clients:
            raise RuntimeError(f"no node answered for clients {sorted(set(range(self.num_clients)) - set(sizes))}, "
                               f"and the server does not know their sample counts")
        known = self.sizes if self.sizes is not None else [sizes[j] for j in range(self.num_clients)]
        self.federation.weights = client_weights_from_sizes(known, self.weights_mode)

    def hello(self, reply: Message) -> tuple[int, dict[int, int]]:
        """A node's handshake answer, checked: ``(block, {client: samples})``; raises HandshakeError for an
        error reply, a block id that is not an integer in ``[0, num_blocks)`` or is already held, a client
        list other than the block's, or a sample count that is not an integer in ``[1, SAMPLE_CAP]`` or
        differs from the server's own count of that client."""
        node = reply.metadata.src_node_id
        if reply.has_error():
            raise HandshakeError(f"error reply (code {shown(reply.error.code, 40)}): "
                                 f"{clip_text(reply.error.reason, 300)}")
        if node in self.partition_of:
            raise HandshakeError("a second answer from the same node")
        hello = reply.content.metric_records.get("hello")
        if hello is None:
            raise HandshakeError("no 'hello' record")
        block = _integer(hello.get("block"), "block", 0, self.num_nodes - 1)
        if block in self.node_of:
            raise HandshakeError(f"block {block} is already held by node {self.node_of[block]}")
        clients = block_clients(block, self.num_clients, self.block_size)
        said = hello.get("clients")
        if not isinstance(said, list) or len(said) != len(clients) or \
                [_integer(j, "clients", 0, self.num_clients - 1) for j in said] != clients:
            raise HandshakeError(f"clients {clip_text(said, 200)}, expected block {block}'s {clients}")
        counts = hello.get("num_samples")
        if not isinstance(counts, list) or len(counts) != len(clients):
            raise HandshakeError(f"num_samples must be a list of {len(clients)} counts, got {clip_text(counts, 200)}")
        out = {j: _integer(n_j, f"num_samples of client {j}", 1, SAMPLE_CAP) for j, n_j in zip(clients, counts)}
        wrong = {j: n_j for j, n_j in out.items() if self.sizes is not None and n_j != self.sizes[j]}
        if wrong:
            raise HandshakeError(f"num_samples {wrong} differ from the server's {({j: self.sizes[j] for j in wrong})}")
        return block, out

    # ------------------------------------------------------------------ Strategy API
    def summary(self) -> None:
        log.info("GluonStrategy: %s over %d clients, participation %s", self.algorithm.name, self.num_clients,
                 self.federation.participation)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._grid = grid  # the later phases of a round go out from aggregate_train (_later_phase)
        if self._pause is not None:
            self._pause.begin()  # the round's GC pause, to the end of aggregate_train (fedgluon/runtime/gc_pause.py)
        with phase("configure", self.federation.next_round):
            self._round = plan = self.federation.open_round()
            self._expected = by_block(plan.participants, self.block_size)
            return self._messages(plan)

    def _messages(self, plan: RoundPlan) -> list[Message]:
        """The ``train`` messages of ``plan``'s phase, one per block with participants. A later phase
        (Algorithm.phases > 1) sends its phase and the rows the clients proposed in the phase before
        (``Federation.rows``), in group ``<round>.<phase>``; any phase sends the broadcast's ``extra`` tensors."""
        bc, k = plan.broadcast, plan.k
        model = tensors_to_record(bc.model)
        multi = self.algorithm.phases > 1
        out = []
        for block, js in self._expected.items():
            if block not in self.node_of:  # no node holds it: its clients fail (aggregate_train)
                continue
            cfg = ConfigRecord({"round": k, "seed": self.federation.seed, "clients": js,
                                "refresh": int(bc.flags.get("refresh", 0))})
            states, prev = rows_to_record(self.federation.rows(plan, js))
            content = RecordDict({"model": model, "config": cfg, "states": states, "prev": prev})
            group = str(k)
            if bc.extra:  # tensors besides the model (Broadcast.extra)
                content["extra"] = tensors_to_record(bc.extra)
            if multi:
                cfg["phase"] = bc.phase
                group = f"{k}.{bc.phase}" if bc.phase else group
            out.append(Message(content, dst_node_id=self.node_of[block], message_type="train", group_id=group))
        return out

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None,
                                                                                        MetricRecord | None]:
        try:
            with phase("aggregate", self._round.k if self._round is not None else -1):
                return self._aggregate_train(replies)
        finally:
            if self._pause is not None:
                self._pause.end()

    def _aggregate_train(self, replies: Iterable[Message]) -> tuple[ArrayRecord, MetricRecord]:
        assert self._round is not None
        plan = self._round
        early, self._early = self._early, {}
        got = self._gather(plan, replies, early)
        while plan.broadcast.phase + 1 < self.algorithm.phases:
            plan, got = self._later_phase(plan, got)
        row = self.federation.close_round(plan, got.replies, got.proposed, got.failed, got.rejected, got.died)
        metrics = MetricRecord({key: float(v) for key, v in row.items() if isinstance(v, (int, float))})
        return tensors_to_record(self.server_state["X"]), metrics

    def _later_phase(self, plan: RoundPlan, got: BlockRead) -> tuple[RoundPlan, BlockRead]:
        """Close ``plan``'s phase (``Federation.advance``), send the next phase to the clients it accepted
        and gather their replies (docs/DESIGN.md §3, "Rounds of several phases")."""
        plan = self.federation.advance(plan, got.replies, got.proposed, got.failed, got.rejected, got.died)
        self._round, self._expected = plan, by_block(plan.participants, self.block_size)
        messages = self._messages(plan)
        assert self._grid is not None, "configure_train keeps the grid"
        replies = self._grid.send_and_receive(messages, timeout=self._timeout) if messages else []
        return plan, self._gather(plan, replies, {})

    def _gather(self, plan: RoundPlan, replies: Iterable[Message],
                early: Mapping[int, tuple[Message, BlockRead]]) -> BlockRead:
        """One phase's replies as ``Federation.close_round`` takes them (replies in client-id order,
        proposed rows, failed, pre-rejected and died clients); expected clients without a reply failed."""
        k, expected = plan.k, self._expected
        out = BlockRead()
        seen: set[int] = set()
        for msg in replies:
            block = self.partition_of.get(msg.metadata.src_node_id)
            if block is None or block not in expected or block in seen:
                log.warning("round %d: ignoring a reply from unexpected node %s", k, msg.metadata.src_node_id)
                continue
            seen.add(block)
            got = early.get(id(msg))
            try:
                read = got[1] if got is not None and got[0] is msg else self._read(msg, expected[block])
            except Exception as err:  # noqa: BLE001 - a reply no check foresaw rejects its block, never the server
                log.error("round %d: unreadable reply from node %s (a check is missing: please report)", k,
                          msg.metadata.src_node_id, exc_info=True)
                read = BlockRead(rejected=dict.fromkeys(expected[block], f"reply: unreadable ({type(err).__name__})"))
            if read.ray_node:
                self.ray_nodes.add(read.ray_node)
            if read.device is not None:
                self.node_devices.add(read.device)
            out.merge(read)
        for j in plan.participants:
            if j not in out.replies and j not in out.failed and j not in out.rejected:
                held = block_of(j, self.block_size) in self.node_of
                out.failed[j] = "no reply before the round timeout" if held else NO_NODE
        out.replies = dict(sorted(out.replies.items()))
        return out

    def read_reply(self, msg: Message) -> None:
        """Read a reply of the current round as soon as it arrives (the Ray engine's grid calls this
        between its pulls, so a block's reply is parsed while the others still compute);
        ``aggregate_train`` then uses what was read, and decides, as for any reply, whether to."""
        plan, meta = self._round, msg.metadata
        block = self.partition_of.get(meta.src_node_id)
        if plan is None or block is None or meta.message_type != "train" or meta.group_id != str(plan.k):
            return
        clients = self._expected.get(block)
        if clients is None:
            return
        try:
            with phase("read", plan.k):  # inside the round's GC pause
                self._early[id(msg)] = (msg, self._read(msg, clients))
        except Exception:  # noqa: BLE001 - read again, and fail there as any reply would, in aggregate_train
            log.debug("round %d: reading a reply early failed", plan.k, exc_info=True)

    def _read(self, msg: Message, clients: list[int]) -> BlockRead:
        """One block's reply: its clients' replies and proposed state columns (views of the reply's
        bytes), failures and rejections (fedgluon/flower/wire.py)."""
        if msg.has_error():
            code = msg.error.code
            why = clip_text(f"error code {shown(code, 40)}: {clip_text(msg.error.reason)}")
            read = BlockRead(failed=dict.fromkeys(clients, why))
            if runtime_failure(code) and self.deaths_stop_run:
                read.died = dict(read.failed)
            return read
        unexpected = sorted(set(msg.content.keys()) - REPLY_RECORDS)
        if unexpected:
            why = f"reply: records the server does not expect: {shown(unexpected[:3], 120)}"
            return BlockRead(rejected=dict.fromkeys(clients, why))
        # Flower rebuilds these typed views on every access (O(records)): take them once per reply
        arrays, configs = msg.content.array_records, msg.content.config_records
        info = configs.get("info")
        node = shown(info["ray_node"], 64, as_repr=False)[:64] if info is not None and info.get("ray_node") else ""
        device = _reported_device(info)
        reported = configs.get("failed")
        reported = {int(j): clip_text(why) for j, why in reported.items() if _client_id(j) in clients} \
            if reported is not None else {}
        working = [j for j in clients if j not in reported]
        read = read_replies(arrays.get("replies"), configs.get("meta"), working, self._round.k,
                            self.federation.table, self.algorithm.reply_shapes(self._round.broadcast),
                            self.algorithm.derived) if working else BlockRead()
        read.failed = {**reported, **{j: clip_text(why) for j, why in read.failed.items()}}
        read.ray_node, read.device = node, device
        return read

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []  # evaluation is central, on the server (aggregate_train)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    # ------------------------------------------------------------------ helpers
    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int | None = None, timeout: float = 3600,
              **kwargs: Any):
        """Run the rounds left (all of them, or those after the resumed checkpoint's round)."""
        left = self.federation.rounds - self.federation.next_round if num_rounds is None else num_rounds
        self._timeout = timeout  # a later phase's deadline (_later_phase), as Flower's for the first
        if left <= 0:
            return None
        with round_pauses() as self._pause:  # the collector is paused once per round, configure to aggregate
            try:
                return super().start(grid=grid, initial_arrays=initial_arrays, num_rounds=left, timeout=timeout,
                                     **kwargs)
            finally:
                self._pause = None


def _integer(value: Any, what: str, low: int, high: int) -> int:
    """``value`` as an int in ``[low, high]`` (an int, or a float with an integer value); else HandshakeError."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise HandshakeError(f"{what} must be an integer in [{low}, {high}], got {shown(value, 100)}")
    return value


def _client_id(key: str) -> int | None:
    """The client id a node's ``failed`` record names by ``key``: ASCII decimal digits only (``str.isdigit``
    also takes "²", which ``int`` refuses, and ``int`` refuses more than 4,300 digits); else None."""
    return int(key) if key.isascii() and key.isdigit() and len(key) <= 18 else None


def _reported_device(info: Any) -> tuple[str, str] | None:
    """A node's (client device, Ray GPU ids) from its reply's info record, each cut to 64 characters (a
    node's word, only reported); None where it did not say."""
    if info is None or not isinstance(info.get("device"), str):
        return None
    gpus = info.get("ray_gpus")
    return info["device"][:64], (gpus if isinstance(gpus, str) else "")[:64]
