"""Run directories: the marker that says fedgluon made a directory, and the lock a run holds on it.

A directory is only replaced with ``overwrite`` and only if it holds the :data:`MARKER` (a directory
fedgluon did not create is never touched); a directory in use by another run is refused. A run is
complete when its ``summary.json`` says ``"complete": true`` (written last).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from fedgluon.config.schema import ConfigError


def is_complete(run_dir: str | Path) -> bool:
    path = Path(run_dir) / "summary.json"
    try:
        return bool(json.loads(path.read_text()).get("complete"))
    except (OSError, ValueError):
        return False


MARKER = ".fedgluon-run"
"""The file in every run directory fedgluon creates: ``--overwrite`` deletes only directories that hold
it, and a run holds an exclusive ``flock`` on it for its whole life (the OS releases it when the
process ends, however it ends), so a second run on the same directory is refused."""


class RunDirLock:
    """An exclusive, non-blocking ``flock`` on a run directory's :data:`MARKER` file (created if absent);
    :meth:`release` (or the process's end) frees it."""

    def __init__(self, out: Path):
        import fcntl

        self.path = out / MARKER
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise ConfigError(f"cannot lock the run directory {out}: {err.strerror or err}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self.fd, 200).decode(errors="replace").split("pid ")[-1].strip() or "?"
            os.close(self.fd)
            raise ConfigError(f"{out} is in use by another fedgluon run (process {holder}); wait for it to end "
                              f"or choose another output.name") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"fedgluon run directory; locked by pid {os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = -1

    def __enter__(self) -> RunDirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def prepare_dir(out: Path, overwrite: bool) -> RunDirLock:
    """Create the run directory ``out`` (with its :data:`MARKER`) and lock it; returns the held lock.

    An existing ``out`` is refused unless ``overwrite``; even then only when it holds the marker (a
    directory fedgluon did not create is left untouched) and no other run holds its lock. Replacing it
    deletes every entry inside it but the marker, whose lock stays held meanwhile. OS errors (an
    unwritable ``output.dir``, say) become one-line :class:`ConfigError`s."""
    try:
        if out.exists() or out.is_symlink():
            return _reuse_dir(out, overwrite)
        out.mkdir(parents=True)  # FileExistsError if another run created it meanwhile: refused
        return RunDirLock(out)
    except OSError as err:
        raise ConfigError(f"cannot create the run directory {out}: {err.strerror or err}") from None


def _reuse_dir(out: Path, overwrite: bool) -> RunDirLock:
    if not out.is_dir():
        raise ConfigError(f"{out} exists and is not a directory; choose another output.name")
    if not (out / MARKER).is_file():
        raise ConfigError(f"{out} exists and was not created by fedgluon (it has no {MARKER} file), so it is "
                          f"never replaced, even with --overwrite; choose another output.name or output.dir")
    lock = RunDirLock(out)
    if not overwrite:
        lock.release()
        if is_complete(out):
            raise ConfigError(f"{out} holds a complete run; pass --overwrite to replace it, or choose another "
                              f"output.name")
        raise ConfigError(f"{out} holds an incomplete run; pass --resume to continue it, or --overwrite to replace it")
    for entry in out.iterdir():
        if entry.name == MARKER:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    return lock
