"""fedgluon.flower.dispatch: Flower's simulation loops wake on pushes and replies (and wait at most their caps),
the Grid wrapper returns every reply or stops at its timeout, and Flower's functions are restored afterwards."""

import queue
import threading
import time
import weakref
from types import SimpleNamespace

import pytest
from flwr.server.superlink.fleet.vce import vce_api

from fedgluon.flower import dispatch
from fedgluon.flower.dispatch import SIGNALLED_WAIT, ShortWait, Wakeups, WakingGrid, faster_dispatch, interval_for


def test_short_wait_caps_the_wait_and_passes_the_event_through():
    event = threading.Event()
    short = ShortWait(event, 0.01)
    start = time.perf_counter()
    assert short.wait(30.0) is False  # would block 30 s on the event itself
    assert time.perf_counter() - start < 10.0
    assert not short.is_set()
    short.set()  # the event's own method
    assert event.is_set() and short.is_set() and short.wait(30.0) is True


def test_short_wait_wakes_on_a_push_and_is_capped():
    stop, wake = threading.Event(), Wakeups()
    threading.Timer(0.05, wake.pushed.set).start()
    start = time.perf_counter()
    assert ShortWait(stop, 30.0, wake).wait(None) is False  # woken by the push, not the 30 s cap
    assert time.perf_counter() - start < 10.0 and not wake.pushed.is_set()  # cleared for the next wait
    start = time.perf_counter()
    assert ShortWait(stop, 0.01, wake).wait(30.0) is False  # no push: the interval caps the wait
    assert time.perf_counter() - start < 10.0
    wake.signalled = True  # a Grid signals its pushes: the cap is Flower's cadence, not the interval
    start = time.perf_counter()
    ShortWait(stop, 0.0, wake).wait(30.0)
    assert time.perf_counter() - start >= 0.9 * SIGNALLED_WAIT
    stop.set()
    assert ShortWait(stop, 0.01, wake).wait(0.0) is True


def test_flowers_reply_thread_signals_each_stored_reply():
    stored, replies, stop = [], queue.Queue(), threading.Event()
    state = SimpleNamespace(store_message_res=stored.append)
    with faster_dispatch(num_nodes=2) as patched:
        assert patched and dispatch.active() is not None
        wake = dispatch.active()
        thread = threading.Thread(target=vce_api.put_message_into_state, args=(state, replies, stop))
        thread.start()
        replies.put("reply")
        assert wake.replied.wait(30.0) and stored == ["reply"]
        assert "get" in vars(replies)  # its waits are capped (dispatch.short_gets): it sees the stop soon
        stop.set()
        thread.join(timeout=30)
        assert not thread.is_alive()
    assert dispatch.active() is None


def test_short_gets_caps_flowers_one_second_queue_waits(monkeypatch):
    """Flower's worker and reply threads loop on ``get(timeout=1.0)`` until the stop event is set: capped,
    they see it within ``STOP_POLL`` (before, every Ray run ended ~1 s after its ServerApp)."""
    asked = []
    real_get = queue.Queue.get
    monkeypatch.setattr(queue.Queue, "get", lambda q, block=True, timeout=None: asked.append(timeout) or
                        real_get(q, block, timeout))
    q = dispatch.short_gets(queue.Queue())
    with pytest.raises(queue.Empty):
        q.get(timeout=1.0)
    q.put("message")
    assert q.get(timeout=1.0) == "message"
    q.put("short")
    assert q.get(timeout=0.01) == "short"  # a shorter timeout is kept
    q.put("blocking")
    assert q.get() == "blocking"
    assert asked == [dispatch.STOP_POLL, dispatch.STOP_POLL, 0.01, None]  # no timeout stays no timeout
    gone = weakref.ref(q)
    del q
    assert gone() is None  # freed at once: the capped get does not hold its queue


class _SlowGrid:
    """A stand-in for Flower's InMemoryGrid: a reply to each pushed message is stored by another thread
    after ``delay`` seconds (never, when None), as Flower's reply thread stores it, waking ``wake.replied``."""

    def __init__(self, wake, delay):
        self.wake, self.delay, self.stored, self.lock = wake, delay, {}, threading.Lock()
        self.name = "slow grid"

    def push_messages(self, messages):
        ids = [str(i) for i, _ in enumerate(messages)]
        for k, i in enumerate(ids):
            if self.delay is not None:
                threading.Timer(self.delay * (k + 1), self._reply, args=(i,)).start()
        return ids

    def _reply(self, i):
        with self.lock:
            self.stored[i] = SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i))
        self.wake.replied.set()

    def pull_messages(self, ids):
        with self.lock:
            return [self.stored.pop(i) for i in list(ids) if i in self.stored]


def test_waking_grid_returns_every_reply_or_stops_at_its_timeout():
    wake = Wakeups()
    grid = WakingGrid(_SlowGrid(wake, 0.02), wake)
    start = time.perf_counter()
    replies = grid.send_and_receive(["a", "b", "c"], timeout=60.0)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["0", "1", "2"]
    assert time.perf_counter() - start < 30.0 and wake.signalled and grid.name == "slow grid"
    silent = WakingGrid(_SlowGrid(wake, None), wake)
    start = time.perf_counter()
    assert silent.send_and_receive(["a"], timeout=0.3) == []
    assert 0.3 <= time.perf_counter() - start < 30.0


def test_faster_dispatch_patches_flowers_loop_only_while_active():
    original = vce_api.add_messages_to_queue
    original_replies = vce_api.put_message_into_state
    with faster_dispatch(num_nodes=2) as patched:
        assert patched and vce_api.add_messages_to_queue is not original
        assert vce_api.put_message_into_state is not original_replies
        # Flower's own loop runs, sleeping on the short wait: it stops as soon as the event is set
        stop, messages = threading.Event(), queue.Queue()
        thread = threading.Thread(target=vce_api.add_messages_to_queue, args=(_NoState(), messages, {}, stop))
        thread.start()
        stop.set()
        thread.join(timeout=30)
        assert not thread.is_alive()
        assert "get" in vars(messages)  # Flower's worker threads take from this queue: their waits are capped too
    assert vce_api.add_messages_to_queue is original and vce_api.put_message_into_state is original_replies
    assert interval_for(2) < 0.01 and interval_for(10 ** 6) == 0.1


class _NoState:
    def get_message_ins(self, node_id, limit):  # pragma: no cover - no nodes to poll
        return []


def test_the_installed_flwr_is_a_version_the_patch_was_written_for():
    """fedgluon.flower.dispatch patches Flower's internals: a flwr it was not written for fails here, loudly."""
    installed = dispatch.flower_version()
    assert installed in dispatch.WRITTEN_FOR, (
        f"fedgluon/flower/dispatch.py patches Flower's simulation loops (vce_api.add_messages_to_queue, "
        f"put_message_into_state, InMemoryGrid.send_and_receive) and was written for flwr "
        f"{', '.join(dispatch.WRITTEN_FOR)}, but flwr {installed} is installed: check the patch against it, then "
        f"add the version to dispatch.WRITTEN_FOR (until then run_ray keeps Flower's 0.1 s cadence)")


def test_under_another_flwr_version_nothing_is_patched(monkeypatch, caplog):
    original = vce_api.add_messages_to_queue
    monkeypatch.setattr(dispatch, "flower_version", lambda: "0.0.1")
    with faster_dispatch(num_nodes=2) as patched:
        assert not patched and dispatch.active() is None
        assert vce_api.add_messages_to_queue is original
    assert "not flwr 0.0.1" in caplog.text


def test_engine_fast_dispatch_is_a_config_field_on_by_default():
    """``engine.fast_dispatch`` (on by default, as run_ray's ``fast_dispatch``) is the explicit option."""
    import inspect

    import pytest

    from fedgluon.config.schema import ConfigError, load
    from fedgluon.flower.engines import run_ray

    assert load(None).engine.fast_dispatch is True
    assert inspect.signature(run_ray).parameters["fast_dispatch"].default is True
    assert load(None, ["engine.fast_dispatch=false"]).engine.fast_dispatch is False
    with pytest.raises(ConfigError, match="fast_dispatch"):
        load(None, ["engine.fast_dispatch=sometimes"])
