"""The client-state schema (fedgluon/state_schema.py).

Every algorithm's states, over rounds with partial participation, fit the schema its first step fixes;
a state that does not fit (an extra leaf, another shape or dtype, NaN, a 256 MB array, 200,000 leaves,
a forged commit count or model) is rejected for that client, logged, and never committed: the other
clients go on, and the checkpoint does not grow."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity
from packed_edit import PackedEdit

from fedgluon import spec as specs
from fedgluon.checkpoint import Checkpointer, Snapshot
from fedgluon.client_app import make_client_app
from fedgluon.driver import run_plain
from fedgluon.engines import InProcessGrid
from fedgluon.federation import Federation
from fedgluon.state_schema import StateSchema
from strategies.strategy import GluonStrategy

TASK = {"name": "synthetic", "num_clients": 6, "dim": 6, "classes": 3, "hidden": [5], "mean_samples": 20,
        "batch_size": 8}
ALGORITHMS = [
    {"name": "gluon"}, {"name": "gluon", "nesterov": True, "state_dtype": "bfloat16"}, {"name": "gluon-mvr"},
    {"name": "gluon-mvr", "variant": "muon_mvr1"}, {"name": "gluon-mvr", "variant": "muon_mvr2"},
    {"name": "gluon-sarah", "refresh_prob": 0.5}, {"name": "limuon", "rank": 1}, {"name": "gluon-marina"},
    {"name": "gluon-dasha-mvr"}, {"name": "gluon-ef21"}, {"name": "gluon-ef21", "tracker": "fixed16"},
    {"name": "gluon-ef21", "error_feedback": "ef14", "compressor": {"name": "powersgd", "rank": 1}},
    {"name": "gluon-ef21-sarah", "compressor": {"name": "randk_seeded", "ratio": 0.3}},
    {"name": "gluon-ef21-mvr"}, {"name": "ef21-muon-bidir"},
    {"name": "fedavg", "compressor": {"name": "topk", "ratio": 0.3}, "error_feedback": "ef14"},
    {"name": "local-gluon", "local_steps": 2}, {"name": "sgd"}, {"name": "adamw"},
]


@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=lambda a: "-".join(str(v) for v in a.values()))
def test_every_algorithm_keeps_the_state_layout_its_first_step_fixes(algorithm):
    spec = specs.normalise({"task": TASK, "algorithm": {"lr": 0.05, **algorithm}, "seed": 3})
    task, algo = specs.build(spec)
    X0 = task.initial_params()
    schema = algo.state_schema(task.objectives[0], X0, 3)
    assert schema.leaves and "commits" in schema.leaves
    res = run_plain(algo, task.objectives, X0, 4, seed=3, participation=0.5, block_size=3)
    assert sum(row["rejected"] for row in res.history) == 0
    held = [s for s in res.client_states.values() if s is not None]
    assert held and all(schema.mismatch(s) is None for s in held)


def test_mismatch_names_what_is_wrong():
    state = {"est": {"m": {"w": torch.zeros(2, 3)}}, "comp": {}, "commits": torch.tensor(1)}
    schema = StateSchema.of(state)
    assert set(schema.leaves) == {"est/m/w", "comp/", "commits"}
    assert schema.nbytes == 6 * 4 + 8
    assert schema.mismatch(state) is None
    assert "unexpected state leaf 'evil'" in schema.mismatch({**state, "evil": torch.zeros(1)})
    assert "lacks the leaves ['commits']" in schema.mismatch({k: v for k, v in state.items() if k != "commits"})
    assert "expected float32 (2, 3)" in schema.mismatch({**state, "est": {"m": {"w": torch.zeros(3, 2)}}})
    assert "float64 (2, 3)" in schema.mismatch({**state, "est": {"m": {"w": torch.zeros(2, 3, dtype=torch.float64)}}})
    assert "unexpected state leaf 'comp/q'" in schema.mismatch({**state, "comp": {"q": torch.zeros(1)}})
    assert "'commits' must be a tensor, got int" in schema.mismatch({**state, "commits": 3})
    assert "must be a mapping" in schema.mismatch([1])
    nan = {**state, "est": {"m": {"w": torch.full((2, 3), float("nan"))}}}
    assert schema.mismatch(nan) is None  # the layout only: NaN is caught where states arrive (the hostile test)
    many = {**state, "junk": {str(i): torch.zeros(()) for i in range(200_000)}}
    assert "unexpected state leaf 'junk/0'" in schema.mismatch(many)


def test_a_checkpoint_whose_states_do_not_fit_the_run_is_refused():
    spec = specs.normalise({"task": TASK, "algorithm": {"name": "gluon-ef21", "lr": 0.05}, "seed": 3})
    task, algo = specs.build(spec)
    X0 = task.initial_params()
    res = run_plain(algo, task.objectives, X0, 2, seed=3)
    states = dict(res.client_states)
    states[4] = {**states[4], "ef": {"g": {n: t[..., :1] for n, t in states[4]["ef"]["g"].items()}}}
    snap = Snapshot(2, res.server_state, states, res.history, res.client_log)
    with pytest.raises(ValueError, match="client 4's state does not fit"):
        Federation(algo, X0, 6, 4, seed=3, resume=snap, schema=algo.state_schema(task.objectives[0], X0, 3))


def _tamper_state(state, how):
    """A hostile client's proposed state (plain driver: the reply stays valid, only the state is bad)."""
    if how == "commits":
        return {**state, "commits": state["commits"] + 5}
    if how == "x_prev":
        return {**state, "x_prev": {n: t + 1 for n, t in state["x_prev"].items()}}
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["commits", "x_prev"])
def test_a_state_that_forges_what_the_server_derives_is_rejected(how, caplog):
    """``commits`` and ``x_prev`` are the server's to know: a state claiming other values is rejected."""
    from fedgluon import driver

    spec = specs.normalise({"task": TASK, "algorithm": {"name": "gluon-ef21-sarah", "lr": 0.05}, "seed": 3})
    task, algo = specs.build(spec)
    original = driver._step_blocks

    def step_blocks(*args, **kwargs):
        out = original(*args, **kwargs)
        state, reply = out[2]
        out[2] = (_tamper_state(state, how), reply)
        return out

    with caplog.at_level(logging.WARNING, logger="fedgluon"):
        driver._step_blocks = step_blocks
        try:
            res = run_plain(algo, task.objectives, task.initial_params(), 3, seed=3)
        finally:
            driver._step_blocks = original
    assert [row["rejected"] for row in res.history] == [1, 1, 1]
    assert res.client_states[2] is None  # never committed
    assert sum("rejected client 2: state:" in r.getMessage() for r in caplog.records) == 3


# ---------------------------------------------------------------------------- through Flower records
N = 4
SPEC = specs.normalise({"task": {**TASK, "num_clients": N}, "seed": 1, "rounds": 1000,
                        "algorithm": {"name": "gluon-ef21", "lr": 0.05, "compressor": {"name": "topk", "ratio": 0.3}}})


def _world():
    task, algo = specs.build(SPEC)
    X0 = task.initial_params()
    grid = InProcessGrid(make_client_app(SPEC), N, seed=1)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, grid.run.run_id, SUPERLINK_NODE_ID
    strategy = GluonStrategy(algo, X0, N, seed=1, rounds=SPEC["rounds"],
                             schema=algo.state_schema(task.objectives[0], X0, 1))
    strategy.connect(grid, timeout=10)
    return grid, strategy


def _corrupt_state(reply, j: int, how: str) -> None:
    """Rewrite client j's proposed state in its node's packed reply (one client per node)."""
    edit = PackedEdit(reply.content)
    group, _ = edit.group(j, "states")
    leaves = group["leaves"]
    i, (path, ref, _) = next((i, e) for i, e in enumerate(leaves) if e[0].startswith("ef/g/"))
    a = edit.array(ref)
    if how == "extra_leaf":
        leaves.append(["evil", edit.append(np.zeros((1, 3), np.float32)), False])
    elif how == "shape":
        leaves[i] = [path, edit.append(np.zeros((1, a.shape[1] + 1, *a.shape[2:]), np.float32)), False]
    elif how == "dtype":
        leaves[i] = [path, edit.append(a.astype(np.float64)), False]
    elif how == "nan":
        a.reshape(-1)[0] = np.nan
        leaves[i] = [path, edit.append(a), False]
    elif how == "huge":  # a 256 MB leaf beside the valid ones
        leaves.append(["huge", edit.append(np.zeros((1, 64 * 2 ** 20), np.float32)), False])
    elif how == "many_leaves":
        ref0 = edit.append(np.zeros((1,), np.float32))
        leaves.extend([f"leaf{n}", ref0, False] for n in range(200_000))
    else:
        raise AssertionError(how)
    edit.save()


def _rounds(grid, strategy, rounds: int, how: str | None) -> list[dict]:
    for _ in range(rounds):
        messages = list(strategy.configure_train(1, None, None, grid))
        replies = list(grid.send_and_receive(messages))
        for reply in replies:
            j = strategy.partition_of[reply.metadata.src_node_id]
            if how is not None and j == 1:
                _corrupt_state(reply, j, how)
        strategy.aggregate_train(1, replies)
    return strategy.history


@pytest.mark.parametrize("how", ["extra_leaf", "shape", "dtype", "nan", pytest.param("huge", marks=pytest.mark.slow),
                                 pytest.param("many_leaves", marks=pytest.mark.slow)])
def test_a_hostile_state_is_rejected_and_the_run_goes_on(how, tmp_path, caplog):
    """Client 1 returns a bad state every round for 5 rounds: rejected and logged each time, before its
    bytes are read; the others are accepted, client 1 stays at its (empty) state, and the checkpoint is
    the size of a run in which client 1 merely failed."""
    grid, strategy = _world()
    with caplog.at_level(logging.WARNING, logger="fedgluon"):
        history = _rounds(grid, strategy, 5, how)
    assert [row["rejected"] for row in history] == [1] * 5
    assert [row["accepted"] for row in history] == [N - 1] * 5
    assert strategy.client_states[1] is None
    assert all(strategy.client_states[j] is not None for j in (0, 2, 3))
    assert sum("rejected client 1" in r.getMessage() and "state" in r.getMessage() for r in caplog.records) == 5
    hostile = Checkpointer(tmp_path / "hostile", every=1).save(strategy.federation.snapshot())

    grid, clean = _world()
    original = clean.aggregate_train

    def without_client_1(server_round, replies):
        return original(server_round, [r for r in replies if clean.partition_of[r.metadata.src_node_id] != 1])

    clean.aggregate_train = without_client_1
    _rounds(grid, clean, 5, None)
    reference = Checkpointer(tmp_path / "clean", every=1).save(clean.federation.snapshot())
    assert abs(hostile.stat().st_size - reference.stat().st_size) < 2048  # the rows' reason strings differ
