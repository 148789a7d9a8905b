"""Event-driven hand-off between fedgluon's ServerApp and Flower's simulation engine: a patch of Flower's
internals, written for the flwr versions in :data:`WRITTEN_FOR` and made only under them.

Flower's simulation runtime moves a round's messages through its in-memory LinkState with two
polling loops, each sleeping 0.1 s between polls:

* its dispatch thread (``add_messages_to_queue`` in ``flwr.server.superlink.fleet.vce.vce_api``)
  scans the LinkState for every node's messages, then ``f_stop.wait(0.1)``;
* the ServerApp's Grid (``InMemoryGrid.send_and_receive``) pulls replies, then sleeps
  ``pull_interval`` (0.1 s).

A message therefore waits half a poll on average at each, a floor per round that dominates rounds of
blocked clients whose blocks compute in less. Polling faster costs CPU that the clients' workers need:
each poll takes the LinkState's lock and checks every message (figures: BENCHMARKS.md, "Flower's
dispatch").

:func:`faster_dispatch` (``run_ray`` enters it around Flower's ``run_simulation`` when the config's
``engine.fast_dispatch`` is true, the default) turns both waits into wake-ups, keeping Flower's loops
and LinkState:

* the ServerApp wraps its Grid in a :class:`WakingGrid` (``strategies.server_app``), which sets
  ``pushed`` after storing messages and waits on ``replied`` between pulls;
* Flower's reply thread (``put_message_into_state``) gets a LinkState view that sets ``replied``
  after storing each reply;
* the dispatch loop's ``f_stop.wait(t)`` becomes :meth:`ShortWait.wait`: a wait on ``pushed``;
* the queues between those loops and Flower's worker threads wait at most ``STOP_POLL`` per ``get``
  (:func:`short_gets`; Flower's: 1 s). Those threads see the simulation's stop event only between
  waits, so every Ray run used to end ~1 s after its ServerApp returned (BENCHMARKS.md, "Ray start-up").

Each wait is still bounded: by :func:`interval_for` (a few ms) while no Grid signals its pushes, by
``SIGNALLED_WAIT`` once one does, so a missed wake-up costs at most Flower's own cadence. Under a
flwr version not in :data:`WRITTEN_FOR`, or when Flower's functions are not there or have other
signatures, nothing is patched (logged; tests/integration/test_dispatch.py fails on such a version, naming it).
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("fedgluon")

WRITTEN_FOR = ("1.42.0",)  # the flwr versions whose simulation loops this patch was written and tested against
EXPECTED = {"add_messages_to_queue": ["state", "queue", "nodes_mapping", "f_stop"],
            "put_message_into_state": ["state", "queue", "f_stop"]}
SIGNALLED_WAIT = 0.1  # the longest wait between polls once pushes and replies are signalled (Flower's cadence)
STOP_POLL = 0.05  # the longest one wait of Flower's worker and reply threads on their queues blocks


def interval_for(num_nodes: int) -> float:
    """Seconds between the dispatch loop's polls while no Grid signals its pushes: 2 ms, plus 0.1 ms per
    node (each poll's cost grows with the nodes), at most Flower's 0.1 s."""
    return min(0.1, 0.002 + 1e-4 * max(0, num_nodes))


class Wakeups:
    """The events of one simulation: ``pushed`` (a Grid stored messages for the nodes) and ``replied``
    (Flower's reply thread stored a reply); ``signalled`` once a :class:`WakingGrid` has pushed."""

    def __init__(self) -> None:
        self.pushed = threading.Event()
        self.replied = threading.Event()
        self.signalled = False


_ACTIVE: Wakeups | None = None


def active() -> Wakeups | None:
    """The wake-ups of the simulation running in this process (inside :func:`faster_dispatch`), if any."""
    return _ACTIVE


class ShortWait:
    """A view of the dispatch loop's stop event whose ``wait(t)`` waits on ``wake`` (when given) for at
    most ``interval`` seconds, or ``SIGNALLED_WAIT`` once ``wake.signalled``; it returns whether the stop
    event is set, as ``Event.wait`` would."""

    def __init__(self, event: threading.Event, interval: float, wake: Wakeups | None = None):
        self.event, self.interval, self.wake = event, interval, wake

    def is_set(self) -> bool:
        return self.event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        if self.wake is None:
            return self.event.wait(self.interval if timeout is None else min(timeout, self.interval))
        cap = SIGNALLED_WAIT if self.wake.signalled else self.interval
        if self.wake.pushed.wait(cap if timeout is None else min(timeout, cap)):
            self.wake.pushed.clear()  # before the loop scans again: a push after this wakes the next wait
        return self.event.is_set()

    def __getattr__(self, name: str) -> Any:  # set(), clear(), ...: the event's own
        return getattr(self.event, name)


class SignallingState:
    """A LinkState view whose ``store_message_res`` sets ``replied`` once the reply is stored."""

    def __init__(self, state: Any, replied: threading.Event):
        self.state, self.replied = state, replied

    def store_message_res(self, message: Any) -> Any:
        out = self.state.store_message_res(message)
        self.replied.set()
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.state, name)


def short_gets(queue: Any) -> Any:
    """``queue`` (a ``queue.Queue``) with its ``get`` timeouts capped at :data:`STOP_POLL`: a thread that
    loops on ``get(timeout=1.0)`` until a stop event is set then ends within ``STOP_POLL`` of the event. The
    capped ``get`` holds the queue weakly: no reference cycle keeps a finished run's queue alive."""
    get, ref = type(queue).get, weakref.ref(queue)
    queue.get = lambda block=True, timeout=None: get(ref(), block, None if timeout is None else min(timeout, STOP_POLL))
    return queue


def flower_version() -> str | None:
    """The installed flwr's version (None without one)."""
    try:
        return importlib.metadata.version("flwr")
    except importlib.metadata.PackageNotFoundError:
        return None


def _flower_functions() -> tuple[Any, dict[str, Any]] | None:
    """Flower's simulation module and its two loop functions, or None (logged) under a flwr version not in
    :data:`WRITTEN_FOR` or if they are not as expected."""
    version = flower_version()
    if version not in WRITTEN_FOR:
        log.warning("faster_dispatch: written for flwr %s, not flwr %s; keeping Flower's 0.1 s cadence "
                    "(engine.fast_dispatch=false says so and silences this)", ", ".join(WRITTEN_FOR), version)
        return None
    try:
        from flwr.server.superlink.fleet.vce import vce_api
        functions = {name: getattr(vce_api, name) for name in EXPECTED}
        params = {name: list(inspect.signature(f).parameters) for name, f in functions.items()}
    except (ImportError, AttributeError, TypeError, ValueError) as err:
        log.info("faster_dispatch: Flower's simulation loops not found (%s); keeping its 0.1 s cadence", err)
        return None
    if params != EXPECTED:
        log.info("faster_dispatch: unexpected signatures %s of Flower's simulation loops; keeping its cadence", params)
        return None
    return vce_api, functions


@contextmanager
def faster_dispatch(num_nodes: int) -> Iterator[bool]:
    """While active, Flower's simulation loops in this process wake on :class:`Wakeups` (module doc);
    yields whether the patch is in place. Restores Flower's functions on exit."""
    global _ACTIVE
    found = _flower_functions()
    if found is None:
        yield False
        return
    vce_api, original = found
    wake, interval = Wakeups(), interval_for(num_nodes)

    def add_messages_to_queue(state, queue, nodes_mapping, f_stop):  # noqa: ANN001 - Flower's signature
        # the same queue Flower's worker threads take the messages from
        return original["add_messages_to_queue"](state, short_gets(queue), nodes_mapping,
                                                 ShortWait(f_stop, interval, wake))

    def put_message_into_state(state, queue, f_stop):  # noqa: ANN001 - Flower's signature
        return original["put_message_into_state"](SignallingState(state, wake.replied), short_gets(queue), f_stop)

    vce_api.add_messages_to_queue = add_messages_to_queue
    vce_api.put_message_into_state = put_message_into_state
    previous, _ACTIVE = _ACTIVE, wake
    try:
        yield True
    finally:
        _ACTIVE = previous
        vce_api.add_messages_to_queue = original["add_messages_to_queue"]
        vce_api.put_message_into_state = original["put_message_into_state"]


class WakingGrid:
    """A Grid (Flower's simulation ``InMemoryGrid``, say) whose pushes set ``wake.pushed`` and whose
    ``send_and_receive`` waits on ``wake.replied`` between pulls instead of sleeping; everything else is
    the wrapped Grid's. Same results as the Grid's own loop: replies until all have come or ``timeout``
    seconds have passed (none: wait for all). ``on_reply`` (when given) sees each reply as it is pulled,
    while the others are still being computed (GluonStrategy.read_reply)."""

    def __init__(self, grid: Any, wake: Wakeups, on_reply: Callable[[Any], None] | None = None):
        self.grid, self.wake, self.on_reply = grid, wake, on_reply

    def push_messages(self, messages: Iterable[Any]) -> Iterable[str]:
        ids = self.grid.push_messages(messages)
        self.wake.signalled = True
        self.wake.pushed.set()
        return ids

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None) -> list[Any]:
        waiting = set(self.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        out: list[Any] = []
        while waiting:
            self.wake.replied.clear()  # before pulling: a reply stored after this wakes the wait below
            replies = list(self.grid.pull_messages(waiting))
            if self.on_reply is not None:
                for reply in replies:
                    self.on_reply(reply)
            out += replies
            waiting -= {m.metadata.reply_to_message_id for m in replies}
            left = SIGNALLED_WAIT if end is None else min(SIGNALLED_WAIT, end - time.monotonic())
            if not waiting or left <= 0:
                break
            self.wake.replied.wait(left)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)
