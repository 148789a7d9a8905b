"""Checkpoints: everything a run needs to continue exactly where it stopped.

A :class:`Snapshot` holds the round to run next, the server state (model, trackers, optimizer state,
downlink shadow model, bit counters), every client's *committed* state (DESIGN §2), the metrics rows
and per-client rows so far, and the identity of the run (its spec key). No random-generator state is
needed: every draw comes from a generator seeded by (run seed, purpose, client, round)
(``fedgluon.rng``), so the round counter determines all of them.

Files are written atomically (``torch.save`` to a temporary file in the same directory, fsync, then
``os.replace``), so a run killed mid-write leaves the previous checkpoint intact, and read with
``torch.load(weights_only=True)``: nothing in a checkpoint is unpickled beyond tensors, containers,
numbers, strings and :class:`compressors.BitCount`.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from compressors import BitCount

FORMAT = 1


class RunStopped(RuntimeError):
    """A run ended before its last round; a checkpoint was written when ``checkpoint`` is set."""

    def __init__(self, message: str, next_round: int, checkpoint: Path | None = None):
        super().__init__(message)
        self.next_round, self.checkpoint = next_round, checkpoint


class RunInterrupted(RunStopped):
    """SIGINT/SIGTERM: the run stopped after finishing a round."""


class ActorDeathError(RunStopped):
    """A Ray actor that runs client tasks died; Flower's actor pool would keep sending it tasks."""


class NonFiniteStateError(RunStopped):
    """The server's own step produced NaN or Inf; the checkpoint holds the state before that step."""


@dataclass
class Snapshot:
    next_round: int
    server_state: dict[str, Any]
    client_states: dict[int, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    client_log: list[dict[str, Any]] = field(default_factory=list)
    run_key: str = ""


def save(snapshot: Snapshot, path: str | Path) -> Path:
    """Write ``snapshot`` to ``path`` atomically (write, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    payload = {"format": FORMAT, "next_round": snapshot.next_round, "server_state": snapshot.server_state,
               "client_states": snapshot.client_states, "history": snapshot.history,
               "client_log": snapshot.client_log, "run_key": snapshot.run_key}
    with open(tmp, "wb") as fh:
        torch.save(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def load(path: str | Path) -> Snapshot:
    """Read a checkpoint written by :func:`save` (``weights_only``: no arbitrary unpickling)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    with torch.serialization.safe_globals([BitCount]):
        data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path} is not a fedgluon checkpoint of format {FORMAT}")
    return Snapshot(int(data["next_round"]), data["server_state"], data["client_states"], data["history"],
                    data["client_log"], data["run_key"])


class Checkpointer:
    """Saves a snapshot every ``every`` rounds (0: never periodically) and when a stop was requested
    (SIGINT/SIGTERM through :meth:`signals`, or :meth:`request_stop`); then raises RunInterrupted.

    ``after_round(k, snapshot)`` is called by the federation at the end of round k with a function
    that builds the snapshot (only called when one is due)."""

    def __init__(self, path: str | Path, every: int = 0, run_key: str = ""):
        if every < 0:
            raise ValueError(f"checkpoint every must be >= 0 rounds, got {every}")
        self.path, self.every, self.run_key = Path(path), int(every), run_key
        self._stop = threading.Event()
        self.reason = ""

    def request_stop(self, reason: str = "stop requested") -> None:
        self.reason = reason
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def save(self, snapshot: Snapshot) -> Path:
        snapshot.run_key = self.run_key
        return save(snapshot, self.path)

    def after_round(self, k: int, snapshot: Callable[[], Snapshot]) -> None:
        due = self.every > 0 and (k + 1) % self.every == 0
        if due or self.stop_requested:
            self.save(snapshot())
        if self.stop_requested:
            raise RunInterrupted(f"{self.reason}: stopped after round {k}; checkpoint {self.path}", k + 1, self.path)

    def signals(self) -> _SignalGuard:
        """A context manager: SIGINT/SIGTERM request a stop at the end of the current round; a second
        SIGINT interrupts at once. Outside the main thread it does nothing."""
        return _SignalGuard(self)


class _SignalGuard:
    def __init__(self, checkpointer: Checkpointer):
        self.checkpointer = checkpointer
        self.previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.checkpointer.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.checkpointer.request_stop(f"received {signal.Signals(signum).name}")

    def __enter__(self) -> Checkpointer:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self.checkpointer

    def __exit__(self, *exc: object) -> bool:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False
