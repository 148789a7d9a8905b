"""Checkpoints: everything a run needs to continue exactly where it stopped.

A :class:`Snapshot` holds the round to run next, the server state (model, trackers, optimizer state,
downlink shadow model, bit counters), every client's *committed* state, the metrics rows and
per-client rows so far, and the identity of the run (its spec key). No random-generator state is
needed: every draw comes from a generator seeded by (run seed, purpose, client, round)
(``fedgluon.core.rng``), so the round counter determines all of them.

**One atomic unit.** The metrics and per-client rows grow with every round, so they do not go into
the snapshot file (re-pickling them every save made long runs quadratic: 2/3 of a 2,000-round run's
time). They are appended to a JSON-lines journal beside it (``checkpoint.pt.rows.<id>.jsonl``). The
snapshot file ``checkpoint.pt`` is the single commit record: it names its journal and the length and
SHA-256 of the journal's first bytes that hold exactly its rows. A save

1. appends the new rows to the journal *after the committed length* (cutting off bytes an earlier,
   failed save left there; the committed bytes are never rewritten), or, in a process that did not
   load this checkpoint, writes every row to a *new* journal file, then fsyncs it;
2. writes the snapshot to ``.checkpoint.pt.<pid>.tmp``, fsyncs it, renames it onto
   ``checkpoint.pt`` and fsyncs the directory.

The rename is the only step that changes what a resume sees, so a kill or an I/O error at any point
of any save leaves the last complete save readable: its snapshot, and its journal prefix, which no
later save touches. A save that fails with an I/O error removes its temporary file and raises
:class:`SaveFailed` (naming the last complete save); a kill can leave a temporary file or a journal no
checkpoint names, which :func:`sweep` removes on resume. :func:`load` refuses, with one
:class:`CheckpointError` line, a file that is not a readable checkpoint of this :data:`FORMAT`, a
journal that is missing, shorter than or different from (SHA-256) what the snapshot counts, and rows
that disagree with the round counter (one metrics row per round ``0 … next_round-1``).

Files are read with ``torch.load(weights_only=True)``: nothing in a checkpoint is unpickled beyond
tensors, containers, numbers, strings and :class:`compressors.BitCount`.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import secrets
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from compressors import BitCount
from fedgluon.core.text import first_line
from fedgluon.runtime.stop_signals import stop_on_signals

FORMAT = 4  # 4: client states as one client-state table (3: one tree per client; 2: one unnamed journal)


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


class SaveFailed(RunStopped):
    """Writing a checkpoint failed with an I/O error (a full disk, a file-size limit, ...). ``checkpoint``
    is the last complete save, intact, or None when this run has none."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed; the message is one line naming the file and what is wrong."""


@dataclass
class Journal:
    """The committed part of a rows journal: its file name (beside the checkpoint), its length in bytes,
    the (metrics, client) rows it holds and the running SHA-256 of those bytes."""

    name: str
    size: int = 0
    rows: tuple[int, int] = (0, 0)
    sha: Any = field(default_factory=hashlib.sha256)


@dataclass
class Snapshot:
    next_round: int
    server_state: dict[str, Any]
    client_states: dict[str, Any]  # the client-state table (fedgluon.clients.table.ClientStateTable.state_dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    client_log: list[dict[str, Any]] = field(default_factory=list)
    run_key: str = ""
    journal: Journal | None = field(default=None, repr=False, compare=False)  # set by load()


def _journal_pattern(path: Path) -> re.Pattern[str]:
    return re.compile(re.escape(path.name) + r"\.rows\.[0-9a-f]{1,64}\.jsonl")


def _temp_pattern(path: Path) -> re.Pattern[str]:
    """The names :func:`_replace_synced` gives its temporary files for the checkpoint at ``path``."""
    return re.compile(r"\." + re.escape(path.name) + r"\.[0-9]+\.tmp")


def _lines(snapshot: Snapshot, start: tuple[int, int]) -> bytes:
    rows = [json.dumps({"h": r}) for r in snapshot.history[start[0]:]]
    rows += [json.dumps({"c": r}) for r in snapshot.client_log[start[1]:]]
    return "".join(r + "\n" for r in rows).encode()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _append(path: Path, at: int, data: bytes) -> None:
    """Write ``data`` at byte ``at`` of ``path`` (created if missing), cut what followed, fsync."""
    with open(path, "r+b" if path.exists() else "wb") as fh:
        fh.seek(at)
        fh.truncate()
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _replace_synced(path: Path, write: Callable[[Any], None]) -> None:
    """Write a temporary file beside ``path``, fsync it and rename it onto ``path``; the temporary file
    is removed if anything fails before the rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _commit(snapshot: Snapshot, path: Path, journal: Journal | None, committed: Callable[[Journal], None]) -> None:
    """One save (module docstring). ``journal``: the committed journal of the checkpoint at ``path`` (None:
    write a new journal); ``committed(journal)`` is called as soon as the rename made this save the one a
    resume reads."""
    previous = journal.name if journal is not None else None
    if journal is not None:  # append, unless the rows do not extend it or its committed bytes are gone
        jpath = path.with_name(journal.name)
        grown = len(snapshot.history) >= journal.rows[0] and len(snapshot.client_log) >= journal.rows[1]
        if not grown or not jpath.exists() or jpath.stat().st_size < journal.size:
            journal = None
    if journal is None:
        journal = Journal(f"{path.name}.rows.{secrets.token_hex(6)}.jsonl")
        jpath = path.with_name(journal.name)
    data = _lines(snapshot, journal.rows)
    created = not jpath.exists()
    try:
        _append(jpath, journal.size, data)
        if created:
            _fsync_dir(path.parent)
        sha = journal.sha.copy()
        sha.update(data)
        after = Journal(journal.name, journal.size + len(data), (len(snapshot.history), len(snapshot.client_log)),
                        sha)
        payload = {"format": FORMAT, "next_round": snapshot.next_round, "server_state": snapshot.server_state,
                   "client_states": snapshot.client_states, "run_key": snapshot.run_key,
                   "journal": {"name": after.name, "size": after.size, "rows": list(after.rows),
                               "sha256": sha.hexdigest()}}
        _replace_synced(path, lambda fh: torch.save(payload, fh))
    except BaseException:
        if created:  # a journal this save started, which no checkpoint names
            jpath.unlink(missing_ok=True)
        raise
    committed(after)  # from here on a resume reads this save, whatever fails next
    _fsync_dir(path.parent)
    if after.name != previous:
        _remove_journals(path, keep=after.name)


def save(snapshot: Snapshot, path: str | Path) -> Path:
    """Write ``snapshot`` to ``path`` with a new journal (module docstring); a :class:`Checkpointer`
    appends to the journal it committed instead."""
    Checkpointer(path, run_key=snapshot.run_key).save(snapshot)
    return Path(path)


def sweep(path: str | Path, loaded: Snapshot | None = None) -> list[Path]:
    """Remove what failed or killed saves left beside the checkpoint at ``path``: its temporary files
    and the journals it does not name (``loaded``: the checkpoint as :func:`load` read it, which saves
    reading it again; every journal when there is no checkpoint). Only files named like those, in the
    checkpoint's own directory, are touched. Returns the removed paths."""
    path = Path(path)
    keep = loaded.journal.name if loaded is not None and loaded.journal is not None else None
    if keep is None and path.exists():
        try:
            keep = _read_payload(path)["journal"]["name"]
        except CheckpointError:
            return []  # an unreadable checkpoint: leave every file for inspection
    return _remove_journals(path, keep, temporary=True)


def _remove_journals(path: Path, keep: str | None, temporary: bool = False) -> list[Path]:
    """Remove the journals of the checkpoint at ``path`` other than ``keep`` (and its temporary files)."""
    journals, temps = _journal_pattern(path), _temp_pattern(path)
    removed = []
    for entry in path.parent.iterdir():
        if ((temporary and temps.fullmatch(entry.name)) or (journals.fullmatch(entry.name) and entry.name != keep)) \
                and entry.is_file():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def remove(path: str | Path) -> None:
    """Delete a checkpoint, then its journals and temporary files (a finished run)."""
    Path(path).unlink(missing_ok=True)
    sweep(path)


def _damaged(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path} cannot be resumed: {what}")


def _read_payload(path: Path) -> dict[str, Any]:
    """The snapshot file's dict, its format and fields checked (not the journal)."""
    try:
        with torch.serialization.safe_globals([BitCount]):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise _damaged(path, "it is damaged or holds objects that a checkpoint never contains (refused without "
                             "unpickling them)") from None
    except (RuntimeError, EOFError, ValueError, OSError, IndexError, KeyError) as err:
        if path.exists() and path.stat().st_size == 0:
            raise _damaged(path, "it is empty") from None
        raise _damaged(path, f"it is truncated or damaged ({first_line(err)})") from None
    if not isinstance(data, dict) or "format" not in data:
        raise _damaged(path, "it is not a fedgluon checkpoint")
    if data["format"] != FORMAT:
        raise _damaged(path, f"it has checkpoint format {data['format']!r}, this fedgluon reads format {FORMAT} "
                             f"only (written by an older version)")
    j = data.get("journal")
    ok = isinstance(data.get("next_round"), int) and data["next_round"] >= 0 and isinstance(j, dict) and \
        isinstance(j.get("name"), str) and bool(_journal_pattern(path).fullmatch(j["name"])) and \
        isinstance(j.get("size"), int) and j["size"] >= 0 and isinstance(j.get("sha256"), str) and \
        isinstance(j.get("rows"), list) and len(j["rows"]) == 2 and \
        all(isinstance(n, int) and n >= 0 for n in j["rows"]) and \
        all(k in data for k in ("server_state", "client_states", "run_key"))
    if not ok:
        raise _damaged(path, "its fields are damaged (next_round, journal, server_state, client_states, run_key)")
    return data


def _read_journal(path: Path, spec: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], Journal]:
    jpath = path.with_name(spec["name"])
    try:
        with open(jpath, "rb") as fh:
            data = fh.read(spec["size"])
    except FileNotFoundError:
        raise _damaged(path, f"its rows journal {jpath.name} is missing") from None
    except OSError as err:
        raise _damaged(path, f"its rows journal {jpath.name} cannot be read ({first_line(err)})") from None
    if len(data) < spec["size"]:
        raise _damaged(path, f"its rows journal {jpath.name} holds {len(data)} bytes, fewer than the "
                             f"{spec['size']} the checkpoint counts")
    sha = hashlib.sha256(data)
    if sha.hexdigest() != spec["sha256"]:
        raise _damaged(path, f"its rows journal {jpath.name} differs from the one the checkpoint was saved with "
                             f"(SHA-256)")
    history, client_log = [], []
    try:
        for line in data.decode().splitlines():
            row = json.loads(line)
            (history if "h" in row else client_log).append(row["h"] if "h" in row else row["c"])
    except (ValueError, TypeError, KeyError):
        raise _damaged(path, f"its rows journal {jpath.name} is not JSON lines of rows") from None
    if [len(history), len(client_log)] != spec["rows"]:
        raise _damaged(path, f"its rows journal {jpath.name} holds {len(history)} metrics and {len(client_log)} "
                             f"client rows, the checkpoint counts {spec['rows'][0]} and {spec['rows'][1]}")
    return history, client_log, Journal(spec["name"], spec["size"], tuple(spec["rows"]), sha)


def _check_rounds(path: Path, next_round: int, history: list[Any], client_log: list[Any]) -> None:
    """One metrics row per round 0 … next_round-1, in order, and no client row from a later round."""
    if len(history) != next_round:
        raise _damaged(path, f"it is at round {next_round} but holds {len(history)} metrics rows (one per round "
                             f"run); the snapshot and its rows do not belong together")
    if any(not isinstance(r, dict) or r.get("round") != k for k, r in enumerate(history)):
        raise _damaged(path, "its metrics rows are not the rounds 0, 1, ... in order")
    if any(not isinstance(r, dict) or not isinstance(r.get("round"), int) or not 0 <= r["round"] < next_round
           for r in client_log):
        raise _damaged(path, f"its client rows are not all from rounds 0 … {next_round - 1}")


def load(path: str | Path) -> Snapshot:
    """Read a checkpoint written by :func:`save` or a :class:`Checkpointer` (``weights_only``: no arbitrary
    unpickling), with its rows; raises :class:`CheckpointError` when snapshot, journal and round counter
    disagree (module docstring), FileNotFoundError when there is none."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    data = _read_payload(path)
    history, client_log, journal = _read_journal(path, data["journal"])
    _check_rounds(path, data["next_round"], history, client_log)
    return Snapshot(data["next_round"], data["server_state"], data["client_states"], history, client_log,
                    data["run_key"], journal)


class Checkpointer:
    """Saves a snapshot every ``every`` rounds (0: never periodically) and when a stop was requested
    (SIGINT/SIGTERM through :meth:`signals`, or :meth:`request_stop`); then raises RunInterrupted.

    ``after_round(k, snapshot)`` is called by the federation at the end of round k with a function
    that builds the snapshot (only called when one is due)."""

    def __init__(self, path: str | Path, every: int = 0, run_key: str = "", resumed: Snapshot | None = None):
        if every < 0:
            raise ValueError(f"checkpoint every must be >= 0 rounds, got {every}")
        self.path, self.every, self.run_key = Path(path), int(every), run_key
        # the committed journal and round of the checkpoint at path: loaded from it (resumed) or saved here
        self._journal = resumed.journal if resumed is not None else None
        self._round = resumed.next_round if self._journal is not None else None
        self.stop_requested, self.reason = False, ""

    def request_stop(self, reason: str = "stop requested") -> None:
        """Stop at the end of the current round; the first request's ``reason`` is the one reported. Takes
        no lock: a signal handler calls it (fedgluon/runtime/stop_signals.py), and the run's thread reads
        ``stop_requested`` at the end of each round."""
        if not self.stop_requested:
            self.reason, self.stop_requested = reason, True

    def save(self, snapshot: Snapshot) -> Path:
        """Save ``snapshot`` (module docstring), appending to the journal of the last save when there is
        one; an I/O error raises :class:`SaveFailed`, which names the last complete save."""
        snapshot.run_key = self.run_key

        def committed(journal: Journal) -> None:
            self._journal, self._round = journal, snapshot.next_round

        try:
            _commit(snapshot, self.path, self._journal, committed)
        except OSError as err:
            what = f"could not save the checkpoint of round {snapshot.next_round} to {self.path} ({err})"
            if self._round is None and self.path.exists():  # one this checkpointer did not load: untouched
                raise SaveFailed(f"{what}; the checkpoint already at {self.path} was not changed", 0, self.path) \
                    from err
            if self._round is None:
                raise SaveFailed(f"{what}; this run has no complete checkpoint to resume from", 0) from err
            raise SaveFailed(f"{what}; the checkpoint of round {self._round} is intact", self._round,
                             self.path) from err
        return self.path

    def after_round(self, k: int, snapshot: Callable[[], Snapshot]) -> None:
        due = self.every > 0 and (k + 1) % self.every == 0
        if due or self.stop_requested:
            self.save(snapshot())
        if self.stop_requested:
            raise RunInterrupted(f"{self.reason}: stopped after round {k} ({k + 1} rounds run, rounds count from 0); "
                                 f"checkpoint {self.path}", k + 1, self.path)

    def signals(self) -> AbstractContextManager[None]:
        """A context manager: SIGINT/SIGTERM, whichever thread receives them, request a stop at the end of
        the current round; a SIGINT after a stop was requested raises KeyboardInterrupt in the main thread
        (fedgluon/runtime/stop_signals.py). Outside the main thread it does nothing."""
        return stop_on_signals(self.request_stop, lambda: self.stop_requested)
