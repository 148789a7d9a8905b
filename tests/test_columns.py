"""A block's client step on columns (fedgluon/algorithms/columns.py) packs the very bytes the per-client
step does (replies_to_record(client_block(...))), for every algorithm it covers, on the first round and
later ones, with ragged batches, a refresh round and x_prev; anything else declines (None)."""

import pytest
import torch

from fedgluon import spec as specs
from fedgluon.blocks import block_clients
from fedgluon.driver import run_plain
from strategies.records import Unpacker, record_to_columns, replies_to_record, states_to_record, step_to_record

TASK = {"name": "synthetic", "num_clients": 10, "dim": 10, "classes": 4, "hidden": [16], "mean_samples": 30,
        "batch_size": 24}


def build(algorithm: dict):
    spec = specs.normalise({"task": TASK, "algorithm": algorithm, "rounds": 3, "block_size": 5})
    return specs.build_cached(spec)


def both_records(algo, task, states, bc, js):
    per_client = replies_to_record(algo.client_block({j: states.get(j) for j in js}, bc, task.objectives, js))
    columns = record_to_columns(states_to_record({j: states.get(j) for j in js}))
    step = algo.column_block(columns, bc, task.objectives)
    return per_client, (step_to_record(step) if step is not None else None)


def same_record(a, b) -> bool:
    return Unpacker(a).layout == Unpacker(b).layout and a["data"].data == b["data"].data


@pytest.mark.parametrize("algorithm", [
    {"name": "gluon-ef21"},
    {"name": "gluon-ef21", "beta": 0.5, "nesterov": True, "state_dtype": "float16"},
    {"name": "gluon-ef21-mvr", "compressor": {"name": "topk", "ratio": 0.2}},
    {"name": "gluon-ef21-sarah", "refresh_prob": 0.5},
    {"name": "ef21-muon-bidir"},
    {"name": "gluon-ef21", "compressor": {"name": "identity"}},
    {"name": "sgd"},
])
def test_the_column_step_packs_the_per_client_steps_bytes(algorithm):
    task, algo = build(algorithm)
    assert algo.steps_columns()
    X0 = task.initial_params()
    checked = 0
    for rounds in (0, 1, 2, 3):  # states after 0..3 plain rounds: none, then with trackers, momenta and x_prev
        res = run_plain(algo, task.objectives, X0, rounds, seed=4, block_size=5)
        server = res.server_state if rounds else algo.init_server(X0)
        bc = algo.broadcast(server, rounds, 4, TASK["num_clients"])
        if algo.refresh_policy is not None:  # the server's coin: this round refreshes or not (both are tried)
            bc.flags["refresh"] = rounds % 2
        for block in (0, 1):
            js = block_clients(block, TASK["num_clients"], 5)
            per_client, columns = both_records(algo, task, res.client_states, bc, js)
            assert columns is not None and same_record(per_client, columns), (rounds, block)
            checked += 1
    assert checked == 8


@pytest.mark.parametrize("compressor", [{"name": "topk", "ratio": 0.1}, {"name": "identity"}])
def test_chunked_error_feedback_packs_the_same_bytes(monkeypatch, compressor):
    """Layers taken a few rows at a time (as large layers are) give the same record."""
    import compressors.error_feedback as error_feedback

    monkeypatch.setattr(error_feedback, "CHUNK_BYTES", 200)  # 1-3 rows per chunk of these layers
    task, algo = build({"name": "gluon-ef21", "compressor": compressor})
    res = run_plain(algo, task.objectives, task.initial_params(), 2, seed=3, block_size=5)
    bc = algo.broadcast(res.server_state, 2, 3, TASK["num_clients"])
    per_client, columns = both_records(algo, task, res.client_states, bc, block_clients(1, TASK["num_clients"], 5))
    assert columns is not None and same_record(per_client, columns)


def test_blocks_it_does_not_cover_decline():
    task, algo = build({"name": "gluon-ef21"})
    res = run_plain(algo, task.objectives, task.initial_params(), 2, seed=1, block_size=5)
    bc = algo.broadcast(res.server_state, 2, 1, TASK["num_clients"])
    js = block_clients(0, TASK["num_clients"], 5)
    mixed = {**{j: res.client_states[j] for j in js}, js[0]: None}  # one client without a state: two groups
    assert record_to_columns(states_to_record(mixed)) is None
    columns = record_to_columns(states_to_record({j: res.client_states[j] for j in js[:1]}))
    assert algo.column_block(columns, bc, task.objectives) is None  # one client: the per-client path
    nan = {j: res.client_states[j] for j in js}
    nan[js[1]] = {**nan[js[1]], "ef": {"g": {n: torch.full_like(t, float("nan")) for n, t in nan[js[1]]["ef"]["g"].items()}}}
    assert algo.column_block(record_to_columns(states_to_record(nan)), bc, task.objectives) is None
    for other in ({"name": "gluon"}, {"name": "local-gluon"}, {"name": "limuon"}, {"name": "gluon-marina"},
                  {"name": "gluon-ef21", "tracker": "fixed16"}, {"name": "gluon-ef21", "error_feedback": "ef14"},
                  {"name": "gluon-ef21", "compressor": {"name": "randk_seeded", "ratio": 0.1}}):
        _, declined = build(other)
        assert not declined.steps_columns(), other
        assert declined.column_block(columns, bc, task.objectives) is None


# ---------------------------------------------------------------- the plain driver on held columns
def _states_equal(a: dict, b: dict) -> None:
    from torch.utils._pytree import tree_flatten

    assert sorted(a) == sorted(b)
    for j in a:
        flat_a, spec_a = tree_flatten(a[j])
        flat_b, spec_b = tree_flatten(b[j])
        assert spec_a == spec_b, j
        assert all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(flat_a, flat_b)), j


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _corrupt_client_2_in_rounds_1_and_4(k, j, reply):
    """A NaN in client 2's first payload value in rounds 1 and 4: the server rejects it."""
    import numpy as np

    if j == 2 and k in (1, 4):
        layer = sorted(reply.message)[0]
        arrays = dict(reply.message[layer].arrays)
        bad = arrays["v.v"].copy()
        bad.flat[0] = np.nan
        arrays["v.v"] = bad
        reply.message[layer].arrays = arrays
    return reply


@pytest.mark.parametrize("algorithm", [{"name": "gluon-ef21"}, {"name": "gluon-ef21-mvr", "compressor": {"name": "topk", "ratio": 0.2}},
                                       {"name": "gluon-ef21-sarah", "refresh_prob": 0.4},
                                       {"name": "gluon-ef21", "nesterov": True, "state_dtype": "float16"}])
def test_plain_driver_on_held_columns_equals_client_by_client(algorithm):
    """run_plain steps blocks on the columns their last step made (fedgluon/held_columns.py): the same
    rows, bits and states as client_block and as one client at a time, with partial participation, an
    injected raise, and rejected replies (a block only partly committed is copied out of its columns)."""
    from fedgluon.faults import FaultPlan
    from fedgluon.memory import client_state_bytes, nbytes
    from tests.test_blocks import _frames_match

    task, algo = build(algorithm)
    X0 = task.initial_params()
    kw = {"seed": 2, "evaluate": lambda X, k: task.evaluate(X), "tamper": _corrupt_client_2_in_rounds_1_and_4}
    runs = {}
    for name, extra in {"one": {}, "blocks": {"block_size": 5, "columns": False}, "columns": {"block_size": 5},
                        "partial": {"block_size": 5, "participation": 0.8, "faults": FaultPlan.from_spec({"raise_prob": 0.1})},
                        "partial, blocks": {"block_size": 5, "participation": 0.8, "columns": False,
                                            "faults": FaultPlan.from_spec({"raise_prob": 0.1})},
                        "partial, one": {"participation": 0.8, "faults": FaultPlan.from_spec({"raise_prob": 0.1})}}.items():
        runs[name] = run_plain(algo, task.objectives, X0, 6, **kw, **extra)
    assert runs["columns"].frame()["rejected"].sum() == 2 and runs["partial"].frame()["failed"].sum() > 0
    for a, b in (("one", "blocks"), ("one", "columns"), ("partial, one", "partial"), ("partial, blocks", "partial")):
        _frames_match(runs[a].frame(), runs[b].frame())
        _states_equal(runs[a].client_states, runs[b].client_states)
        assert client_state_bytes(runs[a].client_states) == client_state_bytes(runs[b].client_states)
    # the columns run did step on columns: each block's trackers are rows of one buffer (client_block's are not)
    layer = sorted(X0)[0]
    for name, shared in (("columns", True), ("blocks", False)):
        states = runs[name].client_states
        ptrs = {_storage(states[j]["ef"]["g"][layer]) for j in range(5)}
        assert (len(ptrs) == 1) == shared, name
    # and no committed state keeps a partly committed buffer alive: every storage is spanned whole
    for name in ("columns", "partial"):
        states = runs[name].client_states
        for t in (t for s in states.values() for t in torch.utils._pytree.tree_leaves(s) if isinstance(t, torch.Tensor)):
            holders = [s for s in states.values() if any(_storage(u) == _storage(t) for u in torch.utils._pytree.tree_leaves(s)
                                                         if isinstance(u, torch.Tensor))]
            assert nbytes(holders) >= t.untyped_storage().nbytes(), name


def test_stacked_columns_inverts_column_rows_and_declines_mixed_layouts():
    from fedgluon.algorithms.columns import Shared, column_rows, stacked_columns

    model = {"w": torch.randn(3, 2)}
    trees = [{"ef": {"g": {"w": torch.randn(3, 2)}}, "comp": {}, "commits": torch.tensor(i), "x_prev": dict(model)}
             for i in range(4)]
    tree = stacked_columns(trees)
    assert tree["ef"]["g"]["w"].shape == (4, 3, 2) and tree["commits"].tolist() == [0, 1, 2, 3]
    assert isinstance(tree["x_prev"]["w"], Shared) and tree["x_prev"]["w"].tensor is model["w"]  # held by all: once
    back = column_rows(tree, 4)
    for a, b in zip(trees, back):
        assert torch.equal(a["ef"]["g"]["w"], b["ef"]["g"]["w"]) and a["commits"] == b["commits"] and b["comp"] == {}
        assert b["x_prev"]["w"] is model["w"]
    assert stacked_columns([trees[0], {**trees[1], "extra": torch.zeros(1)}]) is None  # other keys
    assert stacked_columns([trees[0], {**trees[1], "commits": torch.zeros(2)}]) is None  # another shape
    assert stacked_columns([trees[0], {**trees[1], "comp": torch.zeros(1)}]) is None  # a leaf for a sub-dict
    assert stacked_columns([trees[0], None]) is None


@pytest.mark.parametrize("algorithm", [{"name": "gluon-ef21"}, {"name": "gluon-ef21-mvr", "compressor": {"name": "topk", "ratio": 0.2}},
                                       {"name": "gluon-ef21-sarah", "refresh_prob": 0.5}])
def test_a_node_steps_its_columns_in_runs_and_packs_the_same_bytes(algorithm, monkeypatch):
    """A node steps a block's columns in runs of Algorithm.run_length clients (Algorithm.column_runs, as
    client_block steps a block) and packs the runs' steps into the record the per-client step makes."""
    from fedgluon.algorithms.base import Algorithm

    task, algo = build(algorithm)
    X0 = task.initial_params()
    res = run_plain(algo, task.objectives, X0, 2, seed=4, block_size=5)
    bc = algo.broadcast(res.server_state, 2, 4, TASK["num_clients"])
    grad_bytes = sum(t.numel() * t.element_size() for t in X0.values()) * (2 if algo.needs_previous else 1)
    monkeypatch.setattr(Algorithm, "RUN_BYTES", 2 * grad_bytes)  # runs of 2: 5 clients step as 2 + 3
    js = block_clients(1, TASK["num_clients"], 5)
    columns = record_to_columns(states_to_record({j: res.client_states[j] for j in js}))
    steps = algo.column_runs(columns, bc, task.objectives)
    assert steps is not None and [s.clients for s in steps] == [js[:2], js[2:]]
    per_client = replies_to_record(algo.client_block({j: res.client_states[j] for j in js}, bc, task.objectives, js))
    assert same_record(per_client, step_to_record(steps))


def test_run_slices_join_a_last_run_of_one():
    from fedgluon.blocks import run_slices

    assert run_slices(5, 2) == [slice(0, 2), slice(2, 5)]
    assert run_slices(6, 2) == [slice(0, 2), slice(2, 4), slice(4, 6)]
    assert run_slices(3, 10) == [slice(0, 3)] and run_slices(1, 4) == [slice(0, 1)] and run_slices(0, 4) == []
    assert run_slices(4, 0) == [slice(0, 1), slice(1, 2), slice(2, 4)]
