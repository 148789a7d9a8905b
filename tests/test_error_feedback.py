"""EF21 / EF14 identities in float64."""

import pytest
import torch

from compressors import EF14, EF21, decode_message, ef21_server_update, make_compressor


def client_inputs(rounds, clients, shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    drift = {j: {n: torch.randn(s, generator=gen, dtype=torch.float64) for n, s in shapes.items()} for j in clients}
    for r in range(rounds):
        yield {j: {n: drift[j][n] * (1 + 0.1 * r) + 0.3 * torch.randn(s, generator=gen, dtype=torch.float64)
                   for n, s in shapes.items()} for j in clients}


SHAPES = {"w": (12, 9), "b": (12,)}


def test_ef21_identity_tracker_equals_input():
    ef = EF21(make_compressor({"name": "identity", "values": "fp64"}))
    state = None
    for r, v in enumerate(client_inputs(30, [0], SHAPES)):
        _, state, _ = ef.step(state, v[0], (0, 0, r))
        for n in SHAPES:
            torch.testing.assert_close(state["g"][n], v[0][n], rtol=1e-12, atol=0)


@pytest.mark.parametrize("tracker, spec", [("full", {"name": "topk", "ratio": 0.1, "values": "fp64"}),
                                           ("full", {"name": "randk", "ratio": 0.2}),
                                           ("full", {"name": "powersgd", "rank": 2, "min_compression_rate": 1.0}),
                                           ("fixed16", {"name": "topk", "ratio": 0.1})])
def test_ef21_server_aggregate_equals_mean_of_client_trackers(tracker, spec):
    """Server G += mean_j decoded(R_j) (decoding the payloads itself) equals mean_j g_j every round."""
    clients = list(range(5))
    C = make_compressor(spec)
    ef = EF21(C, tracker=tracker)
    states = {j: None for j in clients}
    cstates = {j: None for j in clients}
    G = {n: torch.zeros(s, dtype=torch.float64) for n, s in SHAPES.items()}
    for r, v in enumerate(client_inputs(30, clients, SHAPES)):
        decoded = {}
        for j in clients:
            msg, states[j], cstates[j] = ef.step(states[j], v[j], (0, j, r), cstates[j])
            decoded[j] = decode_message(C, msg, SHAPES, dtype=torch.float64)  # what the server sees
        G = ef21_server_update(G, decoded, {j: 1 / len(clients) for j in clients})
        for n in SHAPES:
            mean = sum(ef.tracker_values(states[j], v[j])[n] for j in clients) / len(clients)
            torch.testing.assert_close(G[n], mean, rtol=1e-12, atol=1e-14)


def test_ef21_topk_tracker_converges_to_fixed_input():
    ef = EF21(make_compressor({"name": "topk", "ratio": 0.1, "values": "fp64"}))
    v = {"w": torch.randn(20, 10, dtype=torch.float64)}
    state, errs = None, []
    for r in range(40):
        _, state, _ = ef.step(state, v, (0, 0, r))
        errs.append(float((state["g"]["w"] - v["w"]).norm() / v["w"].norm()))
    # contraction: ‖g − v‖² ≤ (1−α)^r ‖v‖² with α = 0.1
    assert all(e ** 2 <= 0.9 ** (r + 1) * (1 + 1e-9) for r, e in enumerate(errs))


def test_fixed16_tracker_stays_close_to_full_precision():
    full, fixed = (EF21(make_compressor({"name": "topk", "ratio": 0.2}), tracker=t) for t in ("full", "fixed16"))
    s1 = s2 = None
    for r, v in enumerate(client_inputs(20, [0], {"w": (30, 20)}, seed=3)):
        v = {n: t.float() for n, t in v[0].items()}
        _, s1, _ = full.step(s1, v, (0, 0, r))
        _, s2, _ = fixed.step(s2, v, (0, 0, r))
    g1 = s1["g"]["w"]
    g2 = fixed.tracker_values(s2, {"w": g1})["w"]
    assert float((g1 - g2).norm() / g1.norm()) < 1e-2
    assert s2["q"]["w"].dtype == torch.int16


def test_fixed16_needs_exact_difference_transport():
    with pytest.raises(ValueError, match="fixed16"):
        EF21(make_compressor({"name": "randk", "ratio": 0.1}), tracker="fixed16")


def test_ef14_telescopes():
    """Σ_r sent_r = Σ_r x_r − e_R exactly (the residual carries everything not yet sent)."""
    ef = EF14(make_compressor({"name": "topk", "ratio": 0.05, "values": "fp64"}))
    state, sent_sum, x_sum = None, 0, 0
    for r, v in enumerate(client_inputs(25, [0], SHAPES)):
        msg, state, _ = ef.step(state, v[0], (0, 0, r))
        sent_sum = sent_sum + ef.compressor.decompress(msg["w"], dtype=torch.float64)
        x_sum = x_sum + v[0]["w"]
    torch.testing.assert_close(sent_sum, x_sum - state["e"]["w"], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- B clients at once (client blocks)
def _payloads_equal(p, q):
    assert p.codec == q.codec and tuple(p.shape) == tuple(q.shape) and p.meta == q.meta
    assert set(p.arrays) == set(q.arrays)
    for key in p.arrays:  # byte for byte: signed zeros included
        assert p.arrays[key].dtype == q.arrays[key].dtype and p.arrays[key].tobytes() == q.arrays[key].tobytes()


ROW_SPECS = [{"name": "topk", "ratio": 0.1}, {"name": "topk", "ratio": 0.1, "values": "fp64"},
             {"name": "identity"}, {"name": "topk", "ratio": 1.0}]


@pytest.mark.parametrize("spec", ROW_SPECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compress_rows_equals_compressing_each_row(spec, dtype):
    """Row i of compress_rows is compress(X[i]) exactly, ties included (integer-valued inputs: many equal
    magnitudes), and add_decoded_rows is add_decoded row by row, bitwise (a None base: zeros)."""
    C = make_compressor(spec)
    gen = torch.Generator().manual_seed(3)
    for X in (torch.randn(7, 12, 9, generator=gen, dtype=dtype),
              torch.randint(-3, 4, (7, 12, 9), generator=gen).to(dtype)):
        rows = C.compress_rows(X)
        assert rows is not None and len(rows) == 7
        base = torch.randn(7, 12, 9, generator=gen, dtype=dtype)
        for sign in (1.0, -1.0):
            bases = [base[i] if i != 2 else None for i in range(7)]
            added = C.add_decoded_rows(bases, rows, X, sign)
            for i in range(7):
                alone, _ = C.compress(X[i])
                _payloads_equal(rows.payload(i), alone)
                start = base[i] if i != 2 else torch.zeros_like(base[i])
                assert added[i].dtype == dtype and torch.equal(added[i], C.add_decoded(start, alone, sign))
                assert added[i].data_ptr() != base[i].data_ptr()


@pytest.mark.parametrize("spec", [{"name": "randk", "ratio": 0.2}, {"name": "topk", "ratio": 0.1, "values": "qsgd"},
                                  {"name": "topk", "ratio": 0.1, "values": "fp16"}, {"name": "powersgd", "rank": 1}])
def test_compress_rows_declines_random_stateful_or_rounding_compressors(spec):
    assert make_compressor(spec).compress_rows(torch.randn(3, 12, 9)) is None


def test_compress_rows_declines_non_finite_blocks():
    X = torch.randn(3, 12, 9)
    X[1, 2, 3] = float("nan")
    assert make_compressor({"name": "topk", "ratio": 1.0}).compress_rows(X) is None


@pytest.mark.parametrize("kind", ["ef21", "ef14", "none"])
@pytest.mark.parametrize("spec", [{"name": "topk", "ratio": 0.1, "values": "fp64"}, {"name": "identity", "values": "fp64"},
                                  {"name": "topk", "ratio": 0.2}])
@pytest.mark.parametrize("chunk_bytes", [None, 1, 1000])
@pytest.mark.parametrize("stack_rows", [1, 10 ** 9])
def test_error_feedback_rows_equal_client_by_client(kind, spec, chunk_bytes, stack_rows, monkeypatch):
    """step_rows over 5 clients (some without state yet) equals step client by client, bitwise: messages,
    states, and the states it proposes are each client's own storage; also when a layer's rows are taken
    in chunks of one or two rows (the chunk buffer is reused, so a payload aliasing it would show here),
    and with chunks stepped row by row or stacked (STACK_ROWS)."""
    from compressors import error_feedback, make_error_feedback

    if chunk_bytes is not None:
        monkeypatch.setattr(error_feedback, "CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(error_feedback, "STACK_ROWS", stack_rows)

    ef = make_error_feedback(kind, make_compressor(spec))
    clients = range(5)
    alone = {j: None for j in clients}
    rows = {j: None for j in clients}
    for r, v in enumerate(client_inputs(4, list(clients), SHAPES, seed=7)):
        active = [j for j in clients if r > 0 or j % 2 == 0]  # odd clients join in round 1
        dtype = torch.float64 if spec.get("values") == "fp64" else torch.float32
        for j in clients:  # negative zeros: x + 0 and x - 0 differ in their sign
            v[j]["b"][:3] = -0.0
        block = {n: torch.stack([v[j][n].to(dtype) for j in active]) for n in SHAPES}
        out = ef.step_rows([rows[j] for j in active], block)
        assert out is not None
        for i, j in enumerate(active):
            msg, state, comp = ef.step(alone[j], {n: v[j][n].to(dtype) for n in SHAPES}, (0, j, r))
            for n in SHAPES:
                _payloads_equal(out[i][0][n], msg[n])
            for key in state:
                for n in SHAPES:
                    got, want = out[i][1][key][n], state[key][n]
                    assert torch.equal(got, want) and torch.equal(got.signbit(), want.signbit())
                    assert out[i][1][key][n].untyped_storage().nbytes() == state[key][n].numel() * state[key][n].element_size()
            assert out[i][2] == comp == {}
            alone[j], rows[j] = state, out[i][1]


def test_fixed16_trackers_have_no_row_step():
    ef = EF21(make_compressor({"name": "topk", "ratio": 0.1}), tracker="fixed16")
    assert not ef.supports_rows(SHAPES) and EF21(make_compressor({"name": "topk", "ratio": 0.1})).supports_rows(SHAPES)
    assert ef.step_rows([None, None], {n: torch.randn(2, *s) for n, s in SHAPES.items()}) is None
