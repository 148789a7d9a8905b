"""SIGINT and SIGTERM as a stop request, whichever thread of the process the kernel hands them to.

CPython runs a Python-level signal handler in the main thread only, and only when that thread runs
bytecode. The kernel hands a signal sent to the process to any thread that does not block it. When that
is one of the threads of Ray, Flower or torch, the main thread learns of it only when it next wakes, and
Flower's simulation engine keeps the main thread in one wait without a timeout for the whole run (the
shutdown of its worker pool): the ``timeout`` or ``kill -TERM`` that should stop the run after its round
was handled when the run ended.

:func:`stop_on_signals` reads the signals from the wake-up file descriptor instead
(``signal.set_wakeup_fd``): CPython's C-level handler writes each signal's number to a pipe, in whatever
thread received it. A watcher thread reads the pipe and acts at once; so does the Python-level handler
when the main thread runs it first, so a signal the main thread received is acted on before its handler
returns, as with a plain handler. Each number is read once:

* the first SIGINT or SIGTERM calls ``request_stop("received SIGTERM")`` (say), which the run reads at the
  end of its round;
* a SIGINT once a stop was requested (by any means) raises KeyboardInterrupt in the main thread. When the
  watcher read it, it first wakes the main thread with a SIGINT of its own (``signal.pthread_kill``),
  which ends a wait that checks for signals (Python's locks, ``time.sleep``, system calls).

While active, the guard owns the process's wake-up fd; the numbers of other signals are passed on to the
fd it replaced (asyncio's, say). A child forked while it is active (``multiprocessing`` with fork) gets the
handlers and wake-up fd from before the guard and none of its pipe.
"""

from __future__ import annotations

import os
import select
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
JOIN_TIMEOUT = 5.0  # seconds exit() waits for the watcher to read the pipe to its end
_UNDO_IN_CHILD: list[Callable[[], None]] = []  # one per active guard: what a forked child undoes


def _undo_in_child() -> None:
    while _UNDO_IN_CHILD:
        _UNDO_IN_CHILD.pop()()


os.register_at_fork(after_in_child=_undo_in_child)


@contextmanager
def stop_on_signals(request_stop: Callable[[str], None], stop_requested: Callable[[], bool]) -> Iterator[None]:
    """While active, SIGINT/SIGTERM call ``request_stop(reason)`` and a later SIGINT raises KeyboardInterrupt in
    the main thread (module docstring). Both callbacks run in the watcher thread or inside the main thread's
    signal handler, under the guard's lock: they must be thread-safe and must not block. Outside the main
    thread, where handlers cannot be set, it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    guard = _Guard(request_stop, stop_requested)
    try:
        guard.enter()
        yield
    finally:
        guard.exit()


class _Guard:
    def __init__(self, request_stop: Callable[[str], None], stop_requested: Callable[[], bool]):
        self.request_stop, self.stop_requested = request_stop, stop_requested
        self.main, self.pid = threading.get_ident(), os.getpid()
        self.interrupt = False  # a SIGINT came after the stop request: the main thread raises
        self.closing = False  # exit() began: no more KeyboardInterrupt, no more wake-ups
        self.lock = threading.RLock()  # the handler may run nested in _drain, in the main thread
        self.previous: dict[int, Any] = {}
        self.previous_fd = -1
        self.read_end, self.write_end = os.pipe()
        os.set_blocking(self.read_end, False)
        os.set_blocking(self.write_end, False)  # the C-level handler must never block on it
        self.watcher = threading.Thread(target=self._watch, name="fedgluon-stop-signals", daemon=True)

    def enter(self) -> None:
        self.watcher.start()
        _UNDO_IN_CHILD.append(self._undo_in_child)
        self.previous_fd = signal.set_wakeup_fd(self.write_end, warn_on_full_buffer=False)
        for sig in STOP_SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)

    def exit(self) -> None:
        """The wake-up fd back before the handlers (a handler restored first could raise while the fd is still
        this pipe's); then the pipe closed, once the watcher has read what is left (fork: the module)."""
        if os.getpid() != self.pid:  # a forked child leaving the parent's guard: the fork hook undid it
            return
        self.closing = True
        try:
            current = signal.set_wakeup_fd(-1)  # another's, if entering stopped before setting this pipe's
            signal.set_wakeup_fd(self.previous_fd if current == self.write_end else current)
            for sig, handler in self.previous.items():
                signal.signal(sig, handler)
        finally:
            with suppress(ValueError):
                _UNDO_IN_CHILD.remove(self._undo_in_child)
            os.close(self.write_end)
            if self.watcher.ident is not None:  # a process forked outside os.fork may hold the write end still:
                self.watcher.join(JOIN_TIMEOUT)  # then the watcher and its read end are left behind
            if not self.watcher.is_alive():
                os.close(self.read_end)

    def _undo_in_child(self) -> None:  # a forked child: the pipe is the parent's, the watcher is not there
        signal.set_wakeup_fd(self.previous_fd)
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        os.close(self.read_end)
        os.close(self.write_end)

    def _handle(self, signum: int, frame: Any) -> None:
        self._drain()  # returns once every number written so far is noted (after the watcher's, if it reads)
        if signum == signal.SIGINT and self.interrupt and not self.closing:
            raise KeyboardInterrupt

    def _note(self, signum: int) -> None:
        if signum not in STOP_SIGNALS:
            if self.previous_fd >= 0:  # another's wake-up fd: pass it on
                with suppress(OSError):
                    os.write(self.previous_fd, bytes([signum]))
            return
        if not self.stop_requested():
            self.request_stop(f"received {signal.Signals(signum).name}")
        elif signum == signal.SIGINT and not self.interrupt:
            self.interrupt = True
            if threading.get_ident() != self.main and not self.closing:  # wake it; its own number is passed over
                signal.pthread_kill(self.main, signal.SIGINT)

    def _drain(self) -> bool:
        """Note every number waiting in the pipe; True once its write end is closed and all was read."""
        with self.lock:
            while True:
                try:
                    data = os.read(self.read_end, 64)
                except BlockingIOError:
                    return False
                if not data:
                    return True
                for signum in data:
                    self._note(signum)

    def _watch(self) -> None:
        poller = select.poll()  # not select.select: it refuses fds >= 1024, which a busy process reaches
        poller.register(self.read_end, select.POLLIN)
        while not self._drain():
            poller.poll()
