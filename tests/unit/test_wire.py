"""The wire format (fedgluon/flower/wire.py): a block's rows and its step's results round-trip through Flower
records bitwise, RawArrays pickle their bytes out of band, and the server's reader checks every header
against the schema before it reads a byte, rejecting exactly the clients a malformed part concerns."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from compressors.payload import PayloadRows
from fedgluon.algorithms.block import PayloadGroup
from fedgluon.clients.table import flatten
from fedgluon.config import spec as specs
from fedgluon.flower.wire import (
    RAW,
    RawArray,
    WireError,
    _view,
    read_replies,
    record_to_rows,
    results_to_records,
    rows_to_record,
    to_array,
)
from fedgluon.sim.driver import run_plain

TASK = {"name": "synthetic", "num_clients": 6, "dim": 6, "classes": 3, "hidden": [5], "mean_samples": 20,
        "batch_size": 8}
CLIENTS = list(range(6))
ROUND = 2
ALGORITHMS = [
    {"name": "gluon-dasha-mvr"},  # two payload groups: first messages dense, the rest rand-k
    {"name": "gluon-ef21", "compressor": {"name": "randk_seeded", "ratio": 0.6}},  # a header (seed) per layer
    {"name": "gluon-ef21", "error_feedback": "ef14", "compressor": {"name": "powersgd", "rank": 1}},
    {"name": "gluon-ef21", "tracker": "fixed16"},
    {"name": "gluon", "nesterov": True, "state_dtype": "bfloat16"},
    {"name": "gluon-mvr"},  # X_prev: the table keeps broadcast models
]


def world(algorithm: dict, run: int | None = None):
    """An algorithm after 2 rounds of 6 clients at participation 0.5 (so commits, seen and the groups
    differ by client), the round-2 broadcast, and its table; ``run``: clients per run of a block step."""
    spec = specs.normalise({"task": TASK, "algorithm": {"lr": 0.05, **algorithm}, "seed": 3})
    task, algo = specs.build(spec)
    X0 = task.initial_params()
    res = run_plain(algo, task.objectives, X0, ROUND, seed=3, participation=0.5, block_size=3)
    if run is not None:
        grad_bytes = sum(t.numel() * t.element_size() for t in X0.values()) * (1 + algo.needs_previous)
        algo.RUN_BYTES = run * grad_bytes
    bc = algo.broadcast(res.server_state, ROUND, 3, len(CLIENTS))
    return algo, res.table, algo.step_block(res.table.rows(CLIENTS), bc, task.objectives)


def read(algo, table, arrays, meta, clients=CLIENTS, round_=ROUND):
    return read_replies(arrays, meta, clients, round_, table, algo.shapes, algo.derived)


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def same_reply(got, sent) -> bool:
    def head(r):
        return r.client, r.round, r.loss, r.grad_evals, r.samples, r.group, list(r.message)
    if head(got) != head(sent):
        return False
    for layer, p in sent.message.items():
        q = got.message[layer]
        if (q.codec, tuple(q.shape), q.meta, list(q.arrays)) != (p.codec, tuple(p.shape), p.meta, list(p.arrays)):
            return False
        if not all(q.arrays[k].dtype == a.dtype and np.array_equal(q.arrays[k], a) for k, a in p.arrays.items()):
            return False
    return True


def without_row(groups: dict, row: int) -> dict:
    """A block's payload groups without block row ``row`` (as if that client sent nothing)."""
    out = {}
    for name, group in groups.items():
        keep = [i for i, r in enumerate(group.rows) if r != row]
        if keep:
            layers = {n: PayloadRows(p.codec, p.shape, {k: a[keep] for k, a in p.arrays.items()},
                                     {k: [v[i] for i in keep] for k, v in p.meta.items()})
                      for n, p in group.layers.items()}
            out[name] = PayloadGroup([group.rows[i] for i in keep], layers)
    return out


# ---------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("clients", [[0, 1, 2], [0, 2, 5]], ids=["slice", "gathered"])
@pytest.mark.parametrize("algorithm", [ALGORITHMS[4], ALGORITHMS[5]], ids=["bfloat16", "x_prev"])
def test_rows_round_trip_bitwise(algorithm, clients):
    _, table, _ = world(algorithm)
    rows = table.rows(clients)
    assert len(set(rows.seen.tolist())) > 1  # partial participation: the rows point at different models
    back = record_to_rows(clients, *rows_to_record(rows))
    assert back.clients == clients
    assert same_tensors(flatten(back.tree), flatten(rows.tree)) and flatten(rows.tree)
    assert same_tensors({"c": back.commits, "s": back.seen}, {"c": rows.commits, "s": rows.seen})
    assert back.models.keys() == rows.models.keys()
    assert all(same_tensors(back.models[r], rows.models[r]) for r in rows.models)
    if algorithm.get("state_dtype") == "bfloat16":
        assert {t.dtype for t in flatten(back.tree).values()} == {torch.bfloat16}
    else:
        assert rows.models  # the X_prev history travels


@pytest.mark.parametrize("run", [None, 2], ids=["one-run", "runs-of-2"])
@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=lambda a: "-".join(str(v) for v in a.values()))
def test_a_block_step_round_trips_bitwise(algorithm, run):
    """What the server reads is what the node's step made: every client's reply (payload arrays with
    their dtypes, headers, metrics, group) and every run's proposed state columns."""
    algo, table, results = world(algorithm, run)
    assert len(results) == (1 if run is None else 3)
    got = read(algo, table, *results_to_records(results, algo.derived))
    assert got.failed == {} and got.rejected == {}
    sent = {j: r for res in results for j, r in res.replies().items()}
    assert sorted(got.replies) == sorted(sent) == CLIENTS
    assert all(same_reply(got.replies[j], sent[j]) for j in CLIENTS)
    assert [p.clients for p in got.proposed] == [res.clients for res in results]
    assert all(same_tensors(p.columns, res.proposal(algo.derived).columns) for p, res in zip(got.proposed, results))
    if algorithm["name"] == "gluon-dasha-mvr":
        assert {r.group for r in got.replies.values()} == {"dense", "uplink"}


def test_a_failed_row_travels_as_a_failure():
    algo, table, results = world(ALGORITHMS[0])
    res = results[0]
    res.failed = {1: "ArithmeticError: inexact"}
    res.groups = without_row(res.groups, 1)
    got = read(algo, table, *results_to_records(results, algo.derived))
    assert got.failed == {1: "ArithmeticError: inexact"} and got.rejected == {}
    assert sorted(got.replies) == [0, 2, 3, 4, 5]


# ---------------------------------------------------------------------------------------------- pickling
def test_records_pickle_their_bytes_out_of_band_and_round_trip():
    """Reply records hold RawArrays: under pickle protocol 5 (what Ray uses between Flower's engine and its
    actors) their bytes travel as out-of-band buffers, and what comes back is a RawArray with the same
    bytes, which reads back to the same replies."""
    algo, table, results = world(ALGORITHMS[0])
    arrays, meta = results_to_records(results, algo.derived)
    assert all(type(arrays[k]) is RawArray for k in arrays)
    buffers = []
    stream = pickle.dumps(arrays, protocol=5, buffer_callback=buffers.append)
    big = max(arrays.keys(), key=lambda k: len(arrays[k].data))
    data = arrays[big].data
    assert len(buffers) == len(arrays) and any(bytes(memoryview(b)) == data for b in buffers)
    assert data not in stream
    back = pickle.loads(stream, buffers=buffers)
    assert all(type(back[k]) is RawArray and back[k].data == arrays[k].data for k in arrays)
    got, want = read(algo, table, back, meta), read(algo, table, arrays, meta)
    assert all(same_reply(got.replies[j], want.replies[j]) for j in CLIENTS)
    assert all(same_tensors(a.columns, b.columns) for a, b in zip(got.proposed, want.proposed))


def test_raw_arrays_deflate_and_inflate_as_flower_arrays():
    """Flower's deployment path deflates objects under their class's qualified name and inflates them by
    it in processes without fedgluon: a RawArray must travel as an ``Array``, and read back the same."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    algo, table, results = world(ALGORITHMS[0])
    arrays, meta = results_to_records(results, algo.derived)
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(arrays).items()}
    back = inflate_object_from_contents(arrays.object_id, contents)
    assert all(type(back[k]) is Array and back[k].data == arrays[k].data for k in arrays)
    got = read(algo, table, back, meta)
    assert got.rejected == {} and all(same_reply(got.replies[j], r) for res in results
                                      for j, r in res.replies().items())


# ---------------------------------------------------------------------------------------------- headers
class Untouched(RawArray):
    """A RawArray that counts reads of its bytes."""

    reads = 0

    @property
    def data(self) -> bytes:
        Untouched.reads += 1
        return self.__dict__["data"]


def untouched(a: np.ndarray, **header) -> Untouched:
    arr = object.__new__(Untouched)
    arr.__dict__.update(to_array(a).__dict__)
    arr.__dict__.update(header)
    return arr


@pytest.mark.parametrize("header, match", [
    ({"dtype": "float64"}, "dtype"), ({"dtype": "object"}, "dtype"), ({"stype": "numpy.ndarray"}, "stype"),
    ({"shape": (3, 4)}, "shape"), ({"shape": (2, -6)}, "shape"), ({"shape": "12"}, "shape"),
    ({"shape": (2, 6) + (1,) * 98}, "shape"),  # more dimensions than NumPy has (its ValueError is no WireError)
])
def test_headers_are_checked_before_any_byte_is_read(header, match):
    Untouched.reads = 0
    with pytest.raises(WireError, match=match):
        _view(untouched(np.ones((2, 6), np.float32), **header), "float32", (2, 6))
    assert Untouched.reads == 0
    assert np.array_equal(_view(untouched(np.ones((2, 6), np.float32)), "float32", (2, 6)), np.ones((2, 6)))


def test_a_byte_count_that_does_not_fit_the_header_is_refused():
    good = to_array(np.ones(4, np.float32))
    for arr in (Array(dtype="float32", shape=(5,), stype=RAW, data=good.data),
                Array(dtype="float32", shape=(3,), stype=RAW, data=good.data),
                Array(dtype="float64", shape=(4,), stype=RAW, data=good.data),
                Array(np.ones(4, np.float32))):  # Flower's own .npy encoding
        with pytest.raises(WireError):
            _view(arr)
    with pytest.raises(TypeError):
        to_array(np.array([object()]))


def test_a_state_column_of_another_dtype_rejects_its_run_unread():
    algo, table, results = world(ALGORITHMS[1], run=2)
    arrays, meta = results_to_records(results, algo.derived)
    path = next(iter(table.travelling(algo.derived)))
    Untouched.reads = 0
    arrays[f"1/s/{path}"] = untouched(table.columns[path][2:4].double().numpy())
    got = read(algo, table, arrays, meta)
    assert got.rejected.keys() == {2, 3} and "dtype" in got.rejected[2] and Untouched.reads == 0


# ---------------------------------------------------------------------------------------------- hostile parts
class Watched(ArrayRecord):
    """An ArrayRecord that counts every look at its arrays (not its length)."""

    looks = 0

    def _look(self):
        Watched.looks += 1

    def __getitem__(self, key):
        self._look()
        return super().__getitem__(key)

    def __iter__(self):
        self._look()
        return super().__iter__()

    def keys(self):
        self._look()
        return super().keys()

    def items(self):
        self._look()
        return super().items()

    def values(self):
        self._look()
        return super().values()


def test_too_many_arrays_reject_the_block_before_any_is_looked_at():
    algo, table, results = world(ALGORITHMS[0])
    arrays, meta = results_to_records(results, algo.derived)
    watched = Watched()
    for key in arrays:
        watched[key] = arrays[key]
    tiny = to_array(np.zeros(1, np.float32))
    for n in range(2_000):
        watched[f"0/s/junk{n}"] = tiny
    Watched.looks = 0
    got = read(algo, table, watched, meta)
    assert Watched.looks == 0
    assert got.rejected.keys() == set(CLIENTS) and all("arrays" in why for why in got.rejected.values())
    assert got.replies == {} and got.proposed == [] and got.failed == {}


def _columns(table):
    path = next(iter(table.columns))
    return path, table.columns[path]


@pytest.mark.parametrize("how", ["shape", "dtype", "missing", "extra"])
def test_a_run_whose_state_does_not_fit_rejects_that_run_only(how):
    algo, table, results = world(ALGORITHMS[0], run=2)
    arrays, meta = results_to_records(results, algo.derived)
    path, column = _columns(table)
    key = f"1/s/{path}"
    if how == "shape":
        arrays[key] = to_array(torch.zeros(2, *column.shape[1:-1], column.shape[-1] + 1))
    elif how == "dtype":
        arrays[key] = to_array(torch.zeros(2, *column.shape[1:], dtype=torch.float64))
    elif how == "missing":
        del arrays[key]
    else:
        arrays["1/s/evil"] = to_array(torch.zeros(2, 3))
    got = read(algo, table, arrays, meta)
    assert got.rejected.keys() == {2, 3} and all(why.startswith("state: ") for why in got.rejected.values())
    assert sorted(got.replies) == [0, 1, 4, 5] and got.failed == {}
    assert [p.clients for p in got.proposed] == [[0, 1], [4, 5]]


@pytest.mark.parametrize("algorithm", [ALGORITHMS[0], ALGORITHMS[4]], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_state_row_rejects_that_client_only(value, algorithm):
    algo, table, results = world(algorithm)
    arrays, meta = results_to_records(results, algo.derived)
    path, _ = _columns(table)
    column = flatten(results[0].state)[path].clone()
    column[4].view(-1)[0] = value
    arrays[f"0/s/{path}"] = to_array(column)
    got = read(algo, table, arrays, meta)
    assert got.rejected == {4: "state: NaN/Inf in a proposed state column"}
    assert sorted(got.replies) == [0, 1, 2, 3, 5] and got.failed == {}
    assert [p.clients for p in got.proposed] == [CLIENTS]  # committed for the accepted clients only (the server)


def _dense_layer(meta):
    return f"0/p/dense/{meta['0/p/dense/layers'][0]}"


@pytest.mark.parametrize("how", ["drop", "rows", "codec", "dtype", "layer", "parts", "dims", "empty"])
def test_a_malformed_payload_group_rejects_its_clients_only(how):
    algo, table, results = world(ALGORITHMS[0])
    arrays, meta = results_to_records(results, algo.derived)
    dense, uplink = meta["0/p/dense/rows"], meta["0/p/uplink/rows"]
    assert dense and uplink
    key = _dense_layer(meta)
    values = np.frombuffer(arrays[f"{key}/v.v"].data, np.float32).reshape(len(dense), -1)
    if how == "drop":
        del arrays[f"{key}/v.v"]
    elif how == "rows":
        arrays[f"{key}/v.v"] = to_array(values[:-1])
    elif how == "codec":
        meta[f"{key}/codec"] = 7
    elif how == "dtype":
        arrays[f"{key}/v.v"] = Array(dtype="object", shape=values.shape, stype=RAW, data=values.tobytes())
    elif how == "layer":
        meta["0/p/dense/layers"] = [*meta["0/p/dense/layers"], "not.a.layer"]
    elif how == "dims":  # more dimensions than NumPy can hold: a WireError, not NumPy's ValueError
        arrays[f"{key}/v.v"] = Array(dtype="float32", shape=(len(dense), values.shape[1]) + (1,) * 98, stype=RAW,
                                     data=values.tobytes())
    elif how == "empty":  # no bytes, but sizes past NumPy's index range (Flower's shapes are int32)
        arrays[f"{key}/v.v"] = Array(dtype="float32", shape=(len(dense), 0) + (2 ** 31 - 1,) * 3, stype=RAW, data=b"")
    else:
        meta[f"{key}/arrays"] = [f"v{n}" for n in range(9)]
    got = read(algo, table, arrays, meta)
    assert got.rejected.keys() == set(dense) and all(why.startswith("payload: ") for why in got.rejected.values())
    assert sorted(got.replies) == sorted(uplink) and got.failed == {}
    assert [p.clients for p in got.proposed] == [CLIENTS]


@pytest.mark.parametrize("round_", [ROUND - 1, ROUND + 1, -1, "2", True])
def test_a_run_for_another_round_is_rejected(round_):
    algo, table, results = world(ALGORITHMS[1], run=2)
    arrays, meta = results_to_records(results, algo.derived)
    meta["1/round"] = round_
    got = read(algo, table, arrays, meta)
    assert {2, 3} <= got.rejected.keys() and all("round" in why for why in got.rejected.values())
    assert not {2, 3} & set(got.replies)


@pytest.mark.parametrize("how", ["no records", "runs", "clients", "foreign client", "repeated client", "group"])
def test_an_unreadable_layout_rejects_the_block(how):
    algo, table, results = world(ALGORITHMS[0], run=2)
    arrays, meta = results_to_records(results, algo.derived)
    if how == "no records":
        arrays = None
    elif how == "runs":
        meta["runs"] = 99
    elif how == "clients":
        meta["0/clients"] = ["0", "1"]
    elif how == "foreign client":
        meta["2/clients"] = [4, 6]
    elif how == "repeated client":
        meta["2/clients"] = [0, 1]
    else:
        meta["0/groups"] = ["dense", "sideways"]
    got = read(algo, table, arrays, meta)
    assert got.rejected.keys() == set(CLIENTS) and got.replies == {} and got.proposed == []


@pytest.mark.parametrize("how", ["array", "payload array", "metric", "layer header", "run"])
def test_a_key_the_server_does_not_expect_rejects_the_block(how):
    """Nothing a reply holds goes unread: an extra array (beside a layer's listed ones, too), metric, header
    or a run beyond ``runs`` is a reply of another layout, and none of its clients' payloads is taken."""
    algo, table, results = world(ALGORITHMS[0], run=2 if how == "run" else None)
    arrays, meta = results_to_records(results, algo.derived)
    key = _dense_layer(meta) if how != "run" else None
    if how == "array":
        arrays["junk"] = to_array(np.zeros(3, np.float32))
    elif how == "payload array":
        arrays[f"{key}/extra"] = to_array(np.zeros((len(meta["0/p/dense/rows"]), 2), np.float32))
    elif how == "metric":
        meta["0/gossip"] = [1.0, 2.0]
    elif how == "layer header":
        meta[f"{key}/m/seed"] = [0] * len(meta["0/p/dense/rows"])
    else:
        meta["runs"] = len(results) - 1  # the last run's records are there, unannounced
    got = read(algo, table, arrays, meta)
    assert got.rejected.keys() == set(CLIENTS) and got.replies == {} and got.proposed == []
    assert all("does not expect" in why for why in got.rejected.values())


def test_a_payload_group_of_no_rows_rejects_the_block():
    """A listed group must hold clients: a failing group of no rows rejected nobody and let every key under
    its prefix go unread (a review found it)."""
    algo, table, results = world(ALGORITHMS[0])
    arrays, meta = results_to_records(results, algo.derived)
    meta["0/p/dense/rows"], meta["0/p/dense/layers"], meta["0/p/dense/hidden"] = [], ["nope"], [1, 2, 3]
    got = read(algo, table, arrays, meta)
    assert got.rejected.keys() == set(CLIENTS) and all("lists no rows" in why for why in got.rejected.values())


def test_clients_the_reply_does_not_cover_fail():
    algo, table, results = world(ALGORITHMS[1], run=2)
    arrays, meta = results_to_records(results[:2], algo.derived)
    got = read(algo, table, arrays, meta)
    assert got.failed.keys() == {4, 5} and sorted(got.replies) == [0, 1, 2, 3] and got.rejected == {}


def test_a_client_both_failed_and_rejected_counts_once_as_rejected():
    """A node that lists a row as failed and proposes a NaN state for it: the client is rejected, and not
    also failed (the round's counts would add up to more than its participants)."""
    algo, table, results = world(ALGORITHMS[1], run=2)
    res = results[1]
    res.failed = {0: "ArithmeticError: inexact"}
    res.groups = without_row(res.groups, 0)
    arrays, meta = results_to_records(results, algo.derived)
    path, _ = _columns(table)
    column = flatten(res.state)[path].clone()
    column[0].view(-1)[0] = float("nan")
    arrays[f"1/s/{path}"] = to_array(column)
    got = read(algo, table, arrays, meta)
    assert got.rejected.keys() == {2} and got.failed == {}
    arrays, meta = results_to_records(results, algo.derived)
    arrays[f"1/s/{path}"] = to_array(column[:, :1])  # the whole run's state does not fit
    got = read(algo, table, arrays, meta)
    assert got.rejected.keys() == {2, 3} and got.failed == {}


class Walked(ArrayRecord):
    """An ArrayRecord that counts the walks over its keys."""

    walks = 0

    def keys(self):
        Walked.walks += 1
        return super().keys()

    def __iter__(self):
        Walked.walks += 1
        return super().__iter__()


def test_the_reader_walks_the_keys_once_whatever_the_number_of_runs():
    """Counting each run's state columns by a walk over every key made a block of many runs quadratic: a
    node of 1,000 runs and as many arrays as they may hold took the server 17 s to read, every round."""
    algo, table, results = world(ALGORITHMS[1], run=1)
    arrays, meta = results_to_records(results, algo.derived)
    walked = Walked()
    for key in arrays:
        walked[key] = arrays[key]
    Walked.walks = 0
    got = read(algo, table, walked, meta)
    assert len(results) >= 5 and sorted(got.replies) == CLIENTS
    assert Walked.walks == 1


@pytest.mark.parametrize("algorithm", [
    {"name": "gluon-ef21-sarah", "refresh_prob": 0.5, "compressor": {"name": "topk", "ratio": 0.2}},
    {"name": "ef21-muon-bidir", "beta": 0.5, "nesterov": True, "state_dtype": "float16"},
    {"name": "gluon-dasha-mvr"}, {"name": "fedavg", "error_feedback": "ef14"},
])
def test_a_run_leaves_every_reply_byte_as_it_came(monkeypatch, tmp_path, algorithm):
    """The server reads replies where they lie: proposed state columns and payload arrays are views of the
    received (immutable) ``bytes``, which torch cannot refuse to write into. A run (in-process Flower grid,
    blocks of 3, partial participation, a checkpoint each round) must leave every reply's bytes as they came."""
    import hashlib

    from fedgluon.flower import client_app
    from fedgluon.flower.engines import run_inprocess
    from fedgluon.sim.checkpoint import Checkpointer

    sent = []
    real = client_app.make_client_app

    def make_recording_app(spec):
        app = real(spec)

        def recording(msg, context):
            reply = app(msg, context)
            if msg.metadata.message_type == "train":
                arrays = reply.content["replies"]
                sent.append((arrays, {k: hashlib.sha256(arrays[k].data).digest() for k in arrays}))
            return reply

        return recording

    monkeypatch.setattr(client_app, "make_client_app", make_recording_app)
    strategy = run_inprocess({"task": TASK, "rounds": 4, "seed": 2, "block_size": 3, "participation": 0.7,
                              "algorithm": {"lr": 0.05, **algorithm}},
                             checkpointer=Checkpointer(tmp_path / "ckpt.pt", every=1))
    assert sum(row["accepted"] for row in strategy.history) > 4 and len(sent) >= 4
    assert all(hashlib.sha256(arrays[k].data).digest() == digest for arrays, digests in sent
               for k, digest in digests.items())
