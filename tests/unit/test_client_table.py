"""The client-state table (fedgluon/clients/table.py): rows of a block as views or copies, commits of
accepted rows only, the model history for X_prev, the schema check, its state_dict; and, through the
plain driver, partial commits of a block (a rejected or failed client keeps its row bitwise while its
block-mates commit)."""

import dataclasses

import pandas as pd
import pytest
import torch
from helpers import client_state, same_table

from fedgluon.clients.state_schema import StateSchema
from fedgluon.clients.table import NEVER, ClientRows, ClientStateTable, flatten, nest
from fedgluon.config import spec as specs
from fedgluon.core.memory import client_state_bytes
from fedgluon.sim.driver import run_plain
from fedgluon.sim.metrics import TIMING_COLUMNS

N = 6
STATE = {"ef": {"g": {"w": torch.zeros(3, 2)}}, "m": {"b": torch.zeros(2, dtype=torch.float16)}, "comp": {}}
MODEL = {"w": torch.zeros(3, 2)}


def table(keep_models: bool = True) -> ClientStateTable:
    """A table of N clients whose row j holds the value j everywhere."""
    t = ClientStateTable(StateSchema.of(STATE), N, keep_models)
    for column in t.columns.values():
        column.copy_(torch.arange(N, dtype=column.dtype).reshape(N, *[1] * (column.dim() - 1)).expand_as(column))
    return t


def proposed(clients: list[int], value: float) -> dict[str, torch.Tensor]:
    """Proposed columns for ``clients``: every entry ``value + row``."""
    t = table()
    return {p: torch.full((len(clients), *c.shape[1:]), 0, dtype=c.dtype)
            + torch.arange(len(clients), dtype=c.dtype).reshape(-1, *[1] * (c.dim() - 1)) + value
            for p, c in t.columns.items()}


def model(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((3, 2), value)}


def commit(t: ClientStateTable, clients, rows, accepted, k, model) -> None:
    """Commit round ``k``'s proposed rows of the ``accepted`` clients, as ``Federation._commit`` does for a block."""
    t.mark(t.write_accepted(clients, rows, set(accepted)), k, model)


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_the_schema_gives_one_column_per_leaf_and_derived_counters():
    t = table()
    assert sorted(t.columns) == ["ef/g/w", "m/b"]  # an empty sub-dict has no column
    assert t.columns["ef/g/w"].shape == (N, 3, 2) and t.columns["m/b"].dtype == torch.float16
    assert t.commits.tolist() == [0] * N and t.seen.tolist() == [NEVER] * N and t.models == {}
    assert t.bytes_per_client == 3 * 2 * 4 + 2 * 2 + 2 * 8
    sizes = client_state_bytes(t)
    assert sizes["mean"] == sizes["max"] == t.bytes_per_client
    assert sizes["total"] == N * (3 * 2 * 4 + 2 * 2) + 2 * N * 8


def test_rows_of_consecutive_clients_are_views_and_others_copies():
    t = table()
    rows = t.rows([2, 3, 4])
    assert rows.clients == [2, 3, 4] and rows.tree["ef"]["g"]["w"].shape == (3, 3, 2)
    assert rows.tree["ef"]["g"]["w"][:, 0, 0].tolist() == [2, 3, 4]
    for path, column in flatten(rows.tree).items():
        assert _storage(column) == _storage(t.columns[path])  # slices of the table's columns
    assert _storage(rows.commits) == _storage(t.commits) and _storage(rows.seen) == _storage(t.seen)
    gathered = t.rows([1, 4])
    assert gathered.tree["m"]["b"].tolist() == [[1, 1], [4, 4]]
    for path, column in flatten(gathered.tree).items():
        assert _storage(column) != _storage(t.columns[path])  # gathered copies
    gathered.tree["ef"]["g"]["w"].add_(100)
    assert t.columns["ef/g/w"][4, 0, 0] == 4  # writing into a copy leaves the table alone
    assert rows.first.tolist() == [True] * 3


def test_rows_carry_only_the_models_their_clients_point_at():
    t = table()
    commit(t, [0, 1], proposed([0, 1], 10), [0, 1], 0, model(0.5))
    commit(t, [1, 2], proposed([1, 2], 20), [1, 2], 1, model(1.5))
    assert t.seen.tolist() == [0, 1, 1, NEVER, NEVER, NEVER]
    assert sorted(t.rows([0, 3]).models) == [0] and sorted(t.rows([1, 2]).models) == [1]
    assert sorted(t.rows([0, 1, 2]).models) == [0, 1] and t.rows([4, 5]).models == {}
    assert torch.equal(t.rows([0]).models[0]["w"], model(0.5)["w"])


def test_commit_writes_only_accepted_rows_and_bumps_their_counters():
    """Clients 1..4 propose rows in round 3; 2 is rejected and 4 failed: their rows, counters and rounds
    seen are bitwise what they were, while 1 and 3 commit."""
    t = table()
    before = {p: c.clone() for p, c in t.columns.items()}
    clients = [1, 2, 3, 4]
    new = proposed(clients, 50)
    commit(t, clients, new, accepted=[1, 3], k=3, model=model(3.0))
    for path, column in t.columns.items():
        for i, j in enumerate(clients):
            assert torch.equal(column[j], new[path][i] if j in (1, 3) else before[path][j]), (path, j)
        for j in (0, 5):
            assert torch.equal(column[j], before[path][j])
    assert t.commits.tolist() == [0, 1, 0, 1, 0, 0]
    assert t.seen.tolist() == [NEVER, 3, NEVER, 3, NEVER, NEVER]
    assert sorted(t.models) == [3] and torch.equal(t.models[3]["w"], model(3.0)["w"])
    commit(t, clients, proposed(clients, 60), accepted=[], k=4, model=model(4.0))  # nobody accepted: no change
    assert t.commits.tolist() == [0, 1, 0, 1, 0, 0] and sorted(t.models) == [3]
    commit(t, [1], proposed([1], 70), accepted=[1], k=5, model=model(5.0))
    assert t.commits.tolist() == [0, 2, 0, 1, 0, 0] and t.seen.tolist()[1] == 5


def test_commit_copies_rows_handed_back_unchanged():
    """A block's step may hand back its input rows (views of the table's columns) as its proposal."""
    t = table()
    rows = t.rows([2, 3])
    commit(t, [2, 3], flatten(rows.tree), [2, 3], 0, model(0.0))
    assert t.columns["ef/g/w"][:, 0, 0].tolist() == list(range(N))
    view = flatten(t.rows([0, 1, 2]).tree)
    commit(t, [3, 4, 5], view, [3, 4, 5], 1, model(1.0))  # rows 0..2 of the same column, into rows 3..5
    assert t.columns["ef/g/w"][:, 0, 0].tolist() == [0, 1, 2, 0, 1, 2]


def test_settle_keeps_models_only_while_a_client_points_at_them():
    t = table()
    commit(t, [0, 1], proposed([0, 1], 1), [0, 1], 0, model(0.0))
    commit(t, [1, 2], proposed([1, 2], 1), [1, 2], 1, model(1.0))
    t.settle()
    assert sorted(t.models) == [0, 1]  # client 0 still points at round 0
    commit(t, [0], proposed([0], 1), [0], 2, model(2.0))
    t.settle()
    assert sorted(t.models) == [1, 2]
    commit(t, [0, 1, 2], proposed([0, 1, 2], 1), [0, 1, 2], 3, model(3.0))
    t.settle()
    assert sorted(t.models) == [3]
    plain = table(keep_models=False)
    commit(plain, [0], proposed([0], 1), [0], 0, model(0.0))
    assert plain.models == {} and plain.seen.tolist()[0] == 0  # no X_prev: no model kept


def test_check_names_what_does_not_fit():
    t = table()
    good = proposed([0, 1], 1)
    assert t.check(good, 2) is None
    assert "unexpected ['x/y'], missing []" in t.check({**good, "x/y": torch.zeros(2)}, 2)
    assert "unexpected [], missing ['m/b']" in t.check({"ef/g/w": good["ef/g/w"]}, 2)
    msg = t.check({**good, "m/b": good["m/b"].float()}, 2)
    assert msg == "state column 'm/b' is torch.float32 (2, 2), expected torch.float16 (2, 2)"
    msg = t.check(good, 3)
    assert msg == "state column 'ef/g/w' is torch.float32 (2, 3, 2), expected torch.float32 (3, 3, 2)"
    assert t.check({**good, "m/b": [1, 2]}, 2) == "state column 'm/b' is list, expected torch.float16 (2, 2)"


def test_state_dict_round_trip():
    t = table()
    commit(t, [1, 2], proposed([1, 2], 9), [1, 2], 0, model(0.25))
    commit(t, [2, 5], proposed([2, 5], 7), [2, 5], 1, model(1.25))
    data = t.state_dict()
    back = ClientStateTable(StateSchema.of(STATE), N, keep_models=True)
    back.load_state_dict(data)
    assert all(torch.equal(back.columns[p], t.columns[p]) for p in t.columns)
    assert torch.equal(back.commits, t.commits) and torch.equal(back.seen, t.seen)
    assert sorted(back.models) == [0, 1] and torch.equal(back.models[1]["w"], model(1.25)["w"])
    back.columns["ef/g/w"].add_(1)  # the loaded table owns its tensors
    back.commits.add_(1)
    assert t.columns["ef/g/w"][0, 0, 0] == 0 and t.commits.tolist() == [0, 1, 2, 0, 0, 1]
    assert client_state(back, 2)["m"]["b"].tolist() == client_state(t, 2)["m"]["b"].tolist()


@pytest.mark.parametrize("edit, message", [
    (lambda d: {**d, "format": 0}, "client-state table format 0, expected 1"),
    (lambda d: [1], "client-state table format None, expected 1"),
    (lambda d: {**d, "columns": {**d["columns"], "x/y": torch.zeros(N)}}, "unexpected ['x/y']"),
    (lambda d: {**d, "columns": {"ef/g/w": d["columns"]["ef/g/w"]}}, "missing ['m/b']"),
    (lambda d: {**d, "columns": {**d["columns"], "m/b": d["columns"]["m/b"].float()}},
     "state column 'm/b' is torch.float32"),
    (lambda d: {**d, "columns": {p: c[:4] for p, c in d["columns"].items()}}, "expected torch.float32 (6, 3, 2)"),
    (lambda d: {**d, "commits": d["commits"].int()}, "'commits' must be int64 (6,)"),
    (lambda d: {**d, "seen": d["seen"][:3]}, "'seen' must be int64 (6,)"),
    (lambda d: {**d, "models": {}}, "lacks the models of rounds [0, 1]"),
])
def test_load_state_dict_refuses_what_does_not_fit_and_changes_nothing(edit, message):
    t = table()
    commit(t, [1, 2], proposed([1, 2], 9), [1, 2], 0, model(0.25))
    commit(t, [5], proposed([5], 7), [5], 1, model(1.25))
    target = table()
    with pytest.raises(ValueError) as err:
        target.load_state_dict(edit(t.state_dict()))
    assert message in str(err.value) and len(str(err.value).splitlines()) == 1
    assert target.commits.tolist() == [0] * N and target.models == {}  # untouched
    assert target.columns["ef/g/w"][:, 0, 0].tolist() == list(range(N))


def test_a_table_without_x_prev_loads_without_models():
    t = table(keep_models=False)
    commit(t, [1], proposed([1], 9), [1], 0, model(0.25))
    back = table(keep_models=False)
    back.load_state_dict(t.state_dict())
    assert back.seen.tolist()[1] == 0 and back.models == {}


def test_nest_flatten_and_fresh_rows():
    tree = {"a": {"b": torch.ones(2), "c": {"d": torch.zeros(1)}}, "e": torch.ones(3)}
    assert nest(flatten(tree)).keys() == tree.keys() and flatten(nest(flatten(tree))).keys() == flatten(tree).keys()
    assert sorted(flatten(tree)) == ["a/b", "a/c/d", "e"]
    fresh = ClientRows.fresh([3, 7])
    assert fresh.tree is None and fresh.first.tolist() == [True, True] and fresh.seen.tolist() == [NEVER, NEVER]
    rows = table().rows([0, 1, 2, 3])
    part = rows.part(slice(1, 3))
    assert part.clients == [1, 2] and part.tree["m"]["b"][:, 0].tolist() == [1, 2]
    sub = rows.select([0, 3])
    assert sub.clients == [0, 3] and sub.tree["m"]["b"][:, 0].tolist() == [0, 3] and rows.select([0, 1, 2, 3]) is rows


# ---------------------------------------------------------------- partial commits through the plain driver
TASK = {"name": "synthetic", "num_clients": 10, "dim": 10, "classes": 4, "hidden": [16], "mean_samples": 30,
        "batch_size": 24}


def _corrupt_client_2_in_rounds_1_and_4(k, j, reply):
    """A NaN in client 2's first payload value in rounds 1 and 4: the server rejects it."""
    import numpy as np

    if j == 2 and k in (1, 4):
        layer = min(reply.message)
        arrays = dict(reply.message[layer].arrays)
        bad = arrays["v.v"].copy()
        bad.flat[0] = np.nan
        arrays["v.v"] = bad
        reply.message = {**reply.message, layer: dataclasses.replace(reply.message[layer], arrays=arrays)}
    return reply


@pytest.mark.parametrize("algorithm", [{"name": "gluon-ef21"},
                                       {"name": "gluon-ef21-mvr", "compressor": {"name": "topk", "ratio": 0.2}},
                                       {"name": "gluon-ef21", "nesterov": True, "state_dtype": "float16"}])
def test_a_rejected_client_keeps_its_row_while_its_block_mates_commit(algorithm):
    """Blocks of 5; client 2's reply is rejected in rounds 1 and 4: after round 1 its row and counters
    are bitwise those after round 0 while clients 0, 1, 3, 4 (same block) committed; with partial
    participation and injected raises too, the tables equal those of one client at a time, and so do
    the state bytes."""
    from fedgluon.sim.faults import FaultPlan

    spec = specs.normalise({"task": TASK, "algorithm": algorithm, "rounds": 6, "block_size": 5})
    task, algo = specs.build_cached(spec)
    X0 = task.initial_params()
    kw = {"seed": 2, "tamper": _corrupt_client_2_in_rounds_1_and_4}
    after = [run_plain(algo, task.objectives, X0, rounds, **kw, block_size=5).table for rounds in (1, 2)]
    for path, column in after[1].columns.items():
        assert torch.equal(column[2], after[0].columns[path][2]), path  # rejected: the old row
        assert not torch.equal(column[[0, 1, 3, 4]], after[0].columns[path][[0, 1, 3, 4]]), path
    assert after[1].commits.tolist()[:5] == [2, 2, 1, 2, 2] and after[1].seen.tolist()[:5] == [1, 1, 0, 1, 1]

    runs = {}
    for name, extra in {"one": {}, "blocks": {"block_size": 5},
                        "partial, one": {"participation": 0.8, "faults": FaultPlan.from_spec({"raise_prob": 0.1})},
                        "partial": {"block_size": 5, "participation": 0.8,
                                    "faults": FaultPlan.from_spec({"raise_prob": 0.1})}}.items():
        runs[name] = run_plain(algo, task.objectives, X0, 6, **kw, **extra)
    assert runs["blocks"].frame()["rejected"].sum() == 2 and runs["partial"].frame()["failed"].sum() > 0

    for a, b in (("one", "blocks"), ("partial, one", "partial")):
        same_table(runs[a].table, runs[b].table)
        assert client_state_bytes(runs[a].table) == client_state_bytes(runs[b].table)
    rejected = sum(1 for r in runs["blocks"].client_log if r["status"] == "rejected")
    assert runs["blocks"].table.commits.sum() == 10 * 6 - rejected


@pytest.mark.parametrize("compressor", [{"name": "topk", "ratio": 0.1}, {"name": "identity"}])
def test_chunked_error_feedback_gives_the_same_run(monkeypatch, compressor):
    """Layers taken a few rows at a time (as large layers are, compressors/error_feedback.py) give the
    same metrics and client-state table as whole blocks."""

    from compressors import error_feedback

    spec = specs.normalise({"task": TASK, "algorithm": {"name": "gluon-ef21", "compressor": compressor},
                            "rounds": 3, "block_size": 5})
    task, algo = specs.build_cached(spec)
    whole = run_plain(algo, task.objectives, task.initial_params(), 3, seed=3, block_size=5)
    monkeypatch.setattr(error_feedback, "CHUNK_BYTES", 200)  # 1-3 rows per chunk of these layers
    chunked = run_plain(algo, task.objectives, task.initial_params(), 3, seed=3, block_size=5)
    cols = [c for c in whole.frame().columns if c not in TIMING_COLUMNS]
    pd.testing.assert_frame_equal(whole.frame()[cols], chunked.frame()[cols], check_exact=True)
    same_table(whole.table, chunked.table)


def test_run_slices_join_a_last_run_of_one():
    from fedgluon.clients.blocks import run_slices

    assert run_slices(5, 2) == [slice(0, 2), slice(2, 5)]
    assert run_slices(6, 2) == [slice(0, 2), slice(2, 4), slice(4, 6)]
    assert run_slices(3, 10) == [slice(0, 3)] and run_slices(1, 4) == [slice(0, 1)] and run_slices(0, 4) == []
    assert run_slices(4, 0) == [slice(0, 1), slice(1, 2), slice(2, 4)]


@pytest.mark.parametrize("name", ["gluon-ef21", "gluon-dasha-mvr", "gluon-ef21-mvr"])
def test_the_server_derives_exactly_the_trackers_its_clients_compute(name):
    """The EF21/DASHA tracker never travels back (``Algorithm.derived``): the server adds each accepted
    client's decoded message to its committed row. Over rounds of partial participation in blocks of 3, with
    one client's payload corrupted (rejected) in round 2, every accepted client's derived row equals, bitwise,
    the tracker its own step computed; the rejected client's row stays as it was."""
    import numpy as np

    spec = specs.normalise({"task": {"name": "synthetic", "num_clients": 7, "dim": 6, "classes": 3, "hidden": [5],
                                     "mean_samples": 20, "batch_size": 8},
                            "algorithm": {"name": name, "lr": 0.05}, "seed": 3})
    task, algo = specs.build(spec)
    prefix = algo.derived[0]
    seen: dict[int, dict[int, dict[str, torch.Tensor]]] = {}  # round -> client -> its own tracker row
    step = algo.client_step

    def recording(rows, bc, objectives):
        result = step(rows, bc, objectives)
        for i, j in enumerate(result.clients):
            seen.setdefault(bc.round, {})[j] = {p: t[i].clone() for p, t in flatten(result.state).items()
                                                if p.startswith(prefix)}
        return result

    def tamper(k, j, reply):
        if k == 2 and j == min(seen[2]):
            layer = sorted(reply.message)[0]
            arrays = dict(reply.message[layer].arrays)
            key = next(a for a in arrays if a.startswith("v."))
            arrays[key] = np.full_like(arrays[key], np.nan)
            reply.message = {**reply.message, layer: dataclasses.replace(reply.message[layer], arrays=arrays)}
        return reply

    algo.client_step = recording
    before = None
    for rounds in (2, 3):
        seen.clear()
        res = run_plain(algo, task.objectives, task.initial_params(), rounds, seed=3, participation=0.6,
                        block_size=3, tamper=tamper)
        if rounds == 2:
            before = {p: c.clone() for p, c in res.table.columns.items() if p.startswith(prefix)}
    last = rounds - 1
    log = [r for r in res.client_log if r["round"] == last]
    accepted = {r["client"] for r in log if r["status"] == "accepted"}
    rejected = {r["client"] for r in log if r["status"] == "rejected"}
    assert accepted and rejected == {min(seen[last])}
    for j in accepted:
        for p, row in seen[last][j].items():
            assert torch.equal(res.table.columns[p][j], row), (j, p)
    for j in rejected:
        assert all(torch.equal(res.table.columns[p][j], before[p][j]) for p in before)
