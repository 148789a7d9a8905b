"""SIGINT and SIGTERM as a stop request, whichever thread of the process the kernel hands them to.

CPython runs a Python-level signal handler in the main thread only, and only when that thread runs
bytecode. The kernel hands a signal sent to the process to any thread that does not block it. When that
is one of the threads of Ray, Flower or torch, the main thread learns of it only when it next wakes. Flower's
simulation engine keeps the main thread in one wait without a timeout for the whole run (the shutdown of its
worker pool), so such a signal was handled only when the run ended: the ``timeout`` or ``kill -TERM`` that
should stop the run after its round did nothing. 1 run in 20 of ``tests/integration/test_reliability.py``'s
SIGTERM test went on for 50 rounds after the signal (this repository's 2-core VM, 2026-12-07).

:func:`stop_on_signals` reads the signals from the wake-up file descriptor instead (``signal.set_wakeup_fd``):
CPython's C-level handler writes each signal's number there, in whatever thread received it. A watcher thread
reads it and acts at once; so does the Python-level handler, when the main thread runs it first (a signal
the main thread received is then acted on before its handler returns, as with a plain handler). Each
number is read once:

* the first SIGINT or SIGTERM calls ``request_stop("received SIGTERM")`` (say), which the run reads at the end
  of its round;
* a SIGINT once a stop was requested interrupts the main thread (``KeyboardInterrupt``). The watcher sends
  the main thread a SIGINT of its own (``signal.pthread_kill``): that ends a wait it is blocked in, and
  the Python-level handler raises.
"""

from __future__ import annotations

import os
import select
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def stop_on_signals(request_stop: Callable[[str], None], stop_requested: Callable[[], bool]) -> Iterator[None]:
    """While active, SIGINT/SIGTERM request a stop and a later SIGINT raises KeyboardInterrupt in the main
    thread (module docstring). Outside the main thread, where handlers cannot be set, it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    main = threading.main_thread().ident
    assert main is not None
    interrupt = threading.Event()

    def note(signum: int) -> None:  # once per signal received, in whichever thread drains its byte
        if signum not in STOP_SIGNALS:
            return
        if not stop_requested():
            request_stop(f"received {signal.Signals(signum).name}")
        elif signum == signal.SIGINT and not interrupt.is_set():
            interrupt.set()
            if threading.get_ident() != main:  # wake it; its own byte comes back here, and is passed over
                signal.pthread_kill(main, signal.SIGINT)

    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    os.set_blocking(write_end, False)
    drain = _Drain(read_end, note)

    def handle(signum: int, frame: Any) -> None:  # in the main thread: a signal it received is noted already
        drain()
        if interrupt.is_set():
            raise KeyboardInterrupt

    watcher = threading.Thread(target=drain.watch, name="fedgluon-stop-signals", daemon=True)
    watcher.start()
    previous_fd = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    previous = {sig: signal.signal(sig, handle) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(previous_fd)
        os.close(write_end)  # the watcher reads what is left, then the end of the pipe
        watcher.join()
        os.close(read_end)


class _Drain:
    """Reads the signal numbers waiting in the pipe and notes each, under one lock: the watcher thread
    (:meth:`watch`, until the pipe's write end is closed) and the main thread's handler both call it."""

    def __init__(self, fd: int, note: Callable[[int], None]):
        self.fd, self.note, self.lock = fd, note, threading.RLock()

    def __call__(self) -> bool:
        """Note what is waiting; True once the write end is closed and everything was read."""
        with self.lock:
            while True:
                try:
                    data = os.read(self.fd, 64)
                except BlockingIOError:
                    return False
                if not data:
                    return True
                for signum in data:
                    self.note(signum)

    def watch(self) -> None:
        while not self():
            select.select([self.fd], [], [])
