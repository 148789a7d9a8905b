"""A shorter dispatch cadence for Flower's simulation engine (flwr 1.41–1.42).

Flower's simulation runtime hands messages to its Ray workers from one thread that polls the
LinkState for every node, then sleeps 0.1 s (``add_messages_to_queue`` in
``flwr.server.superlink.fleet.vce.vce_api``, ``f_stop.wait(0.1)``). A message therefore waits 50 ms
on average before a worker sees it, a floor of 0.05–0.1 s per round that dominates rounds of blocked
clients (fedgluon's 200 clients in two blocks compute in ~0.05 s per block).

:func:`faster_dispatch` keeps Flower's own loop and only shortens its sleep: it wraps the stop event
the loop waits on so that ``wait(t)`` waits ``min(t, interval)``. The interval grows with the number
of nodes (each poll asks the LinkState once per node), so the thread stays a small share of a core.
When Flower's function is not there or has another signature, nothing is patched (logged).
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("fedgluon")

EXPECTED = ["state", "queue", "nodes_mapping", "f_stop"]


def interval_for(num_nodes: int) -> float:
    """Seconds between polls: 2 ms, plus 0.1 ms per node (each poll costs tens of µs per node), at most
    Flower's 0.1 s."""
    return min(0.1, 0.002 + 1e-4 * max(0, num_nodes))


class ShortWait:
    """A view of a ``threading.Event`` whose ``wait(t)`` waits at most ``interval`` seconds."""

    def __init__(self, event: threading.Event, interval: float):
        self.event, self.interval = event, interval

    def is_set(self) -> bool:
        return self.event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self.event.wait(self.interval if timeout is None else min(timeout, self.interval))

    def __getattr__(self, name: str) -> Any:  # set(), clear(), ...: the event's own
        return getattr(self.event, name)


@contextmanager
def faster_dispatch(num_nodes: int) -> Iterator[bool]:
    """While active, Flower's simulation dispatch loop polls every :func:`interval_for` seconds; yields
    whether the patch is in place. Restores Flower's function on exit."""
    try:
        from flwr.server.superlink.fleet.vce import vce_api
        original = vce_api.add_messages_to_queue
        params = list(inspect.signature(original).parameters)
    except (ImportError, AttributeError, TypeError, ValueError) as err:
        log.info("faster_dispatch: Flower's dispatch loop not found (%s); keeping its 0.1 s cadence", err)
        yield False
        return
    if params != EXPECTED:
        log.info("faster_dispatch: unexpected signature %s of Flower's dispatch loop; keeping its cadence", params)
        yield False
        return
    interval = interval_for(num_nodes)

    def add_messages_to_queue(state, queue, nodes_mapping, f_stop):  # noqa: ANN001 - Flower's signature
        return original(state, queue, nodes_mapping, ShortWait(f_stop, interval))

    vce_api.add_messages_to_queue = add_messages_to_queue
    try:
        yield True
    finally:
        vce_api.add_messages_to_queue = original
