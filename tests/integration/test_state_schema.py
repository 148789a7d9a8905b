"""The client-state schema (fedgluon/clients/state_schema.py) and the table that holds it (fedgluon/clients/table.py).

Every algorithm's states, over rounds with partial participation, fit the schema its first step fixes;
a state that does not fit (an extra column, another shape or dtype, NaN, a 256 MB array, 200,000
arrays, a forged commit count) is rejected for that client, logged, and never committed: the other
clients go on, and the checkpoint is the size it would be without it."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from benchmarks import golden
from fedgluon.clients.state_schema import StateSchema
from fedgluon.clients.table import flatten
from fedgluon.config import spec as specs
from fedgluon.flower import client_app
from fedgluon.flower.engines import run_inprocess
from fedgluon.flower.wire import to_array
from fedgluon.sim.checkpoint import Checkpointer, Snapshot
from fedgluon.sim.driver import run_plain
from fedgluon.sim.federation import Federation

TASK = {"name": "synthetic", "num_clients": 6, "dim": 6, "classes": 3, "hidden": [5], "mean_samples": 20,
        "batch_size": 8}
ALGORITHMS = {name: config["algorithm"] for name, config in golden.CONFIGS.items()}  # every algorithm (test_golden)
ALGORITHMS.update({  # refreshes drawn at random (the goldens' MARINA and EF21-SARAH refresh on a period)
    "gluon-marina-drawn": {"name": "gluon-marina"},
    "gluon-ef21-sarah-drawn": {"name": "gluon-ef21-sarah", "compressor": {"name": "randk_seeded", "ratio": 0.6}}})


@pytest.mark.parametrize("config", ALGORITHMS)
def test_every_algorithm_keeps_the_state_layout_its_first_step_fixes(config):
    """Over 4 rounds at participation 0.5 (first and later participations mixed in a block) no state is
    rejected, and a step of every client from the table the run left proposes columns that fit it."""
    spec = specs.normalise({"task": TASK, "algorithm": {"lr": 0.05, **ALGORITHMS[config]}, "seed": 3})
    task, algo = specs.build(spec)
    X0 = task.initial_params()
    schema = algo.state_schema(task.objectives[0], X0, 3)
    assert not {"commits", "x_prev"} & {p.split("/")[0] for p in schema.leaves}  # derived by the server
    res = run_plain(algo, task.objectives, X0, 4, seed=3, participation=0.5, block_size=3)
    assert sum(row["rejected"] for row in res.history) == 0
    table = res.table
    assert table.check(table.columns, table.num_clients) is None
    assert set(table.commits.tolist()) != {0}
    bc = algo.broadcast(res.server_state, 4, 3, table.num_clients)
    results = algo.step_block(table.rows(range(table.num_clients)), bc, task.objectives)
    assert all(table.check(flatten(r.state), len(r.clients), algo.derived) is None for r in results)


def test_the_schema_of_a_state():
    state = {"est": {"m": {"w": torch.zeros(2, 3)}}, "comp": {}, "n": torch.tensor(1)}
    schema = StateSchema.of(state)
    assert set(schema.leaves) == {"est/m/w", "comp/", "n"}
    assert schema.nbytes == 6 * 4 + 8
    with pytest.raises(TypeError, match="'n' is a int, not a tensor"):
        StateSchema.of({**state, "n": 3})


def test_the_table_check_names_what_is_wrong():
    spec = specs.normalise({"task": TASK, "algorithm": {"name": "gluon-ef21", "lr": 0.05}, "seed": 3})
    task, algo = specs.build(spec)
    table = run_plain(algo, task.objectives, task.initial_params(), 1, seed=3).table
    columns = {p: c[:2] for p, c in table.columns.items()}
    path = next(iter(columns))
    assert table.check(columns, 2) is None
    assert "unexpected ['evil']" in table.check({**columns, "evil": torch.zeros(2, 1)}, 2)
    assert f"missing [{path!r}]" in table.check({p: c for p, c in columns.items() if p != path}, 2)
    assert "expected torch.float32" in table.check({**columns, path: columns[path].double()}, 2)
    assert "expected torch.float32" in table.check({**columns, path: columns[path][:1]}, 2)
    assert "is ndarray" in table.check({**columns, path: columns[path].numpy()}, 2)


def test_a_checkpoint_whose_table_does_not_fit_the_run_is_refused():
    spec = specs.normalise({"task": TASK, "algorithm": {"name": "gluon-ef21", "lr": 0.05}, "seed": 3})
    task, algo = specs.build(spec)
    X0 = task.initial_params()
    res = run_plain(algo, task.objectives, X0, 2, seed=3)
    schema = algo.state_schema(task.objectives[0], X0, 3)
    data = res.table.state_dict()
    path = next(p for p in data["columns"] if p.startswith("ef/g/"))
    for columns in ({**data["columns"], path: data["columns"][path][..., :1]},
                    {**data["columns"], "evil": torch.zeros(6, 1)}):
        snap = Snapshot(2, res.server_state, {**data, "columns": columns}, res.history, res.client_log)
        with pytest.raises(ValueError, match="does not fit this run's schema"):
            Federation(algo, X0, 6, 4, seed=3, resume=snap, schema=schema)


# ---------------------------------------------------------------------------- hostile replies through Flower
N, ROUNDS, HOSTILE = 4, 5, 1
SPEC = specs.normalise({"task": {**TASK, "num_clients": N}, "seed": 1, "rounds": ROUNDS,
                        "algorithm": {"name": "gluon-ef21", "lr": 0.05, "compressor": {"name": "topk", "ratio": 0.3}}})


def _state_key(arrays) -> str:
    return next(k for k in arrays if k.startswith("0/s/est/"))  # EF21's tracker is the server's to derive


def _tamper(how: str):
    """What node HOSTILE does to its reply's ``replies`` record every round (one client per node: run 0)."""
    if how == "huge":
        huge = to_array(np.zeros(64 * 2 ** 20, np.float32))  # 256 MB, once per test
    tiny = to_array(np.zeros((1, 1), np.float32))

    def tamper(arrays) -> None:
        key = _state_key(arrays)
        a = np.frombuffer(arrays[key].data, np.float32).reshape(arrays[key].shape).copy()
        if how == "extra_column":
            arrays["0/s/evil"] = tiny
        elif how == "shape":
            arrays[key] = to_array(np.zeros((1, a.shape[1] + 1, *a.shape[2:]), np.float32))
        elif how == "dtype":
            arrays[key] = to_array(a.astype(np.float64))
        elif how == "nan":
            a.reshape(-1)[0] = np.nan
            arrays[key] = to_array(a)
        elif how == "huge":
            arrays["0/s/huge"] = huge
        elif how == "many_arrays":
            for n in range(200_000):
                arrays[f"0/s/leaf{n}"] = tiny
        elif how == "commits":  # forging what the server derives
            arrays["0/s/commits"] = to_array(torch.tensor([5]))
        elif how == "tracker":  # sending the EF21 tracker the server derives itself
            arrays["0/s/ef/g/" + key.split("/", 4)[-1]] = to_array(a)
        else:
            raise AssertionError(how)

    return tamper


def _run(monkeypatch, path, how: str | None):
    """run_inprocess of SPEC with a checkpoint every round, node HOSTILE's replies tampered by ``how``."""
    if how is not None:
        real, tamper = client_app.make_client_app, _tamper(how)

        def make_hostile_app(spec):
            app = real(spec)

            def hostile(msg, context):
                reply = app(msg, context)
                if msg.metadata.message_type == "train" and context.node_config["partition-id"] == HOSTILE:
                    tamper(reply.content["replies"])
                return reply

            return hostile

        monkeypatch.setattr(client_app, "make_client_app", make_hostile_app)
    strategy = run_inprocess(SPEC, checkpointer=Checkpointer(path, every=1))
    monkeypatch.undo()
    return strategy


@pytest.mark.parametrize("how", ["extra_column", "shape", "dtype", "nan", "commits", "tracker", "huge", "many_arrays"])
def test_a_hostile_state_is_rejected_and_the_checkpoint_does_not_grow(how, monkeypatch, tmp_path, caplog):
    """Node HOSTILE returns a bad state every round for 5 rounds (run_inprocess, the real ClientApp with
    its reply tampered): rejected and logged each time, the others accepted, its row never committed,
    and the checkpoint exactly the size of a clean run's."""
    with caplog.at_level(logging.WARNING, logger="fedgluon"):
        strategy = _run(monkeypatch, tmp_path / "hostile.pt", how)
    history, table = strategy.history, strategy.federation.table
    assert [(row["accepted"], row["rejected"], row["failed"]) for row in history] == [(N - 1, 1, 0)] * ROUNDS
    assert table.commits.tolist() == [ROUNDS if j != HOSTILE else 0 for j in range(N)]
    assert all(not c[HOSTILE].any() for c in table.columns.values())  # its row: never written
    logged = [r.getMessage() for r in caplog.records if f"rejected client {HOSTILE}:" in r.getMessage()]
    assert len(logged) == ROUNDS
    assert all({"many_arrays": "arrays", "huge": "bytes"}.get(how, "state: ") in m for m in logged), logged[0]
    rows = [r for r in strategy.client_log if r["client"] == HOSTILE]
    assert [r["status"] for r in rows] == ["rejected"] * ROUNDS

    clean = _run(monkeypatch, tmp_path / "clean.pt", None)
    assert [row["accepted"] for row in clean.history] == [N] * ROUNDS
    assert (tmp_path / "hostile.pt").stat().st_size == (tmp_path / "clean.pt").stat().st_size


def test_a_nan_row_in_a_block_rejects_that_client_and_commits_its_block_mates(monkeypatch, caplog):
    """Blocks of 3 clients per node: a NaN in client 1's row of its node's proposed state rejects client 1
    alone, every round; its block-mates 0 and 2 are committed from the same (read-only) columns."""
    real = client_app.make_client_app

    def make_hostile_app(spec):
        app = real(spec)

        def hostile(msg, context):
            reply = app(msg, context)
            if msg.metadata.message_type == "train" and context.node_config["partition-id"] == 0:
                arrays = reply.content["replies"]
                key = _state_key(arrays)
                a = np.frombuffer(arrays[key].data, np.float32).reshape(arrays[key].shape).copy()
                a[1].reshape(-1)[-1] = np.nan
                arrays[key] = to_array(a)
            return reply

        return hostile

    monkeypatch.setattr(client_app, "make_client_app", make_hostile_app)
    with caplog.at_level(logging.WARNING, logger="fedgluon"):
        strategy = run_inprocess({**SPEC, "task": {**TASK, "num_clients": 6}, "block_size": 3})
    table = strategy.federation.table
    assert [(row["accepted"], row["rejected"]) for row in strategy.history] == [(5, 1)] * ROUNDS
    assert table.commits.tolist() == [ROUNDS, 0, ROUNDS, ROUNDS, ROUNDS, ROUNDS]
    assert all(not c[1].any() and c[[0, 2]].any() and bool(torch.isfinite(c).all()) for c in table.columns.values())
    assert sum("rejected client 1: state: NaN/Inf" in r.getMessage() for r in caplog.records) == ROUNDS
