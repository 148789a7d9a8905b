"""Hostile replies through the real strategy: hypothesis corrupts the Flower records of genuine client replies
(fedgluon/flower/wire.py: the ``replies`` ArrayRecord and the ``meta`` ConfigRecord) — missing/extra arrays, NaN/Inf,
finite values beyond the server's bound, wrong lengths, dtypes, shapes, codecs, headers and groups,
out-of-range or duplicate indices, wrong round or client ids, missing records or entries, pickled objects,
garbage bytes, malformed state columns; for the Gluon-EF21 payload and four of other groups' methods (MuLoCo,
DiLoCo, FedMuon-BC, FedMuon). No exception escapes, nothing is unpickled, and after every round the
server state equals the state computed from the valid replies alone; corrupted clients' rows of the
client-state table are left as they were, and the other clients proceed."""

import copy
import dataclasses
import io

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import given, settings
from hypothesis import strategies as st

from fedgluon.config import spec as specs
from fedgluon.flower.client_app import make_client_app
from fedgluon.flower.engines import InProcessGrid
from fedgluon.flower.wire import (
    RAW,
    WireError,
    _view,
    read_replies,
    record_to_tensors,
    tensors_to_record,
    to_array,
)
from strategies.strategy import GluonStrategy

N = 4
SPEC = specs.normalise({"task": {"name": "synthetic", "num_clients": N, "dim": 6, "classes": 3, "hidden": [4]},
                        "algorithm": {"name": "gluon-ef21", "lr": 0.05, "compressor": {"name": "topk", "ratio": 0.3}},
                        "rounds": 100_000, "seed": 1})
UNPICKLED: list[int] = []


def test_the_pickle_attack_is_real():
    """The object array used below does run code when loaded with pickling allowed."""
    buf = io.BytesIO()
    np.save(buf, np.array([Evil()], dtype=object), allow_pickle=True)
    np.load(io.BytesIO(buf.getvalue()), allow_pickle=True)
    assert UNPICKLED == [1]
    UNPICKLED.clear()


def _pwned():
    UNPICKLED.append(1)
    return np.zeros(1)


class Evil:
    def __reduce__(self):
        return (_pwned, ())


MUTATIONS = ["drop_array", "extra_array", "orphan_layer", "nan", "huge", "length", "index_range", "dup_index",
             "dtype", "codec", "shape", "round", "partition", "no_payload", "no_metrics", "no_header", "pickle",
             "garbage", "dims", "group", "group_rows", "bad_state", "bad_layout", "no_records"]


INDEXED = ("index_range", "dup_index")
ALGORITHMS = {  # top-k with indices (Gluon-EF21); int2 codes and scales, local steps and an error-feedback
    # column (MuLoCo); dense pseudo-gradients with inner Adam state and an integer step counter (DiLoCo); dense
    # updates and control variates, two kinds of layers in one payload (FedMuon-BC); momenta (FedMuon)
    "gluon-ef21": (SPEC["algorithm"], 150, ()),
    "muloco": ({"name": "muloco"}, 50, INDEXED),
    "diloco": ({"name": "diloco"}, 40, INDEXED),
    "fedmuon-bc": ({"name": "fedmuon-bc"}, 40, INDEXED),
    "fedmuon": ({"name": "fedmuon"}, 30, (*INDEXED, "bad_state")),  # its replies carry no state columns
}
"""name → (algorithm section, hypothesis examples, the mutations that do not apply: no indices, no state)."""


@pytest.fixture(scope="module", params=sorted(ALGORITHMS))
def world(request):
    spec = specs.normalise({**SPEC, "algorithm": ALGORITHMS[request.param][0]})
    task, algo = specs.build(spec)
    grid = InProcessGrid(make_client_app(spec), N, seed=1)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, grid.run.run_id, SUPERLINK_NODE_ID
    strategy = GluonStrategy(algo, task.initial_params(), N, seed=1, rounds=spec["rounds"],
                             schema=algo.state_schema(task.objectives[0], task.initial_params(), 1))
    strategy.connect(grid, timeout=10)
    return grid, strategy, algo, ALGORITHMS[request.param][1:]


def value_array(meta, key: str) -> str:
    """The payload array of a layer that holds float values: ``v.v`` (sparse or dense values) or a quantised
    codec's scales (its codes are unsigned integers)."""
    return next(n for n in meta[f"{key}/arrays"] if n == "v.v" or n.endswith("scale"))


def _values(arr: Array) -> np.ndarray:
    return _view(arr).copy()


def corrupt(reply, how: str, data: st.DataObject, k: int) -> None:
    """Corrupt a node's reply (one client per node here: run 0 of the records is that client's)."""
    content = reply.content
    if how == "no_records":
        del content[data.draw(st.sampled_from(["replies", "meta"]), label="record")]
        return
    arrays, meta = content["replies"], content["meta"]
    group = meta["0/groups"][0]
    layers = meta[f"0/p/{group}/layers"]
    layer = data.draw(st.sampled_from(sorted(layers)), label="layer")
    key = f"0/p/{group}/{layer}"
    values = f"{key}/{value_array(meta, key)}"
    v = _values(arrays[values])  # (1, kept values), or (1, scales) of a quantised codec
    if how == "drop_array":
        name = data.draw(st.sampled_from(meta[f"{key}/arrays"]), label="dropped")
        del arrays[f"{key}/{name}"]
        if data.draw(st.booleans(), label="from the header too"):
            meta[f"{key}/arrays"] = [n for n in meta[f"{key}/arrays"] if n != name]
    elif how == "extra_array":
        arrays[f"{key}/zzz"] = to_array(np.zeros((1, 3), np.float32))
        meta[f"{key}/arrays"] = [*meta[f"{key}/arrays"], "zzz"]
    elif how == "orphan_layer":
        orphan = f"0/p/{group}/not.a.layer"
        meta[f"0/p/{group}/layers"] = [*layers, "not.a.layer"]
        meta.update({f"{orphan}/codec": "topk/fp32", f"{orphan}/shape": [3], f"{orphan}/arrays": ["v.v"],
                     f"{orphan}/meta": []})
        arrays[f"{orphan}/v.v"] = to_array(np.zeros((1, 3), np.float32))
    elif how == "nan":
        v[0, data.draw(st.integers(0, v.shape[1] - 1))] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        arrays[values] = to_array(v)
    elif how == "huge":  # finite, valid, and far beyond the server's bound float32 max / (2n)
        v[0, data.draw(st.integers(0, v.shape[1] - 1))] = data.draw(st.sampled_from([1, -1])) * np.finfo(np.float32).max
        arrays[values] = to_array(v)
    elif how == "length":
        arrays[values] = to_array(v[:, :-1] if data.draw(st.booleans()) else np.append(v, [[1]], axis=1))
    elif how == "index_range":
        idx = _values(arrays[f"{key}/idx"])
        idx[0, data.draw(st.integers(0, idx.shape[1] - 1))] = np.iinfo(idx.dtype).max
        arrays[f"{key}/idx"] = to_array(idx)
    elif how == "dup_index":
        key = f"0/p/{group}/body.0.weight"
        idx = _values(arrays[f"{key}/idx"])
        idx[0, 1] = idx[0, 0]
        arrays[f"{key}/idx"] = to_array(idx)
    elif how == "dtype":
        arrays[values] = to_array(v.astype(data.draw(st.sampled_from([np.float64, np.float16, np.int32,
                                                                             np.uint8]))))
    elif how == "codec":
        codec = meta[f"{key}/codec"]
        meta[f"{key}/codec"] = data.draw(st.one_of(st.text(max_size=12).filter(lambda c: c != codec),
                                                   st.integers(), st.binary(max_size=4)), label="codec")
    elif how == "shape":
        shape = meta[f"{key}/shape"]
        meta[f"{key}/shape"] = data.draw(st.sampled_from([[*shape[:-1], shape[-1] + 1], [*shape[:-1], shape[-1] - 1],
                                                          [*shape, 1], shape[:-1], [-1, *shape], [2 ** 41]]))
    elif how == "round":
        meta["0/round"] = k + data.draw(st.sampled_from([-1, 1, 1000]))
    elif how == "partition":
        meta["0/clients"] = [(meta["0/clients"][0] + 1) % N]
    elif how == "no_payload":
        meta["0/groups"] = []
    elif how == "no_metrics":
        del meta[data.draw(st.sampled_from(["runs", "0/clients", "0/round", "0/loss", "0/grad_evals", "0/samples",
                                            "0/failed", "0/why", "0/groups"]), label="metric")]
    elif how == "no_header":
        del meta[f"{key}/{data.draw(st.sampled_from(['codec', 'shape', 'arrays', 'meta']), label='header')}"]
    elif how == "pickle":
        buf = io.BytesIO()  # a .npy file whose object array is a pickle that would call _pwned
        np.save(buf, np.array([Evil()], dtype=object), allow_pickle=True)
        payload = buf.getvalue()
        arrays[values] = data.draw(st.sampled_from([
            Array(dtype="object", shape=(1, 1), stype=RAW, data=payload),
            Array(dtype="O", shape=(1, 1), stype="numpy.ndarray", data=payload),
            Array(dtype="float32", shape=(1, len(payload)), stype=RAW, data=payload)]), label="pickle")
    elif how == "dims":  # a payload array of another rank: extra axes, more than NumPy holds, or empty and vast
        name = data.draw(st.sampled_from(meta[f"{key}/arrays"]), label="array")
        a = _values(arrays[f"{key}/{name}"])
        extra = data.draw(st.sampled_from([(1,), (1,) * 40, (1,) * 98, (0,), (0, 2 ** 31 - 1, 2 ** 31 - 1)]))
        arrays[f"{key}/{name}"] = Array(dtype=a.dtype.name, shape=(*a.shape, *extra), stype=RAW,
                                        data=a.tobytes() if 0 not in extra else b"")
    elif how == "garbage":  # bytes that do not fit the header
        n = data.draw(st.sampled_from([0, 1, v.nbytes - 1, v.nbytes + 4]), label="bytes")
        arrays[values] = Array(dtype="float32", shape=tuple(v.shape), stype=RAW, data=bytes(n))
    elif how == "group":  # a group the server does not expect, or does not know
        other = data.draw(st.sampled_from(["dense", "sideways", ""]), label="group")
        meta["0/groups"] = [other]
        for name in [n for n in meta if n.startswith(f"0/p/{group}/")]:
            meta[name.replace(f"0/p/{group}/", f"0/p/{other}/", 1)] = meta[name]
        for name in [n for n in arrays if n.startswith(f"0/p/{group}/")]:
            arrays[name.replace(f"0/p/{group}/", f"0/p/{other}/", 1)] = arrays[name]
    elif how == "group_rows":
        meta[f"0/p/{group}/rows"] = data.draw(st.sampled_from([[1], [-1], [], [0, 0], ["0"]]), label="rows")
    elif how == "bad_state":  # the proposed state must never be committed when it is malformed
        path = data.draw(st.sampled_from(sorted(k for k in arrays if k.startswith("0/s/"))), label="column")
        column = _values(arrays[path])
        kinds = ["shape", "dtype", "missing", "extra", "bytes", "deeper"]
        bad = data.draw(st.sampled_from(["nan", *kinds] if column.dtype.kind == "f" else kinds), label="bad")
        if bad == "nan":
            column.reshape(-1)[data.draw(st.integers(0, column.size - 1))] = np.nan
            arrays[path] = to_array(column)
        elif bad == "shape":
            arrays[path] = to_array(column.reshape(-1)[:-1])
        elif bad == "dtype":
            arrays[path] = to_array(column.astype(np.float16))
        elif bad == "missing":
            del arrays[path]
        elif bad == "extra":
            arrays["0/s/evil"] = to_array(column)
        elif bad == "bytes":
            arrays[path] = Array(dtype="float32", shape=tuple(column.shape), stype=RAW, data=bytes(3))
        else:
            arrays[f"{path}/deeper"] = to_array(column)
    elif how == "bad_layout":
        name, value = data.draw(st.sampled_from([("runs", 2), ("runs", -1), ("runs", "1"), ("runs", 1.0),
                                                 ("0/clients", []), ("0/clients", [0, 0]), ("0/clients", [N]),
                                                 ("0/loss", [0.5, 0.5]), ("0/loss", ["x"]), ("0/samples", [-1]),
                                                 ("0/grad_evals", [True]), ("0/failed", [3]), ("0/why", ["a", "b"])]),
                                label="layout")
        meta[name] = value
    else:
        raise AssertionError(how)


def tree_equal(a, b) -> bool:
    if a is None or b is None:
        return a is b
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(tree_equal(a[k], b[k]) for k in a)
    return torch.equal(a, b)


def test_hostile_replies_never_touch_server_state(world):
    grid, strategy, algo, (examples, absent) = world
    mutations = [m for m in MUTATIONS if m not in absent]

    @settings(max_examples=examples, deadline=None)
    @given(data=st.data(), plan=st.lists(st.sampled_from([None, *mutations]), min_size=N, max_size=N))
    def one_round(data, plan):
        table = strategy.federation.table
        before_server = copy.deepcopy(strategy.server_state)
        before_rows = {p: c.clone() for p, c in table.columns.items()}
        before_commits = table.commits.clone()
        messages = list(strategy.configure_train(1, None, None, grid))
        replies = list(grid.send_and_receive(messages))
        bc = strategy._round.broadcast
        valid = {}
        for reply in replies:
            j = strategy.partition_of[reply.metadata.src_node_id]  # one client per node here
            if plan[j] is None:
                records = reply.content
                got = read_replies(records["replies"], records["meta"], [j], bc.round, table, algo.reply_shapes(bc),
                                   algo.derived)
                assert got.rejected == {} and got.failed == {}
                valid[j] = got.replies[j]
            else:
                corrupt(reply, plan[j], data, bc.round)
        first = {j for j in valid if before_commits[j] == 0}
        strategy.aggregate_train(1, replies)  # must not raise

        weights = strategy.federation.weights
        expected, outcome = algo.server_step(copy.deepcopy(before_server), valid, bc, weights, first)
        assert sorted(outcome.accepted) == sorted(valid)
        for key in ("X", "G"):
            assert tree_equal(strategy.server_state.get(key), expected.get(key)), key
        row = strategy.history[-1]
        assert row["accepted"] == len(valid) and row["rejected"] + row["failed"] == N - len(valid)
        bad = [j for j in range(N) if plan[j] is not None]
        assert table.commits[bad].tolist() == before_commits[bad].tolist()
        assert table.commits[sorted(valid)].tolist() == (before_commits[sorted(valid)] + 1).tolist()
        assert all(torch.equal(c[bad], before_rows[p][bad]) for p, c in table.columns.items())
        assert not UNPICKLED

    one_round()


def test_raw_arrays_round_trip_and_reject_anything_else():
    """Records carry raw little-endian bytes of an allowed dtype; other stypes, dtypes and byte counts
    are refused with a WireError, before any value is read."""
    tensors = {"m": torch.randn(3, 4).to(torch.bfloat16), "q": torch.arange(6, dtype=torch.int16),
               "x": torch.randn(5, dtype=torch.float64), "n": torch.tensor(3), "flag": torch.tensor([True, False]),
               "e": torch.ones(2, 0)}
    back = record_to_tensors(tensors_to_record(tensors))
    assert tree_equal(tensors, back) and all(back[k].dtype == t.dtype for k, t in tensors.items())
    for a in (np.arange(7, dtype=np.uint16), np.ones((2, 0), np.float32), np.array([1.5], np.float16),
              np.arange(4, dtype=">i4")):  # big-endian: sent little-endian
        assert np.array_equal(_view(to_array(a)), a) and _view(to_array(a)).dtype == a.dtype.newbyteorder("<")
    good = to_array(np.ones(4, np.float32))
    bad = [Array(np.ones(4, np.float32)),  # Flower's .npy encoding
           Array(dtype="O", shape=(4,), stype=RAW, data=good.data),
           Array(dtype="float32", shape=(5,), stype=RAW, data=good.data),
           Array(dtype="float32", shape=(-4,), stype=RAW, data=good.data),
           ArrayRecord(), None]
    for arr in bad:
        with pytest.raises(WireError):
            _view(arr)
    with pytest.raises(TypeError):
        to_array(np.array([object()]))
    with pytest.raises(TypeError):
        to_array(torch.ones(2, dtype=torch.complex64))


def test_huge_finite_values_are_rejected_for_their_client_and_the_run_goes_on():
    """A valid top-k payload of float32 max values, every round: rejected for that client alone (the bound
    float32 max / (2n) holds whatever the others send); before, it grew the EF21 tracker to Inf and
    stopped the run with NonFiniteStateError."""
    from fedgluon.sim.driver import run_plain

    task, algo = specs.build({**SPEC, "rounds": 8})

    def tamper(k, j, reply):
        if k >= 1 and j == 2:
            reply.message = {n: dataclasses.replace(p, arrays={**p.arrays, "v.v": np.full_like(p.arrays["v.v"],
                                                                                        np.finfo(np.float32).max)})
                             for n, p in reply.message.items()}
        return reply

    res = run_plain(algo, task.objectives, task.initial_params(), 8, seed=1, tamper=tamper)
    assert [(r["accepted"], r["rejected"]) for r in res.history] == [(4, 0)] + [(3, 1)] * 7
    rejected = [r for r in res.client_log if r["status"] == "rejected"]
    assert {r["client"] for r in rejected} == {2} and all("out-of-range values" in r["reason"] for r in rejected)
    assert all(bool(torch.isfinite(t).all()) for t in res.server_state["G"].values())


def _handshake_world(edit, weights="samples"):
    """An in-process grid whose node of partition 1 answers the handshake as ``edit`` makes it, and a
    strategy connected to it that knows the true sample counts."""
    from fedgluon.sim.federation import client_weights_from_sizes

    task, algo = specs.build(SPEC)
    app = make_client_app(SPEC)

    def hostile(msg, context):
        reply = app(msg, context)
        if msg.metadata.message_type == "query" and context.node_config["partition-id"] == 1:
            edit(reply.content.metric_records["hello"])
        return reply

    grid = InProcessGrid(hostile, N, seed=1)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, grid.run.run_id, SUPERLINK_NODE_ID
    sizes = [o.num_samples for o in task.objectives]
    strategy = GluonStrategy(algo, task.initial_params(), N, seed=1, rounds=3, weights=weights, sizes=sizes,
                             schema=algo.state_schema(task.objectives[0], task.initial_params(), 1))
    strategy.connect(grid, timeout=10)
    return grid, strategy, client_weights_from_sizes(sizes, weights)


HOSTILE_HELLOS = {
    "nan block": lambda h: h.__setitem__("block", float("nan")),
    "another node's block": lambda h: h.__setitem__("block", 0),
    "block out of range": lambda h: h.__setitem__("block", 99),
    "huge count": lambda h: h.__setitem__("num_samples", [1e12]),
    "negative count": lambda h: h.__setitem__("num_samples", [-5]),
    "zero count": lambda h: h.__setitem__("num_samples", [0]),
    "fractional count": lambda h: h.__setitem__("num_samples", [2.5]),
    "count not the partition's": lambda h: h.__setitem__("num_samples", [h["num_samples"][0] + 1]),
    "no counts": lambda h: h.__setitem__("num_samples", []),
    "other clients": lambda h: h.__setitem__("clients", [0]),
}


def _connected_strategy() -> tuple[GluonStrategy, InProcessGrid]:
    """A GluonStrategy of SPEC over an in-process grid of its N nodes, handshake done (rounds driven by hand)."""
    task, algo = specs.build(SPEC)
    grid = InProcessGrid(make_client_app(SPEC), N, seed=1)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, grid.run.run_id, SUPERLINK_NODE_ID
    strategy = GluonStrategy(algo, task.initial_params(), N, seed=1, rounds=3,
                             schema=algo.state_schema(task.objectives[0], task.initial_params(), 1))
    strategy.connect(grid, timeout=10)
    return strategy, grid


@pytest.mark.parametrize("how", sorted(HOSTILE_HELLOS))
def test_a_bad_handshake_rejects_that_node_and_never_weighs(how, caplog):
    """A node with a NaN or foreign or out-of-range block id, or sample counts that are not positive
    integers under the cap equal to the server's, is rejected with a logged reason: no crash, no weight
    from it; its clients fail each round while the others train."""
    grid, strategy, weights = _handshake_world(HOSTILE_HELLOS[how])
    assert "handshake: rejected node" in caplog.text
    assert sorted(strategy.node_of) == [0, 2, 3] and strategy.federation.weights == weights
    replies = list(grid.send_and_receive(list(strategy.configure_train(1, None, None, grid))))
    strategy.aggregate_train(1, replies)
    row, log = strategy.history[-1], {r["client"]: r for r in strategy.client_log}
    assert (row["accepted"], row["failed"]) == (3, 1) and "no node holds" in log[1]["reason"]


def test_client_strings_are_clipped_and_a_reported_death_is_only_a_failure():
    """A node's 5 MB failure reason (claiming a dead actor), a 5 MB error reason and a 1 MB Ray node id are
    clipped before they are stored; none of them stops the run. A runtime error code does stop it."""
    from flwr.app import ConfigRecord, Error, Message
    from flwr.common.constant import ErrorCode

    from fedgluon.sim.checkpoint import ActorDeathError
    from fedgluon.sim.federation import MAX_CLIENT_TEXT

    strategy, grid = _connected_strategy()
    messages = list(strategy.configure_train(1, None, None, grid))
    replies = list(grid.send_and_receive(messages))
    by_client = {strategy.partition_of[r.metadata.src_node_id]: r for r in replies}
    by_client[0].content["failed"] = ConfigRecord({"0": "RayActorError: actor died " + "x" * 5_000_000})
    sent = next(m for m in messages if strategy.partition_of[m.metadata.dst_node_id] == 1)
    by_client[1] = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                 reason="ActorDiedError " + "y" * 5_000_000), reply_to=sent)
    by_client[2].content.config_records["info"]["ray_node"] = "z" * 1_000_000
    strategy.aggregate_train(1, list(by_client.values()))
    rows = {r["client"]: r for r in strategy.client_log}
    assert rows[0]["status"] == rows[1]["status"] == "failed" and rows[2]["status"] == "accepted"
    assert all(len(r["reason"]) <= MAX_CLIENT_TEXT + 50 for r in rows.values())
    assert "actor died" in rows[0]["reason"] and all(len(n) <= 64 for n in strategy.ray_nodes)

    messages = list(strategy.configure_train(2, None, None, grid))
    sent = next(m for m in messages if strategy.partition_of[m.metadata.dst_node_id] == 3)
    replies = [r for r in grid.send_and_receive(messages) if r.metadata.src_node_id != sent.metadata.dst_node_id]
    replies.append(Message(Error(code=ErrorCode.CLIENT_APP_CRASHED, reason="gone"), reply_to=sent))
    with pytest.raises(ActorDeathError, match="client 3 died"):
        strategy.aggregate_train(2, replies)


@pytest.mark.parametrize("key", ["\u00b2", "9" * 5000, "\u0661"])
def test_a_failed_record_with_keys_that_are_no_client_ids_is_ignored(key):
    """A node's ``failed`` record names its clients by decimal id; a key that only looks like one (a
    superscript digit, 5,000 digits, another script's digit) fails nobody and crashes nothing."""
    from flwr.app import ConfigRecord

    strategy, grid = _connected_strategy()
    replies = list(grid.send_and_receive(list(strategy.configure_train(1, None, None, grid))))
    by_client = {strategy.partition_of[r.metadata.src_node_id]: r for r in replies}
    by_client[1].content["failed"] = ConfigRecord({key: "InjectedFault: not really"})
    strategy.aggregate_train(1, replies)
    assert (strategy.history[-1]["accepted"], strategy.history[-1]["failed"]) == (N, 0)
