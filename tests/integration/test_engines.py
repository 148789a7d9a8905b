"""Flower engines: the in-process Grid and Ray simulation run the same apps and give the plain driver's metrics."""

import logging
import warnings

import pandas as pd
import pytest
import torch
from helpers import inbox_targets, nan_in_payload, plain_frame, plain_table, same_metrics, same_table

from benchmarks import golden
from fedgluon.config import spec as specs
from fedgluon.flower.client_app import make_client_app
from fedgluon.flower.engines import InProcessGrid, run_inprocess, run_ray
from fedgluon.sim.driver import run_plain

SPEC = {"task": {"name": "synthetic", "num_clients": 4, "dim": 10, "classes": 4, "mean_samples": 40, "hidden": [8]},
        "algorithm": {"name": "gluon-ef21-sarah", "lr": 0.05, "compressor": {"name": "topk", "ratio": 0.1},
                      "refresh_prob": 0.3},
        "rounds": 5, "seed": 3}


def test_client_app_pickles_as_its_spec(monkeypatch):
    """Flower's Ray engine pickles the ClientApp with every message: a fixed-spec app pickles as its spec
    (small) and unpickles to one app per spec and process, which runs like the original, and marks its
    process as fedgluon's (fedgluon.runtime.prepare_process)."""
    import json
    import pickle

    from fedgluon.flower.client_app import SpecClientApp
    from fedgluon.runtime import process

    monkeypatch.setitem(process._owned, "is", False)  # this test process is no worker: restored after

    threads = torch.get_num_threads()
    app = make_client_app(SPEC)
    data = pickle.dumps(app)
    assert isinstance(app, SpecClientApp) and len(data) < 2000
    back = pickle.loads(data)
    assert isinstance(back, SpecClientApp) and back is pickle.loads(pickle.dumps(app))
    assert specs.normalise(SPEC) == specs.normalise(json.loads(back.spec_json))
    assert type(make_client_app()) is not SpecClientApp  # no fixed spec: the run config names it
    assert process._owned["is"]
    torch.set_num_threads(threads)  # unpickling prepared this process: the spec's threads


def test_inprocess_flower_equals_plain_driver():
    """Metrics bitwise equal (wall times aside), and the client-state tables too."""
    strategy = run_inprocess(SPEC)
    same_metrics(pd.DataFrame(strategy.history), plain_frame(SPEC))
    assert len(strategy.history) == SPEC["rounds"]
    same_table(strategy.federation.table, plain_table(SPEC))


@pytest.mark.parametrize("config", list(golden.CONFIGS))
def test_every_algorithm_on_the_inprocess_engine_equals_the_plain_driver(config):
    """Every golden configuration (every registered algorithm, 15 of 25 at participation 0.5), blocks of 4:
    metrics, per-client rows and final model bitwise equal, the Flower apps against the plain driver."""
    inprocess, plain = (golden.run_one(config, 4, engine) for engine in ("inprocess", "plain"))
    diffs = golden.diff(inprocess, plain)
    assert all(d.equal for d in diffs.values()), {a: d.text() for a, d in diffs.items()}


def test_client_state_commits_only_accepted_rounds(monkeypatch, caplog):
    """Partial participation; client 1's payload is corrupted in rounds 1 and 3 and client 2 raises in round 2.
    Every client's commit counter equals its accepted rounds; the rounds complete; reasons are logged."""
    spec = {**SPEC, "participation": 0.75, "rounds": 6, "algorithm": {**SPEC["algorithm"], "name": "gluon-ef21"}}
    spec["algorithm"].pop("refresh_prob")
    original = InProcessGrid.pull_messages

    def faulty(self, ids, timeout=None):
        ids = list(ids)
        targets = inbox_targets(self, ids)
        replies = []
        for i in ids:
            k, j = targets[i]
            if k == "2" and j == 2:
                self._inbox[i].content.config_records["config"]["clients"] = [-1]  # the ClientApp raises
            reply = list(original(self, [i]))[0]
            if k in ("1", "3") and j == 1 and not reply.has_error():
                nan_in_payload(reply.content, 1)
            replies.append(reply)
        return replies

    monkeypatch.setattr(InProcessGrid, "pull_messages", faulty)
    with caplog.at_level(logging.WARNING, logger="fedgluon"):
        strategy = run_inprocess(spec)
    log = pd.DataFrame(strategy.client_log)
    assert len(strategy.history) == 6
    accepted = log[log.status == "accepted"].groupby("client").size()
    table = strategy.federation.table
    assert table.commits.tolist() == [int(accepted.get(j, 0)) for j in range(4)]
    bad = log[(log.client == 1) & log["round"].isin([1, 3])]
    assert set(bad.status) <= {"rejected"} and len(bad) >= 1
    assert "non-finite values" in caplog.text
    if ((log.client == 2) & (log["round"] == 2)).any():
        assert log[(log.client == 2) & (log["round"] == 2)].status.item() == "failed"
        assert "failed" in caplog.text
    frame = pd.DataFrame(strategy.history)
    assert frame["rejected"].sum() == (log.status == "rejected").sum()
    assert frame["failed"].sum() == (log.status == "failed").sum()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ray_simulation_equals_inprocess_and_plain_driver():
    """On Ray with blocks of 2 virtual clients per node (one client per node on Ray: test_reliability),
    the metrics equal the plain driver's and the in-process engine's, and so does every client's row of
    the client-state table; neither flwr 1.42's deprecation of ``run_simulation``, which the Ray engine
    calls on purpose, nor Ray's tip on the GPU hiding that fedgluon.flower.engines.QUIET_ENV pins is shown;
    and the SIGTERM handler Ray's init installs ends with Ray."""
    import signal

    before = signal.getsignal(signal.SIGTERM)
    shown: list[str] = []
    flwr_log, handler = logging.getLogger("flwr"), logging.Handler()
    handler.emit = lambda record: shown.append(record.getMessage())
    flwr_log.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            strategy = run_ray({**SPEC, "block_size": 2}, num_cpus=1, ray_init_args={"num_cpus": 2})
    finally:
        flwr_log.removeHandler(handler)
    assert signal.getsignal(signal.SIGTERM) is before
    assert not [m for m in shown if "`run_simulation` function is deprecated" in m]
    assert not [w for w in caught if "Ray will no longer override accelerator" in str(w.message)]
    assert strategy.node_devices == {("cpu", "")}  # no GPU share: Ray assigned the nodes no GPU
    ray_frame = pd.DataFrame(strategy.history)
    same_metrics(ray_frame, plain_frame(SPEC), loss_rtol=1e-6)
    inprocess = run_inprocess(SPEC)
    same_metrics(ray_frame, pd.DataFrame(inprocess.history), loss_rtol=1e-6)
    same_table(strategy.federation.table, inprocess.federation.table)
    same_table(strategy.federation.table, plain_table(SPEC))


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ray_with_gpu_shares_on_a_machine_without_cuda_falls_back_to_the_cpu():
    """``engine.num_gpus``: each client task asks Ray for half of a GPU that Ray is told exists
    (``num_gpus=1`` at init), so Ray schedules the actors on shares and sets their visible devices; torch
    sees no CUDA here, so ``client_device: auto`` is the CPU and the run equals the plain driver's."""
    spec = {**SPEC, "block_size": 2, "client_device": "auto", "rounds": 3}
    strategy = run_ray(spec, num_cpus=1, num_gpus=0.5, ray_init_args={"num_cpus": 2, "num_gpus": 1})
    assert strategy.node_devices == {("cpu", "0")}  # each node held a share of GPU 0 and computed on the CPU
    same_metrics(pd.DataFrame(strategy.history), plain_frame(spec), loss_rtol=1e-6)


def test_server_polls_flowers_simulation_grid_every_5_ms():
    """Flower's simulation Grid (the real InMemoryGrid, built as run_simulation builds it) sleeps 0.1 s
    between reply polls, a floor under every round; the ServerApp lowers it. Grids without the
    attribute (fedgluon's in-process Grid) are left alone."""
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid import InMemoryGrid

    from strategies.server_app import POLL_INTERVAL, poll_faster

    grid = InMemoryGrid(state_factory=LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(),
                                                       ObjectStoreFactory()))
    assert grid.pull_interval == 0.1
    poll_faster(grid)
    assert grid.pull_interval == POLL_INTERVAL == 0.005
    inprocess = InProcessGrid(make_client_app(SPEC), 2, seed=0)
    poll_faster(inprocess)
    assert not hasattr(inprocess, "pull_interval")


def test_gc_pause_restores_the_collector_state():
    import gc

    from fedgluon.runtime.gc_pause import gc_paused

    assert gc.isenabled()
    with pytest.raises(RuntimeError):
        with gc_paused():
            with gc_paused():
                assert not gc.isenabled()
            assert not gc.isenabled()  # the outer pause still holds
            raise RuntimeError
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # not re-enabled by a pause that found it off
    finally:
        gc.enable()


def test_the_collector_is_paused_once_per_round_in_each_engine_loop(monkeypatch):
    """The plain driver's round, and a Flower round from configure_train through the Grid's exchange to
    aggregate_train (GluonStrategy.start's RoundPause), run with the collector off; it is on again after
    each run."""
    import gc

    seen: dict[str, list[bool]] = {"plain": [], "flower": [], "exchange": []}
    exchange = InProcessGrid.send_and_receive

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if any(m.metadata.message_type == "train" for m in messages):  # not the handshake, nor evaluate's none
            seen["exchange"].append(gc.isenabled())  # between configure_train and aggregate_train
        return exchange(self, messages, timeout=timeout)

    monkeypatch.setattr(InProcessGrid, "send_and_receive", send_and_receive)
    s = specs.normalise({**SPEC, "rounds": 2})
    task, algo = specs.build(s)
    run_plain(algo, task.objectives, task.initial_params(), 2,
              on_round=lambda row: seen["plain"].append(gc.isenabled()))
    assert gc.isenabled()
    run_inprocess(s, on_round=lambda row: seen["flower"].append(gc.isenabled()))
    assert gc.isenabled()
    assert seen == {"plain": [False, False], "flower": [False, False], "exchange": [False, False]}


def test_a_round_pause_left_open_ends_with_its_loop():
    import gc

    from fedgluon.runtime.gc_pause import round_pauses

    assert gc.isenabled()
    with pytest.raises(RuntimeError):
        with round_pauses() as pause:
            pause.begin()
            pause.begin()  # a round is open: nothing
            assert not gc.isenabled()
            raise RuntimeError  # the round never reaches its end()
    assert gc.isenabled()
    gc.disable()
    try:
        with round_pauses() as pause:
            pause.begin()
            pause.end()
        assert not gc.isenabled()  # not re-enabled by a pause that found it off
    finally:
        gc.enable()


def _in_fresh_process(code: str) -> None:
    """Run ``code`` in a fresh interpreter (freezing is process-wide and permanent); it must exit 0."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_freeze_once_freezes_what_survives_once():
    """Objects made with the collector off are frozen by the first call, the garbage cycles among them
    collected first; a second call freezes nothing."""
    _in_fresh_process("""
import gc, weakref
from fedgluon.runtime.gc_pause import freeze_once
class Node: pass
gc.disable()  # as inside a pause: nothing is collected unless freeze_once collects
keep = [[i] for i in range(1000)]
cycle = Node(); cycle.me = cycle; dead = weakref.ref(cycle); del cycle
freeze_once()
gc.enable()
assert dead() is None, "a young garbage cycle was frozen, not collected"
assert not any(o is keep for o in gc.get_objects()), "what survives is not frozen"  # frozen: not listed
n = gc.get_freeze_count()
later = [[i] for i in range(1000)]
freeze_once()
assert gc.get_freeze_count() == n and any(o is later for o in gc.get_objects())
""")


def test_a_ray_workers_clientapp_settles_once_before_its_first_message():
    """The ClientApp's ``_settle`` (its handshake, or its first train message) in a Ray worker: torch.func's
    first call is made (torch._dynamo imported) and what the process holds is frozen, once per process;
    elsewhere (a deployed ClientApp's process of one message, the in-process engine's driver) nothing."""
    _in_fresh_process("""
import gc, sys
from fedgluon.flower import client_app
before = gc.get_freeze_count()
client_app._settle()
assert "torch._dynamo" not in sys.modules and gc.get_freeze_count() == before
""")
    _in_fresh_process("""
import gc, sys
from fedgluon.flower import client_app
client_app._in_ray_worker = lambda: True
before = gc.get_freeze_count()  # some Pythons freeze a few hundred objects at start-up
assert "torch._dynamo" not in sys.modules
client_app._settle()
n = gc.get_freeze_count()
assert "torch._dynamo" in sys.modules and n > before + 100_000, (before, n)
dynamo = vars(sys.modules["torch._dynamo"])
assert not any(o is dynamo for o in gc.get_objects()), "frozen before the warm-up, not after"
client_app._settle()
assert gc.get_freeze_count() == n
""")


def test_the_clientapp_settles_once_after_building_the_task_and_before_reading_any_rows():
    """A whole in-process run with the ClientApp told it is in a Ray worker: the process freezes once, after
    the task is built and before any train message's rows are read."""
    _in_fresh_process("""
from fedgluon.flower import client_app, wire
from fedgluon.flower.engines import run_inprocess
from fedgluon.config import spec as specs
events = []
client_app._in_ray_worker = lambda: True
freeze, read = client_app.freeze_once, wire.record_to_rows
client_app.freeze_once = lambda: (events.append("freeze"), freeze())[1]
wire.record_to_rows = lambda *a: (events.append("read"), read(*a))[1]
built = specs.build_cached
specs.build_cached = lambda s: (events.append("built") if not events else None, built(s))[1]
run_inprocess(specs.normalise({"task": {"name": "synthetic", "num_clients": 4, "dim": 6, "classes": 3,
                                        "hidden": [4]}, "algorithm": {"name": "gluon-ef21"}, "rounds": 2,
                               "block_size": 2, "eval_every": 10}))
assert events[:2] == ["built", "freeze"] and events.count("freeze") == 1 and events.count("read") == 4, events
""")


def test_replies_read_as_they_arrive_give_the_same_run(monkeypatch):
    """Under run_ray the server's grid hands each reply to GluonStrategy.read_reply as it is pulled (a
    block is parsed while the others compute); aggregate_train then uses those reads, each reply read
    once, and the run equals the plain driver's. Here with fedgluon's in-process grid behind the same
    WakingGrid (dispatch.active() patched to give one)."""
    from fedgluon.flower import dispatch
    from strategies.strategy import GluonStrategy

    monkeypatch.setattr(dispatch, "active", lambda: dispatch.Wakeups())
    reads, early = [], []
    read, read_reply = GluonStrategy._read, GluonStrategy.read_reply
    monkeypatch.setattr(GluonStrategy, "_read", lambda self, msg, js: reads.append(js) or read(self, msg, js))

    def spy(self, msg):
        read_reply(self, msg)
        early.append(id(msg) in self._early)

    monkeypatch.setattr(GluonStrategy, "read_reply", spy)
    spec = {**SPEC, "block_size": 2}
    strategy = run_inprocess(spec)
    same_metrics(pd.DataFrame(strategy.history), plain_frame(SPEC), loss_rtol=1e-6)
    rounds, blocks = SPEC["rounds"], 2
    assert len(reads) == rounds * blocks and early.count(True) == rounds * blocks  # the hello replies are not read
    assert strategy._early == {}
