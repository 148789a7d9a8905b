"""Pause Python's cyclic garbage collector around a round's allocation-heavy work, once per round.

A round makes many short-lived Python objects (payload objects, JSON layouts of client blocks,
per-client dicts) while thousands of long-lived ones stay alive (every client's state). Each
generation-0 overflow can escalate to a full collection that walks all of them, a sizeable share of
a round with many clients (BENCHMARKS.md, "Process tuning"). The round's objects form no reference
cycles of note, so collecting after the round, when the collector resumes, frees the same memory.

Each engine loop takes the pause once per round: the plain driver's round (:func:`gc_paused`), the
Flower strategy's round from ``configure_train`` to the end of ``aggregate_train`` (:class:`RoundPause`,
held by ``GluonStrategy.start``) and the ClientApp's handling of one message (:func:`gc_paused`). Nested
pauses are fine; the collector resumes only if it was running before the outermost.

What a pause leaves behind: the objects made while it lasts are all young when the collector resumes, and the
young collections that follow walk them all, promote them, and walk them again. A process's first client step
used to import torch._dynamo (torch.func's first call, ~120,000 objects) inside the ClientApp's pause: in Ray's
actors, the young collection after round 0's message took 66–106 ms and the generation-1 collection one or two
messages later 70–72 ms, as much as a steady round at 200 clients (BENCHMARKS.md, "Ray's warm-up
collections"). So in a Ray worker the ClientApp's handshake makes that call
(``fedgluon.clients.vectorised.warm_up``) with the collector on, then calls :func:`freeze_once`: what the
worker has built stays out of every later collection.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

_frozen = False


def freeze_once() -> None:
    """The first call in a process collects every generation, then moves every tracked object that survives to
    the permanent generation (``gc.freeze``); later calls do nothing.

    For a process that serves one run (a Ray actor), once it has built what the run needs (the ClientApp's
    handshake; the collection took 0.14–0.16 s there): those objects live for the run. Frozen objects are still
    freed by reference counting; the collector only never walks them again. Call it before any record of a
    message with arrays is read: reading a Flower ``RecordDict``'s typed views makes reference cycles, which
    would be frozen with their arrays."""
    global _frozen
    if not _frozen:
        _frozen = True
        gc.collect()
        gc.freeze()


@contextmanager
def gc_paused() -> Iterator[None]:
    """The collector off for the body (one round of the plain driver, one message of the ClientApp), back
    on after it if it was on before (also when the body raises)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class RoundPause:
    """The pause of a round whose work spans calls that another's loop makes (Flower's ``Strategy.start``
    calls ``configure_train``, the Grid's ``send_and_receive``, then ``aggregate_train``): :meth:`begin` at
    the round's start, :meth:`end` at its end. Only made by :func:`round_pauses`, which ends a round left
    open (a round that raised) when the loop ends."""

    def __init__(self) -> None:
        self._resume: bool | None = None  # None: no round open; else whether the collector was on before it

    def begin(self) -> None:
        """Pause the collector for the round (nothing if a round is open)."""
        if self._resume is None:
            self._resume = gc.isenabled()
            gc.disable()

    def end(self) -> None:
        """End the open round's pause: the collector back on if it was on at :meth:`begin` (nothing if none)."""
        if self._resume is not None:
            resume, self._resume = self._resume, None
            if resume:
                gc.enable()


@contextmanager
def round_pauses() -> Iterator[RoundPause]:
    """A :class:`RoundPause` for an engine loop's rounds; on exit, a round still open is ended."""
    pause = RoundPause()
    try:
        yield pause
    finally:
        pause.end()

