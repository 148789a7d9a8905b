"""Hostile replies through the real strategy: hypothesis corrupts the Flower records of genuine client replies
(missing/extra arrays, NaN/Inf, wrong lengths, dtypes, shapes, codecs, out-of-range or duplicate indices,
wrong round or client ids, missing records, pickled objects, garbage bytes). No exception escapes, nothing
is unpickled, and after every round the server state equals the state computed from the valid replies alone;
corrupted clients keep their state."""

import copy
import io

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedgluon import spec as specs
from fedgluon.client_app import make_client_app
from fedgluon.engines import InProcessGrid
from strategies.records import RAW, from_array, to_array
from strategies.strategy import GluonStrategy, Records

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


MUTATIONS = ["drop_array", "extra_array", "orphan_array", "nan", "length", "index_range", "dup_index", "dtype",
             "codec", "shape", "round", "partition", "no_payload", "no_metrics", "no_header", "pickle", "garbage"]


@pytest.fixture(scope="module")
def world():
    task, algo = specs.build(SPEC)
    grid = InProcessGrid(make_client_app(SPEC), N, seed=1)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, grid.run.run_id, SUPERLINK_NODE_ID
    strategy = GluonStrategy(algo, task.initial_params(), N, seed=1, rounds=SPEC["rounds"])
    strategy.connect(grid, timeout=10)
    return grid, strategy, algo


def corrupt(reply, j: int, how: str, data: st.DataObject, k: int) -> None:
    content = reply.content
    payload, header = content.array_records[f"payload.{j}"], content.config_records[f"header.{j}"]
    names = sorted(payload.keys())
    values = [n for n in names if n.endswith("/v.v")]
    pick = data.draw(st.sampled_from(values), label="layer")
    layer = pick.split("/")[0]
    v = from_array(payload[pick])
    if how == "drop_array":
        del payload[data.draw(st.sampled_from(names), label="dropped")]
    elif how == "extra_array":
        payload[f"{layer}/zzz"] = to_array(np.zeros(3, np.float32))
    elif how == "orphan_array":
        payload["not.a.layer/v.v"] = to_array(np.zeros(3, np.float32))
    elif how == "nan":
        v[data.draw(st.integers(0, len(v) - 1))] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        payload[pick] = to_array(v)
    elif how == "length":
        payload[pick] = to_array(v[:-1] if data.draw(st.booleans()) else np.append(v, np.float32(1)))
    elif how == "index_range":
        idx = from_array(payload[f"{layer}/idx"])
        idx[data.draw(st.integers(0, len(idx) - 1))] = np.iinfo(idx.dtype).max
        payload[f"{layer}/idx"] = to_array(idx)
    elif how == "dup_index":
        layer = "body.0.weight"
        idx = from_array(payload[f"{layer}/idx"])
        idx[1] = idx[0]
        payload[f"{layer}/idx"] = to_array(idx)
    elif how == "dtype":
        payload[pick] = to_array(v.astype(data.draw(st.sampled_from([np.float64, np.float16, np.int32, np.uint8]))))
    elif how == "codec":
        header[f"{layer}/codec"] = data.draw(st.text(max_size=12).filter(lambda c: c != "topk/fp32"), label="codec")
    elif how == "shape":
        shape = list(header[f"{layer}/shape"])
        header[f"{layer}/shape"] = [*shape[:-1], shape[-1] + data.draw(st.sampled_from([-1, 1, 7]))]
    elif how == "round":
        content.metric_records[f"metrics.{j}"]["round"] = k + data.draw(st.sampled_from([-1, 1, 1000]))
    elif how == "partition":
        metrics = content.metric_records[f"metrics.{j}"]
        metrics["partition"] = (int(metrics["partition"]) + 1) % N
    elif how == "no_payload":
        del content.array_records[f"payload.{j}"]
    elif how == "no_metrics":
        del content.metric_records[f"metrics.{j}"]
    elif how == "no_header":
        del content.config_records[f"header.{j}"]
    elif how == "pickle":
        buf = io.BytesIO()  # a .npy file whose object array is a pickle that would call _pwned
        np.save(buf, np.array([Evil()], dtype=object), allow_pickle=True)
        payload[pick] = Array(dtype="O", shape=(1,), stype="numpy.ndarray", data=buf.getvalue())
    elif how == "garbage":
        raw = data.draw(st.binary(min_size=0, max_size=64), label="bytes")
        raw += b"\0" * (len(raw) == v.nbytes)  # bytes of exactly the right length are a valid (other) array
        payload[pick] = Array(dtype="float32", shape=tuple(v.shape), stype=RAW, data=raw)


def tree_equal(a, b) -> bool:
    if a is None or b is None:
        return a is b
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(tree_equal(a[k], b[k]) for k in a)
    return torch.equal(a, b)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), plan=st.lists(st.sampled_from([None, *MUTATIONS]), min_size=N, max_size=N))
def test_hostile_replies_never_touch_server_state(world, data, plan):
    grid, strategy, algo = world
    before_server = copy.deepcopy(strategy.server_state)
    before_clients = copy.deepcopy(strategy.client_states)
    messages = list(strategy.configure_train(1, None, None, grid))
    plan_of = {}
    valid_parsed = {}
    replies = list(grid.send_and_receive(messages))
    bc = strategy._round.broadcast
    for reply in replies:
        j = strategy.partition_of[reply.metadata.src_node_id]  # one client per node here
        how = plan[j]
        plan_of[j] = how
        if how is None:
            valid_parsed[j] = strategy._parse(Records.of(reply.content), j)[0]
        else:
            corrupt(reply, j, how, data, bc.round)
    strategy.aggregate_train(1, replies)  # must not raise

    expected, outcome = algo.server_step(copy.deepcopy(before_server), valid_parsed, bc, strategy.federation.weights)
    assert sorted(outcome.accepted) == sorted(valid_parsed)
    for key in ("X", "G"):
        assert tree_equal(strategy.server_state.get(key), expected.get(key)), key
    row = strategy.history[-1]
    assert row["accepted"] == len(valid_parsed) and row["rejected"] == N - len(valid_parsed)
    for j, how in plan_of.items():
        if how is not None:
            assert tree_equal(strategy.client_states[j], before_clients[j]), (j, how)
    assert not UNPICKLED


def test_raw_arrays_round_trip_and_reject_anything_else():
    """Records carry raw little-endian bytes of an allowed dtype; other stypes, dtypes and byte counts
    are refused (a ValueError, which the parsers turn into a PayloadError)."""
    from strategies.records import record_to_state, state_to_record

    state = {"est": {"m": torch.randn(3, 4).to(torch.bfloat16)}, "ef": {"q": torch.arange(6, dtype=torch.int16)},
             "x": torch.randn(5, dtype=torch.float64), "commits": torch.tensor(3), "flag": torch.tensor([True, False])}
    back = record_to_state(state_to_record(state))
    assert tree_equal(state, back) and back["est"]["m"].dtype == torch.bfloat16
    for a in (np.arange(7, dtype=np.uint16), np.ones((2, 0), np.float32), np.array([1.5], np.float16)):
        assert np.array_equal(from_array(to_array(a)), a) and from_array(to_array(a)).dtype == a.dtype
    good = to_array(np.ones(4, np.float32))
    bad = [Array(np.ones(4, np.float32)),  # Flower's .npy encoding
           Array(dtype="O", shape=(4,), stype=RAW, data=good.data),
           Array(dtype="float32", shape=(5,), stype=RAW, data=good.data),
           Array(dtype="float32", shape=(-4,), stype=RAW, data=good.data)]
    for arr in bad:
        with pytest.raises(ValueError):
            from_array(arr)
    with pytest.raises(TypeError):
        to_array(np.array([object()]))
    assert record_to_state(state_to_record(None)) is None
    assert record_to_state(state_to_record({"a": {}, "b": torch.ones(2)}))["a"] == {}
    record = state_to_record(state)
    text = lambda t: to_array(np.frombuffer(t.encode(), np.uint8))  # noqa: E731
    broken = [("data", Array(dtype="uint8", shape=(3,), stype=RAW, data=b"abc")),  # fewer bytes than the layout
              ("layout", text("[[\"x\", \"float32\", [1]], [\"x/y\", \"float32\", [1]]]")),  # path through a leaf
              ("layout", text("{not json")), ("layout", text("[[\"x\", \"object\", [1]]]"))]
    for key, value in broken:
        bad = ArrayRecord({**{k: record[k] for k in record.keys()}, key: value})
        with pytest.raises(ValueError):
            record_to_state(bad)
