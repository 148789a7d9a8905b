"""Column-packed block records (strategies/records.py): states and replies of clients with different
layouts round-trip through groups, and a broken group rejects its own clients only."""

import json

import numpy as np
import pytest
import torch

from compressors import PayloadError, compress_message, make_compressor
from fedgluon.algorithms import ClientReply
from packed_edit import PackedEdit
from strategies.records import BlockReplies, Unpacker, record_to_states, replies_to_record, states_to_record


def tree_equal(a, b) -> bool:
    if a is None or b is None:
        return a is b
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(tree_equal(a[k], b[k]) for k in a)
    return a.dtype == b.dtype and torch.equal(a, b)


def heterogeneous_states():
    model = {"w": torch.randn(4, 3)}  # x_prev of every client: one tensor
    same = lambda j: {"est": {"m": torch.full((4, 3), float(j))}, "x_prev": dict(model),  # noqa: E731
                      "commits": torch.tensor(j)}
    return model, {
        7: same(7), 2: same(2), 5: None,
        9: {"est": {"m": torch.ones(2, 2)}, "x_prev": dict(model), "commits": torch.tensor(1)},  # another shape
        4: {"ef": {"q": torch.arange(6, dtype=torch.int16)}, "comp": {}, "m": torch.randn(3).to(torch.bfloat16)},
        8: same(8),
    }


def test_states_of_different_layouts_round_trip_in_groups():
    model, states = heterogeneous_states()
    record = states_to_record(states)
    layout = Unpacker(record).layout
    assert layout["clients"] == list(states)
    assert sorted(len(g["rows"]) for g in layout["states"]) == [1, 1, 1, 3]  # 7, 2, 8 share a layout
    back = record_to_states(record)
    assert list(back) == list(states)
    for j in states:
        assert tree_equal(back[j], states[j]), j
    # x_prev is written once for the whole block (both groups that hold it refer to the same bytes)
    refs = {json.dumps(leaf[1]) for g in layout["states"] for leaf in (g["leaves"] or []) if leaf[0] == "x_prev/w"}
    assert len(refs) == 1
    assert len({back[j]["x_prev"]["w"].data_ptr() for j in (7, 2, 9, 8)}) == 1
    assert back[7]["x_prev"]["w"] is back[2]["x_prev"]["w"]  # one tensor per group, as sent


def replies_for(states):
    topk, seeded = make_compressor({"name": "topk", "ratio": 0.25}), make_compressor({"name": "randk_seeded", "ratio": 0.5})
    results = {}
    for n, j in enumerate(states):
        C = seeded if j == 9 else topk  # client 9: another codec and a header (seed) per layer
        msg, _ = compress_message(C, {"a": torch.randn(4, 3), "b": torch.randn(5)}, (0, j, 3))
        results[j] = (states[j], ClientReply(j, 3, msg, loss=0.25 * n, grad_evals=2, samples=10 + n))
    return results


def test_replies_of_different_layouts_parse_per_client():
    _, states = heterogeneous_states()
    results = replies_for(states)
    block = BlockReplies(replies_to_record(results))
    assert block.error is None
    for j, (state, sent) in results.items():
        reply, proposed = block.parse(j)
        assert (reply.client, reply.round, reply.loss, reply.grad_evals, reply.samples) == \
               (sent.client, sent.round, sent.loss, sent.grad_evals, sent.samples)
        assert tree_equal(proposed, state)
        for layer, p in sent.message.items():
            q = reply.message[layer]
            assert (q.codec, q.shape, q.meta) == (p.codec, p.shape, p.meta)
            assert q.arrays.keys() == p.arrays.keys()
            assert all(np.array_equal(q.arrays[k], a) and q.arrays[k].dtype == a.dtype for k, a in p.arrays.items())
    with pytest.raises(PayloadError, match="no entry for client 3"):
        block.parse(3)


class _Content(dict):
    @property
    def array_records(self):
        return self


def test_a_broken_group_rejects_its_clients_and_a_broken_layout_the_block():
    _, states = heterogeneous_states()
    content = _Content(replies=replies_to_record(replies_for(states)))
    edit = PackedEdit(content)
    layers, _ = edit.layers(7)  # the group of 7, 2, 8 (and 5, 4: same payload layout)
    column = layers["a"]["arrays"]["v.v"]
    layers["a"]["arrays"]["v.v"] = edit.append(edit.array(column)[:-1])  # one row short
    edit.save()
    block = BlockReplies(content["replies"])
    group = {edit.layout["clients"][r] for r in edit.group(7, "payloads")[0]["rows"]}
    assert group == {7, 2, 5, 4, 8}
    for j in group:
        with pytest.raises(PayloadError, match="rows"):
            block.parse(j)
    block.parse(9)  # another group: untouched

    edit.layout["payloads"][0]["rows"].append(edit.layout["payloads"][1]["rows"][0])  # a row in two groups
    edit.save()
    block = BlockReplies(content["replies"])
    assert block.error is not None
    for j in states:
        with pytest.raises(PayloadError):
            block.parse(j)


def test_records_pickle_their_bytes_out_of_band_and_round_trip():
    """Block records hold RawArrays: under pickle protocol 5 (what Ray uses between Flower's engine and its
    actors) their bytes travel as out-of-band buffers, and what comes back is a RawArray with the same
    bytes, which reads back to the same states."""
    import pickle

    from strategies.records import RawArray, tensors_to_record

    model, states = heterogeneous_states()
    record = states_to_record(states)
    assert all(isinstance(record[key], RawArray) for key in record.keys())
    assert all(isinstance(a, RawArray) for a in tensors_to_record(model).values())
    buffers = []
    stream = pickle.dumps(record, protocol=5, buffer_callback=buffers.append)
    data = record["data"].data
    assert any(bytes(memoryview(b)) == data for b in buffers) and data not in stream
    back = pickle.loads(stream, buffers=buffers)
    assert isinstance(back["data"], RawArray) and back["data"].data == data
    got = record_to_states(back)
    assert all(tree_equal(got[j], states[j]) for j in states)


def test_raw_arrays_deflate_and_inflate_as_flower_arrays():
    """Flower's deployment path deflates objects under their class's qualified name and inflates them by
    it in processes without fedgluon: a RawArray must travel as an ``Array``."""
    from flwr.app import Array
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    _, states = heterogeneous_states()
    record = states_to_record(states)
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(record).items()}
    back = inflate_object_from_contents(record.object_id, contents)
    assert type(back["data"]) is Array and back["data"].data == record["data"].data
    assert all(tree_equal(record_to_states(back)[j], states[j]) for j in states)


def _in_buffer(t, block: BlockReplies) -> bool:
    start = block.unpacker.buffer.ctypes.data
    return start <= t.data_ptr() < start + block.unpacker.buffer.nbytes


def _leaves(tree):
    return [t for v in tree.values() for t in (_leaves(v) if isinstance(v, dict) else [v])]


def test_committed_states_stay_columns_only_while_their_whole_block_holds_them():
    """strategies.columns.StateColumns: a reply whose clients all hold its views is kept and sends them
    back as they came (the same states as packing them again); one only some hold has those copied out
    (no view of its buffer left, x_prev still one tensor); one nobody holds is forgotten."""
    from strategies.columns import StateColumns

    model = {"w": torch.randn(4, 3)}
    states = {j: {"est": {"m": torch.full((4, 3), float(j))}, "x_prev": dict(model), "commits": torch.tensor(j)}
              for j in (2, 3, 4)}
    columns, committed = StateColumns(), {}
    blocks = []
    for clients in ((2, 3), (4,)):
        block = BlockReplies(replies_to_record({j: (states[j], replies_for({j: None})[j][1]) for j in clients}),
                             views=True)
        proposed = {j: block.parse(j)[1] for j in clients}
        assert all(_in_buffer(t, block) for j in clients for t in _leaves(proposed[j]))
        committed.update(proposed)
        columns.offer(block, proposed)
        blocks.append(block)
    columns.settle(committed)
    for clients, block in zip(((2, 3), (4,)), blocks):
        record = columns.record_for(list(clients), committed)
        assert record is not None and Unpacker(record).layout["clients"] == list(clients)
        assert record["data"].data is block.unpacker.data  # the bytes as received, not a copy
        back = record_to_states(record)
        again = record_to_states(states_to_record({j: committed[j] for j in clients}))
        assert all(tree_equal(back[j], again[j]) and tree_equal(back[j], states[j]) for j in clients)
    assert columns.record_for([3, 2], committed) is None  # another order: another record

    committed[3] = {"commits": torch.tensor(9)}  # client 3 moves on, client 2 was not sampled
    committed[4] = {"commits": torch.tensor(7)}
    columns.settle(committed)
    assert columns.held == {} and columns.record_for([2, 3], committed) is None
    assert tree_equal(committed[2], states[2])
    assert not any(_in_buffer(t, blocks[0]) for t in _leaves(committed[2]))

    # a block with a rejected client: the accepted ones are copied out at once, x_prev still shared
    block = BlockReplies(replies_to_record({j: (states[j], replies_for({j: None})[j][1]) for j in (2, 3, 4)}),
                         views=True)
    proposed = {j: block.parse(j)[1] for j in (2, 3, 4)}
    committed.update({j: proposed[j] for j in (2, 3)})  # 4 rejected: keeps its state
    columns.offer(block, proposed)
    columns.settle(committed)
    assert columns.held == {}
    assert not any(_in_buffer(t, block) for j in (2, 3) for t in _leaves(committed[j]))
    assert committed[2]["x_prev"]["w"] is committed[3]["x_prev"]["w"]
    assert all(tree_equal(committed[j], states[j]) for j in (2, 3))


def _packed(pack, items):
    from strategies.records import Packer

    packer = Packer()
    layout = pack(packer, items)
    return layout, (b"".join(packer.chunks) if layout is not None else packer.size)


def test_uniform_blocks_pack_as_the_grouped_path_does_and_anything_else_falls_back():
    from strategies.records import (_pack_grouped_payloads, _pack_grouped_trees, _pack_uniform_payloads,
                                    _pack_uniform_trees)

    model = {"w": torch.randn(4, 3)}
    states = [{"est": {"m": {"w": torch.randn(4, 3), "b": torch.randn(3)}}, "comp": {}, "x_prev": dict(model),
               "commits": torch.tensor(j)} for j in range(5)]
    assert _packed(_pack_uniform_trees, states) == _packed(_pack_grouped_trees, states)
    results = replies_for({j: None for j in (1, 2, 3)})
    messages = [reply.message for _, reply in results.values()]
    assert _packed(_pack_uniform_payloads, messages) == _packed(_pack_grouped_payloads, messages)
    # every way a block can differ from its first tree or message: the fast path writes nothing
    swapped = {"comp": {}, "est": states[1]["est"], "x_prev": dict(model), "commits": torch.tensor(1)}
    for odd in (swapped, None, {**states[1], "comp": {"s": torch.ones(1)}}, {**states[1], "commits": torch.tensor(1.0)},
                {**states[1], "est": {"m": {"w": torch.randn(4, 3), "b": torch.randn(4)}}},
                {**states[1], "est": {"m": {"w": torch.randn(4, 3)}}}, {**states[1], "x_prev": model["w"]}):
        assert _packed(_pack_uniform_trees, [states[0], odd, states[2]]) == (None, 0)
    assert _packed(_pack_uniform_trees, states[:1]) == (None, 0)
    mixed = replies_for({j: None for j in (1, 9, 3)})  # client 9: another codec, with a header
    assert _packed(_pack_uniform_payloads, [reply.message for _, reply in mixed.values()]) == (None, 0)
    assert _packed(_pack_uniform_payloads, [messages[0], {"b": messages[1]["b"], "a": messages[1]["a"]}]) == (None, 0)


@pytest.mark.parametrize("algorithm", [
    {"name": "gluon-ef21-sarah", "refresh_prob": 0.5, "compressor": {"name": "topk", "ratio": 0.2}},
    {"name": "ef21-muon-bidir", "beta": 0.5, "nesterov": True, "state_dtype": "float16"},
])
def test_a_run_leaves_the_reply_bytes_its_committed_states_are_views_of_as_they_came(monkeypatch, tmp_path,
                                                                                      algorithm):
    """The server reads a block's reply where it lies (Unpacker with copy=False: no copy on receipt,
    none to send the states back) and keeps committed states as read-only views of those bytes. Torch
    cannot refuse a write into such a view, so a run (in-process Flower grid, every client committed
    and re-sent as it came, a checkpoint each round) must leave every reply's bytes as they arrived."""
    import hashlib

    import strategies.strategy as strategy_module
    from fedgluon.checkpoint import Checkpointer
    from fedgluon.engines import run_inprocess

    seen = []

    class Recorded(BlockReplies):
        def __init__(self, record, views=False, files=None, schema=None):
            super().__init__(record, views, files, schema)
            if self.error is None:
                seen.append((self, hashlib.sha256(self.unpacker.data).digest()))

    resent = []
    states_record = BlockReplies.states_record
    monkeypatch.setattr(strategy_module, "BlockReplies", Recorded)
    monkeypatch.setattr(BlockReplies, "states_record", lambda self: resent.append(self) or states_record(self))
    task = {"name": "synthetic", "num_clients": 6, "dim": 8, "classes": 3, "hidden": [8], "mean_samples": 20,
            "batch_size": 12}
    strategy = run_inprocess({"task": task, "rounds": 4, "seed": 2, "block_size": 3,
                              "algorithm": {"lr": 0.05, **algorithm}},
                             checkpointer=Checkpointer(tmp_path / "ckpt", every=1))
    assert len(seen) == 8 and len(resent) == 6  # 2 blocks a round; rounds 2-4 re-send the bytes that came
    assert not any(block.unpacker.buffer.flags.writeable for block, _ in seen)
    assert all(np.shares_memory(block.unpacker.buffer, np.frombuffer(block.unpacker.data, np.uint8))
               for block, _ in seen)
    assert all(hashlib.sha256(block.unpacker.data).digest() == digest for block, digest in seen)
    assert strategy.columns.held  # the last round's states are still held as views
