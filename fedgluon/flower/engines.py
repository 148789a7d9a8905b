"""Three ways to drive the same Flower apps (docs/DESIGN.md §3, "Engines").

:func:`run_inprocess` hands each message to the real ``ClientApp`` in this process (:class:`InProcessGrid`, no
Ray); :func:`run_ray` runs Flower's simulation engine, whose private Ray's processes run in a session of their
own (fedgluon/runtime/ray_session.py); ``flwr run .`` reads the app components from ``pyproject.toml``. All
three run ``strategies.server_app.serve`` and ``fedgluon.flower.client_app``; the server and every client step
compute with the spec's ``threads`` torch threads (fedgluon/runtime/threads.py).
"""

from __future__ import annotations

import logging
import os
import time
import traceback
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedgluon.clients.blocks import num_blocks
from fedgluon.config import spec as specs
from fedgluon.core.rng import derive_seed
from fedgluon.flower.dispatch import faster_dispatch
from fedgluon.runtime.ray_session import ray_daemons_in_own_session, sigterm_restored
from fedgluon.runtime.threads import torch_threads
from fedgluon.sim.checkpoint import Checkpointer, Snapshot
from fedgluon.sim.faults import SimulatedActorDeath
from fedgluon.sim.federation import Evaluate

QUIET_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_USAGE_STATS_ENABLED": "0",
             "RAY_DEDUP_LOGS": "0",
             # Ray's default today, named so that a later Ray keeps it: a task without a GPU share sees no GPU
             # (fedgluon.core.devices: "auto" is then the CPU); the local Ray's workers inherit it
             "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "1"}


class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process (Flower ships no such backend).

    A ClientApp that raises gets an error reply with Flower's code for that
    (``CLIENT_APP_RAISED_EXCEPTION``), except an injected :class:`~fedgluon.sim.faults.SimulatedActorDeath`,
    which stands for a worker process that exits: ``CLIENT_APP_CRASHED``, a runtime failure.

    Node ids are random-looking 63-bit integers derived from the seed, so the server must learn the
    partition ids through the handshake exactly as on Ray.
    """

    def __init__(self, client_app: ClientApp, num_nodes: int, *, seed: int = 0,
                 run_config: Mapping[str, Any] | None = None):
        self.client_app = client_app
        self._run = Run.create_empty(1)
        self.contexts: dict[int, Context] = {}
        for j in range(num_nodes):
            node_id = derive_seed(seed, "nodes", j)
            self.contexts[node_id] = Context(run_id=1, node_id=node_id,
                                             node_config={"partition-id": j, "num-partitions": num_nodes},
                                             state=RecordDict(), run_config=dict(run_config or {}))
        self._inbox: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg_id = str(uuid.uuid4())
            msg.metadata.__dict__["_message_id"] = msg_id
            self._inbox[msg_id] = msg
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str], timeout: float | None = None) -> Iterable[Message]:
        """Run the ClientApp on each message. A call that takes longer than ``timeout`` seconds is
        dropped, as a reply arriving after the round's deadline would be (nodes run in parallel on a
        real grid, so each call is timed on its own)."""
        replies = []
        for msg_id in message_ids:
            msg = self._inbox.pop(msg_id, None)
            if msg is None:
                continue
            context = self.contexts[msg.metadata.dst_node_id]
            t0 = time.perf_counter()
            try:
                reply = self.client_app(msg, context)
            except SimulatedActorDeath:  # this grid's stand-in for a worker process that exits
                reply = Message(Error(code=ErrorCode.CLIENT_APP_CRASHED, reason=traceback.format_exc()), reply_to=msg)
            except Exception:  # noqa: BLE001 - a failing client becomes an error reply, as in Flower
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=traceback.format_exc()),
                                reply_to=msg)
            if timeout is None or time.perf_counter() - t0 <= timeout:
                replies.append(reply)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages), timeout)


def _quiet() -> None:
    """No telemetry or update checks; Flower's per-round INFO logs off (fedgluon reports progress itself)."""
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    logging.getLogger("flwr").setLevel(logging.WARNING)


@contextmanager
def _engine_notices_filtered() -> Iterator[None]:
    """For the duration, Flower's logger without flwr 1.42's warning that ``run_simulation`` is deprecated in
    favour of ``flwr run`` (the Ray engine calls it on purpose: it is the Python entry to Flower's simulation
    engine; ``flwr run .`` works too, README; fedgluon pins flwr below 1.43), and no Ray tip that a later Ray
    will stop hiding GPUs from tasks with no GPU share (``QUIET_ENV`` names the setting that keeps them hidden)."""
    logger = logging.getLogger("flwr")

    def drop(record: logging.LogRecord) -> bool:
        return "`run_simulation` function is deprecated" not in record.getMessage()

    logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Tip: In future versions of Ray, Ray will no longer override",
                                    category=FutureWarning)
            yield
    finally:
        logger.removeFilter(drop)


@contextmanager
def _actors_end_quietly() -> Iterator[None]:
    """While active, Flower's simulation ends its Ray actors with ``ray.kill`` instead of its remote
    ``terminate`` call, which logs "Manually terminating ClientAppActor" in every actor; Ray forwards those
    lines to this terminal, one per actor, after the run's own output. Either way the idle actors end,
    and Flower shuts Ray down next. Flower's way is kept where its actor pool is not found (logged)."""
    try:
        from flwr.simulation.ray_transport.ray_actor import BasicActorPool

        original = BasicActorPool.terminate_all_actors
    except (ImportError, AttributeError) as err:
        logging.getLogger("fedgluon").debug("Flower's actor pool not found (%s); its actors end Flower's way", err)
        yield
        return

    def terminate_all_actors(pool: Any) -> None:
        import ray

        for actor in pool.pool:  # Flower's idle actors: every actor once the ServerApp has returned
            ray.kill(actor)

    BasicActorPool.terminate_all_actors = terminate_all_actors  # type: ignore[method-assign]
    try:
        yield
    finally:
        BasicActorPool.terminate_all_actors = original  # type: ignore[method-assign]


def run_inprocess(spec: Mapping[str, Any], on_round: Callable[[dict[str, Any]], None] | None = None,
                  evaluate: Evaluate | None = None, checkpointer: Checkpointer | None = None,
                  resume: Snapshot | None = None):
    """Run the Flower ServerApp and ClientApp in this process; returns the GluonStrategy. Messages are
    not serialised here. The task is built and the server computes with the spec's ``threads`` (the
    ClientApp sets, and restores, its own in each handler; fedgluon/runtime/threads.py)."""
    from fedgluon.flower.client_app import make_client_app
    from strategies.server_app import make_server_app

    s = specs.normalise(spec)
    _quiet()
    with torch_threads(int(s["threads"])):
        task, _ = specs.build_cached(s)
        grid = InProcessGrid(make_client_app(s), num_blocks(task.num_clients, s["block_size"]), seed=s["seed"])
        # Flower's Message constructor reads the process's task identity; its runtimes set it like this
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, grid.run.run_id, SUPERLINK_NODE_ID
        sink: list = []
        server_app = make_server_app(s, sink, on_round, evaluate, checkpointer, resume)
        server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
    return _outcome(sink)


def run_ray(spec: Mapping[str, Any], *, num_cpus: float = 1, num_gpus: float = 0.0, address: str | None = None,
            ray_init_args: Mapping[str, Any] | None = None,
            on_round: Callable[[dict[str, Any]], None] | None = None, evaluate: Evaluate | None = None,
            checkpointer: Checkpointer | None = None, resume: Snapshot | None = None, fast_dispatch: bool = True):
    """Run on Flower's simulation engine (Ray). ``address`` joins an existing Ray cluster ("auto" or
    "HOST:PORT"); without it a private local Ray instance is started (and stopped) for this run. With
    ``fast_dispatch`` (the config's ``engine.fast_dispatch``, on by default) Flower's simulation loops wake
    on pushes and replies instead of polling every 0.1 s (:mod:`fedgluon.flower.dispatch`: a patch of
    Flower's internals, made only for the flwr versions it was written for)."""
    from flwr.simulation import run_simulation

    from fedgluon.flower.client_app import make_client_app
    from strategies.server_app import make_server_app

    s = specs.normalise(spec)
    _quiet()
    sink: list = []
    with torch_threads(int(s["threads"])):  # the server's, as in run_inprocess
        task, _ = specs.build_cached(s)
        init_args: dict[str, Any] = {"address": address} if address else {"address": "local"}
        init_args.update({"include_dashboard": False, **(ray_init_args or {})})
        if num_cpus <= 0:
            raise ValueError(f"num_cpus per client must be positive, got {num_cpus}")
        nodes = num_blocks(task.num_clients, s["block_size"])
        with faster_dispatch(nodes) if fast_dispatch else nullcontext(), _engine_notices_filtered(), \
                _actors_end_quietly(), ray_daemons_in_own_session(address), sigterm_restored():
            run_simulation(server_app=make_server_app(s, sink, on_round, evaluate, checkpointer, resume),
                           client_app=make_client_app(s), num_supernodes=nodes,
                           backend_config={"client_resources": {"num_cpus": num_cpus, "num_gpus": num_gpus},
                                           "init_args": init_args})
    return _outcome(sink)


def _outcome(sink: list) -> Any:
    """The GluonStrategy the engine's ServerApp left in ``sink``, or the exception that ended it, raised here."""
    if not sink:
        raise RuntimeError("the Flower simulation ended without a result; the ServerApp failed (see the log above)")
    if isinstance(sink[0], Exception):
        raise sink[0]
    return sink[0]
