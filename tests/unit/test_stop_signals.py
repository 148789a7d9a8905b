"""SIGINT/SIGTERM reach the stop request whichever thread receives them (fedgluon/runtime/stop_signals.py).

Most tests send the signal to one other thread (``signal.pthread_kill``), as the kernel may do with a signal
sent to the process, while the main thread waits on a lock without a timeout, as Flower's simulation engine
does for a whole run. A Python-level handler alone runs only once that wait ends."""

import os
import resource
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


def _until(condition, seconds=10.0):
    end = time.monotonic() + seconds
    while not condition() and time.monotonic() < end:
        time.sleep(0.005)
    return condition()


def _exit_status(pid, seconds=10.0):
    """The child's exit status; a child still running after ``seconds`` is killed (status None)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return status
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


def _no_guard_left(before):
    """The handlers of ``before`` are back, no wake-up fd is set, and no watcher thread runs."""
    fd = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(fd)
    return ([signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == before and fd == -1
            and not [t for t in threading.enumerate() if t.name == "fedgluon-stop-signals"])


@pytest.fixture
def handlers():
    return [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_another_thread_requests_the_stop_while_the_main_thread_is_blocked(tmp_path, signum, handlers):
    checkpointer = Checkpointer(tmp_path / "c.pt")
    seen = []
    with checkpointer.signals():
        thread, held = _signal_from_another_thread([signum], lambda: seen.append(_until(
            lambda: checkpointer.stop_requested)))
        thread.start()
        held.acquire()  # no timeout: the main thread runs no handler until the other thread releases it
        thread.join()
    assert seen == [True] and checkpointer.reason == f"received {signal.Signals(signum).name}"
    assert _no_guard_left(handlers)


def test_a_later_sigint_interrupts_a_blocked_main_thread_once(tmp_path, handlers):
    """SIGTERM, then SIGINT twice, all to another thread: the stop keeps the first reason, one
    KeyboardInterrupt ends the main thread's wait, and the cleanup after it runs to its end (a SIGTERM
    handled after the interrupt does not raise again)."""
    checkpointer = Checkpointer(tmp_path / "c.pt")
    never, cleaned = threading.Event(), []
    with pytest.raises(KeyboardInterrupt), checkpointer.signals():
        thread, held = _signal_from_another_thread([signal.SIGTERM, signal.SIGINT, signal.SIGINT, signal.SIGTERM],
                                                   lambda: never.wait(10))
        thread.start()
        try:
            held.acquire()  # released only after 10 s: the interrupt must end this wait before
        finally:
            never.set()
            thread.join()
            cleaned.append(True)
    assert cleaned == [True] and checkpointer.reason == "received SIGTERM"
    assert _no_guard_left(handlers)


def test_a_signal_the_main_thread_receives_is_acted_on_before_its_handler_returns(tmp_path, handlers):
    for _ in range(50):
        checkpointer = Checkpointer(tmp_path / "c.pt")
        with checkpointer.signals():
            os.kill(os.getpid(), signal.SIGTERM)
            assert checkpointer.stop_requested
    assert _no_guard_left(handlers)


@pytest.fixture
def default_sigint():
    """Python's own SIGINT handler for the test (an earlier test's Flower or Ray may have left another)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_a_child_forked_under_the_guard_keeps_its_signals_to_itself(tmp_path, default_sigint):
    """The child gets the handlers from before the guard (its SIGINT is a KeyboardInterrupt) and none of
    the pipe: its signal neither stops the parent nor counts as the parent's first SIGINT, and leaving the
    guard does not wait for it."""
    handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    checkpointer = Checkpointer(tmp_path / "c.pt")
    guard = checkpointer.signals()
    with guard:
        pid = os.fork()
        if pid == 0:  # the child: a KeyboardInterrupt, then it leaves the guard too
            code = 1
            try:
                try:
                    signal.raise_signal(signal.SIGINT)
                except KeyboardInterrupt:
                    code = 2
                guard.__exit__(None, None, None)
                code = 0 if code == 2 and _no_guard_left(handlers) else 1
            finally:
                os._exit(code)
        status = _exit_status(pid)
        time.sleep(0.1)
        assert not checkpointer.stop_requested
        os.kill(os.getpid(), signal.SIGINT)  # the parent's first: a stop, no KeyboardInterrupt
    assert status is not None and os.waitstatus_to_exitcode(status) == 0 and checkpointer.reason == "received SIGINT"
    assert _no_guard_left(handlers)


def test_the_watcher_works_with_a_pipe_beyond_fd_1024(tmp_path, handlers):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if max(soft, hard if hard != resource.RLIM_INFINITY else 4096) < 1200:
        pytest.skip("cannot open 1,200 files here")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        test_a_signal_to_another_thread_requests_the_stop_while_the_main_thread_is_blocked(
            tmp_path, signal.SIGTERM, handlers)
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_sigterm_restored_puts_back_the_handler_a_ray_init_would_leave():
    """``ray.init`` installs a SIGTERM handler that ``ray.shutdown`` leaves; ``sigterm_restored`` (as a context
    and as a decorator) puts the earlier one back, after an exception too, and changes nothing off the main
    thread, where no handler can be set."""
    from fedgluon.runtime.ray_session import sigterm_restored

    def rays(signum, frame):  # what ray.init installs: sys.exit(signum)
        raise SystemExit(signum)

    before = signal.getsignal(signal.SIGTERM)
    with sigterm_restored():
        signal.signal(signal.SIGTERM, rays)
    assert signal.getsignal(signal.SIGTERM) is before
    with pytest.raises(RuntimeError), sigterm_restored():
        signal.signal(signal.SIGTERM, rays)
        raise RuntimeError("the run failed")
    assert signal.getsignal(signal.SIGTERM) is before

    @sigterm_restored()
    def run():
        signal.signal(signal.SIGTERM, rays)
    run()
    run()
    assert signal.getsignal(signal.SIGTERM) is before
    errors: list[BaseException] = []

    def off_main():
        try:
            with sigterm_restored():
                pass
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)
    worker = threading.Thread(target=off_main)
    worker.start()
    worker.join()
    assert not errors and signal.getsignal(signal.SIGTERM) is before
