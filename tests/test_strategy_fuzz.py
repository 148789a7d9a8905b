"""Hostile replies through the real strategy: hypothesis corrupts the Flower records of genuine client replies
(missing/extra arrays, NaN/Inf, finite values beyond the server's bound, wrong lengths, dtypes, shapes, codecs,
out-of-range or duplicate indices, wrong round or client ids, missing records, pickled objects, garbage bytes).
No exception escapes, nothing is unpickled, and after every round the server state equals the state computed
from the valid replies alone; corrupted clients keep their state."""

import copy
import io
import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compressors import PayloadError
from fedgluon import spec as specs
from fedgluon.client_app import make_client_app
from fedgluon.engines import InProcessGrid
from packed_edit import PackedEdit
from strategies.records import RAW, BlockReplies, from_array, to_array
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
             "codec", "shape", "round", "partition", "no_payload", "no_metrics", "no_header", "pickle", "garbage",
             "bad_state", "bad_layout", "no_replies", "huge"]


@pytest.fixture(scope="module")
def world():
    task, algo = specs.build(SPEC)
    grid = InProcessGrid(make_client_app(SPEC), N, seed=1)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, grid.run.run_id, SUPERLINK_NODE_ID
    strategy = GluonStrategy(algo, task.initial_params(), N, seed=1, rounds=SPEC["rounds"],
                             schema=algo.state_schema(task.objectives[0], task.initial_params(), 1))
    strategy.connect(grid, timeout=10)
    return grid, strategy, algo


def corrupt(reply, j: int, how: str, data: st.DataObject, k: int) -> None:
    """Corrupt client j's entry of its node's packed reply (one client per node here)."""
    content = reply.content
    if how == "no_replies":
        del content["replies"]
        return
    if how == "bad_layout":
        record = content.array_records["replies"]
        text = data.draw(st.sampled_from([b"{not json", b"[]", b'{"clients": 3}', b"\xff\xfe"]), label="layout")
        content["replies"] = ArrayRecord({"layout": to_array(np.frombuffer(text, np.uint8)), "data": record["data"]})
        return
    edit = PackedEdit(content)
    r = edit.row(j)
    layers, _ = edit.layers(j)  # one client per node: every column has one row, j's
    layer = data.draw(st.sampled_from(sorted(layers)), label="layer")
    arrays = layers[layer]["arrays"]
    v = edit.array(arrays["v.v"])[0]
    if how == "drop_array":
        del arrays[data.draw(st.sampled_from(sorted(arrays)), label="dropped")]
    elif how == "extra_array":
        arrays["zzz"] = edit.append(np.zeros((1, 3), np.float32))
    elif how == "orphan_array":
        layers["not.a.layer"] = {"codec": "topk/fp32", "shape": [3], "meta": {},
                                 "arrays": {"v.v": edit.append(np.zeros((1, 3), np.float32))}}
    elif how == "nan":
        v[data.draw(st.integers(0, len(v) - 1))] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        arrays["v.v"] = edit.append(v[None])
    elif how == "huge":  # finite, valid, and far beyond the server's bound float32 max / (2n)
        v[data.draw(st.integers(0, len(v) - 1))] = data.draw(st.sampled_from([1, -1])) * np.finfo(np.float32).max
        arrays["v.v"] = edit.append(v[None])
    elif how == "length":
        arrays["v.v"] = edit.append((v[:-1] if data.draw(st.booleans()) else np.append(v, np.float32(1)))[None])
    elif how == "index_range":
        idx = edit.array(arrays["idx"])
        idx[0, data.draw(st.integers(0, idx.shape[1] - 1))] = np.iinfo(idx.dtype).max
        arrays["idx"] = edit.append(idx)
    elif how == "dup_index":
        arrays = layers["body.0.weight"]["arrays"]
        idx = edit.array(arrays["idx"])
        idx[0, 1] = idx[0, 0]
        arrays["idx"] = edit.append(idx)
    elif how == "dtype":
        arrays["v.v"] = edit.append(v.astype(data.draw(st.sampled_from([np.float64, np.float16, np.int32, np.uint8])))[None])
    elif how == "codec":
        layers[layer]["codec"] = data.draw(st.one_of(st.text(max_size=12).filter(lambda c: c != "topk/fp32"),
                                                     st.integers(), st.none()), label="codec")
    elif how == "shape":
        shape = layers[layer]["shape"]
        layers[layer]["shape"] = [*shape[:-1], shape[-1] + data.draw(st.sampled_from([-1, 1, 7]))]
    elif how == "round":
        edit.layout["round"][r] = k + data.draw(st.sampled_from([-1, 1, 1000]))
    elif how == "partition":
        edit.layout["client"][r] = (edit.layout["client"][r] + 1) % N
    elif how == "no_payload":
        edit.layout["payloads"] = [g for g in edit.layout["payloads"] if r not in g["rows"]]
    elif how == "no_metrics":
        del edit.layout[data.draw(st.sampled_from(["client", "round", "loss", "grad_evals", "samples"]), label="metric")]
    elif how == "no_header":
        del layers[layer][data.draw(st.sampled_from(["codec", "shape", "meta"]), label="header")]
    elif how == "pickle":
        buf = io.BytesIO()  # a .npy file whose object array is a pickle that would call _pwned
        np.save(buf, np.array([Evil()], dtype=object), allow_pickle=True)
        name = data.draw(st.sampled_from(["object", "O", "float32"]))  # float32: claims more bytes than there are
        arrays["v.v"] = edit.append(buf.getvalue(), name=name, shape=[1, len(buf.getvalue()) if name == "float32" else 1])
    elif how == "garbage":  # references no valid array: misaligned, negative, past the end, or not a number
        size = len(edit.data)
        offset = data.draw(st.one_of(st.integers(-64, -1), st.integers(size - v.nbytes + 1, size + 64),
                                     st.integers(0, size).map(lambda o: o | 1), st.text(max_size=3),
                                     st.floats(allow_nan=True)), label="offset")
        arrays["v.v"] = ["float32", [1, *v.shape], offset]
    elif how == "bad_state":  # the proposed state must never be committed when it is malformed
        group, _ = edit.group(j, "states")
        state = group["leaves"]
        i = data.draw(st.sampled_from([i for i, (_, ref, _) in enumerate(state) if ref is not None]), label="leaf")
        path, ref, shared = state[i]
        if data.draw(st.booleans(), label="path through a leaf"):
            state.append([path + "/deeper", ref, shared])
        else:
            state[i] = data.draw(st.sampled_from([[path, ["object", [1], 0], False], [3, ref, shared], "leaf",
                                                  [path, None, False], [path, [ref[0], [10 ** 9], 0], False],
                                                  [path, ref, "yes"]]), label="bad leaf")
    edit.save()


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
            valid_parsed[j] = BlockReplies(Records.of(reply.content).array["replies"]).parse(j)[0]
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
    from strategies.records import record_to_states, states_to_record

    def record_to_state(record):
        return record_to_states(record)[0]

    def state_to_record(state):
        return states_to_record({0: state})

    state = {"est": {"m": torch.randn(3, 4).to(torch.bfloat16)}, "ef": {"q": torch.arange(6, dtype=torch.int16)},
             "x": torch.randn(5, dtype=torch.float64), "commits": torch.tensor(3), "flag": torch.tensor([True, False])}
    back = record_to_state(state_to_record(state))
    assert tree_equal(state, back) and back["est"]["m"].dtype == torch.bfloat16
    for t in (back["ef"]["q"], back["x"], back["commits"]):  # views of one copy: aligned and writable
        assert t.data_ptr() % t.element_size() == 0
        t.add_(1)
    assert tree_equal(record_to_state(state_to_record(state)), state)  # the record's bytes are untouched
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
    states = lambda *leaves, rows=(0,): text(json.dumps(  # noqa: E731
        {"clients": [0], "states": [{"rows": list(rows), "leaves": [list(leaf) for leaf in leaves]}]}))
    leaf = lambda *ref: states(["x", list(ref), True])  # noqa: E731
    broken = [("data", Array(dtype="uint8", shape=(3,), stype=RAW, data=b"abc")),  # fewer bytes than the layout
              ("layout", states(["x", ["float32", [1], 0], True], ["x/y", ["float32", [1], 0], True])),  # through a leaf
              ("layout", text("{not json")), ("layout", leaf("object", [1], 0)), ("layout", leaf("float32", [1], 4)),
              ("layout", leaf("float32", [1], -8)), ("layout", leaf("float32", [10 ** 6], 0)),
              ("layout", states(["x", ["float32", [2], 0], False])),  # a column of 2 rows for 1 client
              ("layout", states(["x", ["float32", [1], 0], True], rows=(0, 0))),
              ("layout", states(["x", ["float32", [1], 0], True], rows=(1,))),
              ("layout", states(["x", ["float32", [1], 0], 1])),
              ("layout", text(json.dumps({"clients": [0, 0], "states": []}))),
              ("layout", text("[]"))]
    for key, value in broken:
        bad = ArrayRecord({**{k: record[k] for k in record.keys()}, key: value})
        with pytest.raises(ValueError):
            record_to_state(bad)


def test_server_copies_each_committed_state_out_of_the_block():
    """Parsed proposed states own one buffer per client (never a view of the block's record, which a
    committed state would keep alive and pickle into checkpoints); payload and metrics round-trip."""
    from compressors import make_compressor
    from fedgluon.algorithms import ClientReply
    from strategies.records import replies_to_record

    C = make_compressor({"name": "topk", "ratio": 0.25})
    results = {}
    model = {"w": torch.randn(4, 6)}  # x_prev: the broadcast model both clients keep
    for j in (3, 5):
        msg = {"w": C.compress(torch.randn(4, 6))[0]}
        state = {"ef": {"g": {"w": torch.randn(4, 6)}}, "comp": {}, "commits": torch.tensor(j), "x_prev": dict(model)}
        results[j] = (state, ClientReply(j, 2, msg, loss=float("nan") if j == 5 else 0.5, grad_evals=2, samples=9))
    record = replies_to_record(results)
    assert record["data"].shape[0] < 2 * 4 * 24 * 3  # x_prev written once, not per client
    block = BlockReplies(record)
    x_prev = []
    for j, (state, sent) in results.items():
        reply, back = block.parse(j)
        x_prev.append(back["x_prev"]["w"])
        assert tree_equal({k: v for k, v in back.items() if k != "comp"}, {k: v for k, v in state.items() if k != "comp"})
        assert back["comp"] == {}
        start = block.unpacker.buffer.ctypes.data
        for t in (back["ef"]["g"]["w"], back["commits"], back["x_prev"]["w"]):
            assert not start <= t.data_ptr() < start + block.unpacker.buffer.nbytes
        assert (reply.client, reply.round, reply.grad_evals, reply.samples) == (j, 2, 2, 9)
        assert reply.loss == sent.loss or (np.isnan(reply.loss) and np.isnan(sent.loss))
        for key, a in sent.message["w"].arrays.items():
            assert np.array_equal(reply.message["w"].arrays[key], a)
    assert x_prev[0].data_ptr() == x_prev[1].data_ptr() and torch.equal(x_prev[0], model["w"])  # one shared copy
    assert results[3][0]["ef"]["g"]["w"].data_ptr() != results[5][0]["ef"]["g"]["w"].data_ptr()
    with pytest.raises(PayloadError, match="no entry for client 4"):
        block.parse(4)


def test_states_record_writes_shared_tensors_once():
    """The server's message to a node holds a tensor its clients' states share (x_prev) once; the node
    reads it back as one memory for all of them."""
    from strategies.records import record_to_states, states_to_record

    model = torch.randn(50, 40)
    states = {j: {"x_prev": {"w": model}, "est": {"w": torch.full((50, 40), float(j))}} for j in range(4)}
    record = states_to_record(states)
    assert record["data"].shape[0] == 5 * model.numel() * 4  # one x_prev + four estimates
    back = record_to_states(record)
    assert len({back[j]["x_prev"]["w"].data_ptr() for j in range(4)}) == 1
    assert all(torch.equal(back[j]["x_prev"]["w"], model) and torch.equal(back[j]["est"]["w"], states[j]["est"]["w"])
               for j in range(4))


def test_huge_finite_values_are_rejected_for_their_client_and_the_run_goes_on():
    """A valid top-k payload of float32 max values, every round: rejected for that client alone (the bound
    float32 max / (2n) holds whatever the others send); before, it grew the EF21 tracker to Inf and
    stopped the run with NonFiniteStateError."""
    from fedgluon.driver import run_plain

    task, algo = specs.build({**SPEC, "rounds": 8})

    def tamper(k, j, reply):
        if k >= 1 and j == 2:
            for payload in reply.message.values():
                payload.arrays["v.v"] = np.full_like(payload.arrays["v.v"], np.finfo(np.float32).max)
        return reply

    res = run_plain(algo, task.objectives, task.initial_params(), 8, seed=1, tamper=tamper)
    assert [(r["accepted"], r["rejected"]) for r in res.history] == [(4, 0)] + [(3, 1)] * 7
    rejected = [r for r in res.client_log if r["status"] == "rejected"]
    assert {r["client"] for r in rejected} == {2} and all("out-of-range values" in r["reason"] for r in rejected)
    assert all(bool(torch.isfinite(t).all()) for t in res.server_state["G"].values())


def _handshake_world(edit, weights="samples"):
    """An in-process grid whose node of partition 1 answers the handshake as ``edit`` makes it, and a
    strategy connected to it that knows the true sample counts."""
    from fedgluon.federation import client_weights_from_sizes

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

    from fedgluon.checkpoint import ActorDeathError
    from fedgluon.federation import MAX_CLIENT_TEXT

    task, algo = specs.build(SPEC)
    grid = InProcessGrid(make_client_app(SPEC), N, seed=1)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, grid.run.run_id, SUPERLINK_NODE_ID
    strategy = GluonStrategy(algo, task.initial_params(), N, seed=1, rounds=3,
                             schema=algo.state_schema(task.objectives[0], task.initial_params(), 1))
    strategy.connect(grid, timeout=10)
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
