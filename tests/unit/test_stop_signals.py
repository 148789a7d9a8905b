"""SIGINT/SIGTERM reach the stop request whichever thread receives them (fedgluon/runtime/stop_signals.py).

Each test sends the signal to one other thread (``signal.pthread_kill``), as the kernel may do with a signal
sent to the process, while the main thread waits on a lock without a timeout, as Flower's simulation engine
does for a whole run. A Python-level handler alone runs only once that wait ends."""

import signal
import threading
import time

import pytest

from fedgluon.sim.checkpoint import Checkpointer


def _signal_from_another_thread(signums, then):
    """A thread that, once the main thread has had 0.2 s to block on the returned lock, sends itself
    ``signums``, calls ``then()`` and releases the lock."""
    held = threading.Lock()
    held.acquire()

    def other():
        try:
            time.sleep(0.2)  # the main thread is blocked on the lock by then: no handler of its own runs
            for signum in signums:
                signal.pthread_kill(threading.get_ident(), signum)
            then()
        finally:
            held.release()

    return threading.Thread(target=other), held


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_another_thread_requests_the_stop_while_the_main_thread_is_blocked(tmp_path, signum):
    checkpointer = Checkpointer(tmp_path / "c.pt")
    seen = []
    with checkpointer.signals():
        thread, held = _signal_from_another_thread([signum], lambda: seen.append(checkpointer._stop.wait(10)))
        thread.start()
        held.acquire()  # no timeout: the main thread runs no handler until the other thread releases it
        thread.join()
    assert seen == [True] and checkpointer.reason == f"received {signal.Signals(signum).name}"


def test_a_second_sigint_interrupts_a_blocked_main_thread_and_the_first_reason_stays(tmp_path):
    checkpointer = Checkpointer(tmp_path / "c.pt")
    never = threading.Event()
    with pytest.raises(KeyboardInterrupt), checkpointer.signals():
        thread, held = _signal_from_another_thread([signal.SIGTERM, signal.SIGINT, signal.SIGINT],
                                                   lambda: never.wait(10))
        thread.start()
        try:
            held.acquire()  # released only after 10 s: the interrupt must end this wait before
        finally:
            never.set()
            thread.join()
    assert checkpointer.stop_requested and checkpointer.reason == "received SIGTERM"


def test_handlers_and_the_wakeup_fd_are_restored(tmp_path):
    before = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    with Checkpointer(tmp_path / "c.pt").signals():
        assert signal.getsignal(signal.SIGTERM) is not before[1]
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == before
    assert signal.set_wakeup_fd(-1) == -1
