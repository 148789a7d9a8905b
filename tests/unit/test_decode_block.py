"""Server-side decoding of many clients at once equals decoding them one by one.

``decode_messages`` checks and decodes the rows of one payload group (``RowMessage``s, as a block's
reply arrives) a chunk at a time; it must accept exactly the messages ``decode_message`` accepts,
decode them to the same tensors and reject the others with the same error, whether the bad message is
a row of the group or a message of its own. ``WeightedSum`` adds runs of such rows in one
``index_add_``; it must equal adding the clients one after another bitwise.
"""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compressors import PayloadError, TensorPayload, decode_message, decode_messages, make_compressor
from compressors import message as messages_module
from compressors.message import compress_block
from compressors.payload import RowMessage
from compressors.sparse import SparseTensor, WeightedSum, add_scaled_

SHAPES = {"w": (30, 20), "b": (30,), "c": (7,)}
BLOCK_SPECS = [{"name": "topk", "ratio": 0.1}, {"name": "randk", "ratio": 0.2},
               {"name": "topk", "ratio": 0.3, "values": "fp64"}]


def messages_of(spec, count, seed=0):
    """``count`` clients' messages as the rows of one payload group (one ``compress_block``)."""
    C = make_compressor(spec)
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.float64 if spec.get("values") == "fp64" else torch.float32
    layers, _ = compress_block(C, {n: torch.randn(count, *s, generator=gen, dtype=dtype) for n, s in SHAPES.items()},
                               [(seed, j, 0) for j in range(count)])
    return C, {j: RowMessage(layers, j) for j in range(count)}


def one_by_one(C, messages, dtype, sparse):
    out = {}
    for j, m in messages.items():
        try:
            out[j] = decode_message(C, m, SHAPES, dtype=dtype, sparse=sparse)
        except PayloadError as err:
            out[j] = err
    return out


def assert_same(block, reference):
    assert list(block) == list(reference)
    for j, want in reference.items():
        got = block[j]
        if isinstance(want, PayloadError):
            assert type(got) is type(want) and str(got) == str(want), (j, got, want)
            continue
        assert not isinstance(got, PayloadError), (j, got)
        assert set(got) == set(want)
        for n in want:
            a, b = got[n], want[n]
            assert type(a) is type(b)
            if isinstance(a, SparseTensor):
                assert torch.equal(a.idx, b.idx) and a.values.dtype == b.values.dtype
                assert torch.equal(a.values, b.values)
                assert a.shape == b.shape
            else:
                assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("spec", BLOCK_SPECS)
@pytest.mark.parametrize("sparse", [True, False])
def test_valid_round_takes_the_block_path(spec, sparse):
    C, messages = messages_of(spec, 9)
    dtype = torch.float64 if spec.get("values") == "fp64" else torch.float32
    block = dict(decode_messages(C, messages, SHAPES, dtype=dtype, sparse=sparse))
    assert_same(block, one_by_one(C, messages, dtype, sparse))
    if sparse:  # every layer of every client is a row of one decoded block, rows in client order
        for n in SHAPES:
            rows = {id(block[j][n].block) for j in messages}
            assert len(rows) == 1 and [block[j][n].row for j in messages] == list(range(9))


def _edit(msg, layer, key, value):
    p = msg[layer]
    arrays = dict(p.arrays)
    if value is None:
        arrays.pop(key, None)
    else:
        arrays[key] = value
    return {**msg, layer: TensorPayload(p.codec, p.shape, arrays, dict(p.meta))}


def _replace(msg, layer, **fields):
    p = msg[layer]
    return {**msg, layer: TensorPayload(fields.get("codec", p.codec), fields.get("shape", p.shape),
                                        dict(p.arrays), dict(fields.get("meta", p.meta)))}


class Sub(np.ndarray):
    pass


def corruptions(msg):
    """One edit per way a payload can differ from what the block path expects."""
    idx, vals = msg["w"].arrays["idx"], msg["w"].arrays["v.v"]
    return [
        _edit(msg, "w", "idx", idx[::-1].copy()),                                       # unsorted
        _edit(msg, "w", "idx", np.concatenate([idx[:1], idx[:-1]])),                    # duplicate
        _edit(msg, "w", "idx", np.where(np.arange(idx.size) == idx.size - 1, 600, idx).astype(np.int32)),  # range
        _edit(msg, "w", "idx", np.where(np.arange(idx.size) == 0, -1, idx.astype(np.int32))),
        _edit(msg, "w", "idx", idx.astype(np.int64)),                                   # another (valid) dtype
        _edit(msg, "w", "idx", idx.astype(np.float32)),                                 # invalid dtype
        _edit(msg, "w", "idx", idx.astype(idx.dtype.newbyteorder(">"))),                # big-endian
        _edit(msg, "w", "idx", idx.view(Sub)),                                          # ndarray subclass
        _edit(msg, "w", "idx", idx[:-1]),                                               # truncated
        _edit(msg, "w", "idx", None),                                                   # missing
        _edit(msg, "w", "idx", list(idx)),                                              # not an array
        _edit(msg, "w", "extra", idx),                                                  # extra key
        _edit(msg, "w", "v.v", np.where(np.arange(vals.size) == 3, np.nan, vals).astype(vals.dtype)),
        _edit(msg, "w", "v.v", np.full_like(vals, -np.inf)),
        _edit(msg, "w", "v.v", vals.astype(np.float16)),
        _edit(msg, "w", "v.v", vals.reshape(1, -1)),
        _edit(msg, "w", "v.v", np.zeros(10 ** 5, vals.dtype)),                         # oversized
        _replace(msg, "w", shape=(20, 30)),
        _replace(msg, "w", shape=[30, 20]),                                            # a list: still valid
        _replace(msg, "w", shape=(np.int64(30), 20)),
        _replace(msg, "w", codec="dense/fp32"),
        _replace(msg, "w", meta={"seed": 1}),
        {**msg, "w": "not a payload"},
        {"w": msg["w"], "b": msg["b"]},                                                 # missing layer
        {**msg, "evil": msg["b"]},
        "not a message",
    ]


@pytest.mark.parametrize("spec", BLOCK_SPECS)
@pytest.mark.parametrize("sparse", [True, False])
def test_every_corruption_gets_the_one_by_one_verdict(spec, sparse):
    C, clean = messages_of(spec, 4, seed=1)
    bad = corruptions(clean[0])
    messages = {j: m for j, m in enumerate([clean[1], *bad, clean[2], clean[3]])}
    dtype = torch.float64 if spec.get("values") == "fp64" else torch.float32
    block = dict(decode_messages(C, messages, SHAPES, dtype=dtype, sparse=sparse))
    reference = one_by_one(C, messages, dtype, sparse)
    assert_same(block, reference)
    assert sum(isinstance(v, PayloadError) for v in reference.values()) >= len(bad) - 6  # the test rejects most


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=st.sampled_from(BLOCK_SPECS), picks=st.lists(st.integers(0, 40), min_size=1, max_size=8),
       sparse=st.booleans())
def test_random_mixes_of_clean_and_corrupt_messages(spec, picks, sparse):
    C, clean = messages_of(spec, 3, seed=2)
    pool = [*clean.values(), *corruptions(clean[0])]
    messages = {j: pool[p % len(pool)] for j, p in enumerate(picks)}
    dtype = torch.float64 if spec.get("values") == "fp64" else torch.float32
    assert_same(dict(decode_messages(C, messages, SHAPES, dtype=dtype, sparse=sparse)),
                one_by_one(C, messages, dtype, sparse))


def _row_edits(rows):
    """One edit of row 1's arrays per way a row of a group can fail a check the others pass."""
    idx, vals = rows.arrays["idx"], rows.arrays["v.v"]

    def edit(key, change):
        arrays = {k: a.copy() for k, a in rows.arrays.items()}
        change(arrays[key][1])
        return type(rows)(rows.codec, rows.shape, arrays, dict(rows.meta))

    def reverse(r):
        r[:] = r[::-1].copy()

    return [edit("idx", reverse), edit("idx", lambda r: r.__setitem__(1, r[0])),
            edit("idx", lambda r: r.__setitem__(-1, 600)), edit("v.v", lambda r: r.__setitem__(3, np.nan)),
            edit("v.v", lambda r: r.__setitem__(0, np.inf)), edit("v.v", lambda r: r.__setitem__(2, 1e30))] \
        if idx.shape[1] > 2 and vals.dtype.kind == "f" else []


@pytest.mark.parametrize("spec", BLOCK_SPECS)
def test_a_bad_row_of_a_group_gets_the_one_by_one_verdict(spec):
    """A row of a group that fails a check fails its chunk, which is then decoded message by message:
    that row gets its own error (a value over ``max_abs`` too), the other rows their tensors."""
    C, clean = messages_of(spec, 4, seed=4)
    layers = clean[0].layers
    dtype = torch.float64 if spec.get("values") == "fp64" else torch.float32
    edits = _row_edits(layers["w"])
    assert edits
    for rows in edits:
        bad = {**layers, "w": rows}
        messages = {j: RowMessage(bad, j) for j in range(4)}
        got = dict(decode_messages(C, messages, SHAPES, dtype=dtype, sparse=True, max_abs=1e20))
        want = {}
        for j, m in messages.items():
            try:
                want[j] = decode_message(C, m, SHAPES, dtype=dtype, sparse=True, max_abs=1e20)
            except PayloadError as err:
                want[j] = err
        assert_same(got, want)
        assert isinstance(got[1], PayloadError) and not any(isinstance(got[j], PayloadError) for j in (0, 2, 3))


@pytest.mark.parametrize("spec", ["identity", "qsgd", {"name": "topk", "ratio": 0.1, "values": "fp16"},
                                  {"name": "svd", "rank": 2}, {"name": "randk", "ratio": 0.2}])
def test_every_compressor_decodes_groups_in_chunks_as_one_by_one(spec, monkeypatch):
    """Dense decoded layers are decoded a chunk of rows at a time (here 2 rows of dense bytes), sparse
    ones all at once; either way every row equals its message decoded alone."""
    monkeypatch.setattr(messages_module, "CHUNK_BYTES", 2 * 4 * sum(int(np.prod(s)) for s in SHAPES.values()))
    chunks = []
    real = messages_module._decode_chunk
    monkeypatch.setattr(messages_module, "_decode_chunk",
                        lambda C, ms, *a, **k: chunks.append(len(ms)) or real(C, ms, *a, **k))
    alone = []
    single = messages_module.decode_message
    monkeypatch.setattr(messages_module, "decode_message",
                        lambda C, m, *a, **k: alone.append(1) or single(C, m, *a, **k))
    C, messages = messages_of(spec if isinstance(spec, dict) else {"name": spec}, 5)
    for sparse in (False, True):
        chunks.clear()
        assert_same(dict(decode_messages(C, messages, SHAPES, sparse=sparse)),
                    one_by_one(C, messages, torch.float32, sparse))
        all_sparse = sparse and all(C.sparse_rows(s) for s in SHAPES.values())
        assert chunks == ([5] if all_sparse else [2, 2, 1]) and not alone  # decoded in chunks, none alone


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weighted_sum_equals_adding_one_client_at_a_time(dtype):
    """Runs of block rows (broken by a re-decoded client, a dense term and a gap) give bitwise the sums of
    ``add_scaled_`` client by client, in the same order."""
    spec = {"name": "topk", "ratio": 0.5, "values": "fp64" if dtype == torch.float64 else "fp32"}
    C = make_compressor(spec)
    gen = torch.Generator().manual_seed(3)
    scales = torch.logspace(-6, 6, 12, dtype=torch.float64)
    w = (torch.randn(12, 40, generator=gen, dtype=torch.float64) * scales[:, None]).to(dtype)
    layers, _ = compress_block(C, {"w": w}, [(0, j, 0) for j in range(12)])
    messages = {j: RowMessage(layers, j) for j in range(12)}
    decoded = dict(decode_messages(C, messages, {"w": (40,)}, dtype=dtype, sparse=True))
    decoded[5] = decode_message(C, messages[5], {"w": (40,)}, dtype=dtype, sparse=True)  # not a block row
    decoded[8] = {"w": decoded[8]["w"].dense()}
    del decoded[10]
    weights = {j: float(w) for j, w in enumerate(torch.rand(12, generator=gen, dtype=torch.float64))}
    start = torch.randn(40, generator=gen, dtype=dtype)
    reference = start.clone()
    for j in sorted(decoded):
        add_scaled_(reference, weights[j], decoded[j]["w"])
    total = WeightedSum({"w": start.clone()})
    for j in sorted(decoded):
        total.add(weights[j], decoded[j])
    assert torch.equal(total.result()["w"], reference)
    fresh = WeightedSum()  # outputs start at zero
    for j in sorted(decoded):
        fresh.add(weights[j], decoded[j])
    zero = torch.zeros(40, dtype=dtype)
    for j in sorted(decoded):
        add_scaled_(zero, weights[j], decoded[j]["w"])
    assert torch.equal(fresh.result()["w"], zero)


def test_blocks_of_one_client_decode_together(monkeypatch):
    """Blocks of one client (the plain loop, one client per node) each send a group of one row: groups of
    one layout are stacked and decoded in one chunk, each row equal to its message decoded alone; a row
    with NaN sends its chunk message by message, where only that row fails."""
    spec = {"name": "topk", "ratio": 0.1}
    groups = [messages_of(spec, 1, seed=s) for s in range(5)]
    C, messages = groups[0][0], {j: group[1][0] for j, group in enumerate(groups)}
    chunks = []
    real = messages_module._decode_chunk
    monkeypatch.setattr(messages_module, "_decode_chunk",
                        lambda C, ms, *a, **k: chunks.append(len(ms)) or real(C, ms, *a, **k))
    assert_same(dict(decode_messages(C, messages, SHAPES, sparse=True)), one_by_one(C, messages, torch.float32, True))
    assert chunks == [5]
    _, pair = messages_of(spec, 2, seed=9)  # a group of 2 whose second row holds a NaN joins their layout
    nan = _row_edits(pair[0].layers["w"])[3]
    messages[5] = RowMessage({**pair[0].layers, "w": nan}, 1)
    got = dict(decode_messages(C, messages, SHAPES, sparse=True))
    assert_same(got, one_by_one(C, messages, torch.float32, True))
    assert isinstance(got[5], PayloadError) and not any(isinstance(got[j], PayloadError) for j in range(5))
