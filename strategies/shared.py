"""A block's large records through the host's shared memory instead of Ray's object store.

Under Flower's Ray simulation every message goes through Ray: a record's bytes are put into Ray's
object store by the sender and fetched by the receiver. For a block of 100 clients of the
4.6k-parameter MLP that is 3.7 MB of committed states to the node and 3.8 MB of proposed states and
payloads back. Sent to an actor that reads them as a node does and replies with as many bytes, they
took a median 24.3 ms there and back through Ray's object store and 7.9 ms as files in ``/dev/shm``
(500 clients, 18.5 MB: 52.0 against 18.9 ms; ``python -m benchmarks.bench_transport``, this
project's 2-core VM).

So when the server runs on the same host as a node, the node writes its reply's packed bytes to a
file in the run's directory under ``/dev/shm`` and sends the file's name (``{"layout", "file"}``
instead of ``{"layout", "data"}``, strategies/records.py); the server maps that file read-only (no
copy: its :class:`~strategies.records.BlockReplies` reads the reply where it lies) and, when it
commits every state of the block, sends the same name back the next round. A node on another host
(a multi-node Ray cluster) does not see the directory and sends its bytes inline, as does any node
when ``shared_memory`` is off or the directory is full; the server reads both kinds.

Trust. A node on the server's host runs as the server's user; the checks below guard against a
node's mistakes (and a reply naming what is not its file), not against a process that could as well
write into the server's memory.

Lifetimes. The server creates the directory with a marker file (:meth:`SharedFiles.create`) and
removes it, and whatever is left in it, when the run ends (:meth:`SharedFiles.close`). A file the
server maps is unlinked when the last array viewing it is freed (the mapping stays valid until then),
so a reply's file lives exactly as long as the committed states that are views of it (mapped
read-only: a write into one faults rather than changing a state the server may send back). States
the server packs for a node go the same way and are removed when the round closes. A node maps
the states it is sent copy-on-write (:meth:`SharedFiles.map_private`): its writes stay its own. A server killed
before its end leaves its directory behind; the next run's :meth:`SharedFiles.create` removes the
directories whose marker names a process that is gone (:func:`sweep`). Names are
checked (32 hex digits) and files opened without following links: a node names a file in the
server's directory, nothing else.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import re
import shutil
import uuid
import weakref
from collections.abc import Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger("fedgluon")

ROOT = "/dev/shm"
MARKER = "fedgluon-run"
MIN_BYTES_ENV = "FEDGLUON_SHM_MIN_BYTES"  # records smaller go inline (default 256 KiB: Ray carries
# small objects inside its own messages anyway)


def min_bytes() -> int:
    """The size from which a record goes through a file (``FEDGLUON_SHM_MIN_BYTES``, read on each call,
    so tests can send every record through files; Ray's local workers inherit the driver's environment)."""
    return int(os.environ.get(MIN_BYTES_ENV, 256 * 1024))


_NAME = re.compile(r"^[0-9a-f]{32}$")
_IOV_MAX = 1024


class SharedFiles:
    """One run's directory of records in host shared memory: the server creates and closes it, nodes
    attach to it by its path (module doc)."""

    def __init__(self, path: str | Path, owner: bool = False):
        self.path, self.owner = Path(path), owner
        self._warned = False
        self._mapped: weakref.WeakValueDictionary[str, np.ndarray] = weakref.WeakValueDictionary()

    # ------------------------------------------------------------------ server
    @classmethod
    def create(cls, root: str | Path = ROOT) -> SharedFiles | None:
        """A new directory under ``root`` (None, logged, where there is no writable ``root``), after
        removing those of runs whose server process is gone (killed before it could remove its own)."""
        sweep(root)
        try:
            path = Path(root) / f"fedgluon-{uuid.uuid4().hex}"
            path.mkdir(mode=0o700)
            (path / MARKER).write_text(str(os.getpid()))
        except OSError as err:
            log.info("no shared memory for records (%s: %s); they go through Ray", root, err)
            return None
        return cls(path, owner=True)

    def close(self) -> None:
        """Remove the directory and every file left in it (the owner's job; mapped files stay readable)."""
        if self.owner:
            shutil.rmtree(self.path, ignore_errors=True)

    def map(self, name: str, size: int) -> np.ndarray:
        """The file ``name`` of ``size`` bytes as a read-only array of its mapping; the file is unlinked
        once nothing views the mapping. ``ValueError`` for a bad name, a missing file or another size."""
        path = self._file(name)
        mapped = self._mapped.get(name)
        if mapped is not None:  # read again (a reply read early, then in aggregate_train): one mapping
            if mapped.size != size:
                raise ValueError(f"shared record {name!r} holds {mapped.size} bytes, its reference says {size}")
            return mapped
        mapping = self._mmap(name, size, private=False)
        if mapping is None:
            _unlink(path)
            return np.zeros(0, dtype=np.uint8)
        weakref.finalize(mapping, _unlink, path)
        out = self._mapped[name] = np.frombuffer(mapping, dtype=np.uint8)
        return out

    def remove(self, name: str) -> None:
        """Remove the file ``name`` (one the server wrote for a node, once the round is over)."""
        _unlink(self._file(name))

    # ------------------------------------------------------------------ node
    @classmethod
    def attach(cls, path: str) -> SharedFiles | None:
        """The server's directory ``path`` where this process sees it (same host), else None."""
        seen = _ATTACHED.get(path)
        if seen is None:
            seen = _ATTACHED[path] = os.path.isfile(os.path.join(path, MARKER))
        return cls(path) if seen else None

    def write(self, chunks: Sequence[bytes | memoryview], size: int) -> str | None:
        """Write ``chunks`` (``size`` bytes in all) to a new file; its name, or None (logged once) where
        the directory is gone or full: the caller then sends its bytes inline."""
        name = uuid.uuid4().hex
        path = self.path / name
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except OSError as err:
            self._fallback(err)
            return None
        try:
            written = 0
            for i in range(0, len(chunks), _IOV_MAX):
                written += _writev_all(fd, chunks[i:i + _IOV_MAX])
            if written != size:
                raise OSError(errno.EIO, f"wrote {written} of {size} bytes")
        except OSError as err:
            os.close(fd)
            _unlink(path)
            self._fallback(err)
            return None
        os.close(fd)
        return name

    def map_private(self, name: str, size: int) -> np.ndarray:
        """The file ``name`` (``size`` bytes) as a writable copy-on-write mapping: the node's own copy
        of its states, whose pages are copied only where it writes (the EF21 tracker changes k entries
        a row), never reaching the file. ``ValueError`` if it is not there or holds another size.

        Against reading the file into fresh memory: Flower on Ray, 1,000 clients of the 107k-parameter
        MLP, 6 rounds, two alternating pairs, blocks of 64: 2.62 and 2.12 s per round against 1.83 and
        1.64; blocks of 500: 2.86 against 2.11 (ad hoc, this project's 2-core VM)."""
        mapping = self._mmap(name, size, private=True)
        return np.zeros(0, dtype=np.uint8) if mapping is None else np.frombuffer(mapping, dtype=np.uint8)

    # ------------------------------------------------------------------ both
    def _mmap(self, name: str, size: int, private: bool) -> mmap.mmap | None:
        """A mapping of the whole file ``name``, read-only or private (None for an empty file)."""
        fd = self._open(name)
        try:
            held = os.fstat(fd).st_size
            if held != size:
                raise ValueError(f"shared record {name!r} holds {held} bytes, its reference says {size}")
            if size == 0:
                return None
            if private:
                return mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            return mmap.mmap(fd, size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)

    def _open(self, name: str) -> int:
        try:
            return os.open(self._file(name), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as err:
            raise ValueError(f"shared record {name!r}: {err.strerror}") from None

    def _file(self, name: str) -> Path:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"a shared record's name is 32 hex digits, got {name!r}")
        return self.path / name

    def _fallback(self, err: OSError) -> None:
        if not self._warned:
            self._warned = True
            log.warning("cannot write records to %s (%s); sending them inline", self.path, err)


_ATTACHED: dict[str, bool] = {}


def sweep(root: str | Path = ROOT) -> list[Path]:
    """Remove the run directories under ``root`` whose marker names a process that no longer exists
    (a server killed with SIGKILL leaves its directory, and /dev/shm is memory); returns them."""
    removed = []
    for path in Path(root).glob("fedgluon-*"):
        try:
            pid = int((path / MARKER).read_text())
        except (OSError, ValueError):
            continue  # not ours, or being created
        if not _alive(pid):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def _writev_all(fd: int, chunks: Sequence[bytes | memoryview]) -> int:
    """os.writev until every byte of ``chunks`` is written (writev may write less than asked)."""
    views = [memoryview(c).cast("B") for c in chunks if len(c)]
    total = 0
    while views:
        n = os.writev(fd, views)
        total += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]
    return total


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
