"""fedgluon.dispatch: Flower's dispatch loop waits at most the interval, and is restored afterwards."""

import threading
import time

from flwr.server.superlink.fleet.vce import vce_api

from fedgluon.dispatch import ShortWait, faster_dispatch, interval_for


def test_short_wait_caps_the_wait_and_passes_the_event_through():
    event = threading.Event()
    short = ShortWait(event, 0.01)
    start = time.perf_counter()
    assert short.wait(30.0) is False  # would block 30 s on the event itself
    assert time.perf_counter() - start < 10.0
    assert not short.is_set()
    short.set()  # the event's own method
    assert event.is_set() and short.is_set() and short.wait(30.0) is True


def test_faster_dispatch_patches_flowers_loop_only_while_active():
    original = vce_api.add_messages_to_queue
    with faster_dispatch(num_nodes=2) as patched:
        assert patched and vce_api.add_messages_to_queue is not original
        # Flower's own loop runs, sleeping on the short wait: it stops as soon as the event is set
        stop = threading.Event()
        thread = threading.Thread(target=vce_api.add_messages_to_queue, args=(_NoState(), None, {}, stop))
        thread.start()
        stop.set()
        thread.join(timeout=30)
        assert not thread.is_alive()
    assert vce_api.add_messages_to_queue is original
    assert interval_for(2) < 0.01 and interval_for(10 ** 6) == 0.1


class _NoState:
    def get_message_ins(self, node_id, limit):  # pragma: no cover - no nodes to poll
        return []
