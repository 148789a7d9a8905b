"""EF21 / EF14 identities in float64."""

import numpy as np
import pytest
import torch

from compressors import EF14, EF21, Context, decode_message, ef21_server_update, make_compressor, make_error_feedback
from compressors.error_feedback import check_contractive, stack_states
from compressors.payload import PayloadError, PayloadRows
from compressors.registry import COMPRESSORS, fixes_values
from compressors.values import VALUE_CODECS


def client_inputs(rounds, clients, shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    drift = {j: {n: torch.randn(s, generator=gen, dtype=torch.float64) for n, s in shapes.items()} for j in clients}
    for r in range(rounds):
        yield {j: {n: drift[j][n] * (1 + 0.1 * r) + 0.3 * torch.randn(s, generator=gen, dtype=torch.float64)
                   for n, s in shapes.items()} for j in clients}


SHAPES = {"w": (12, 9), "b": (12,)}


def _tree(state, f):
    return {k: _tree(v, f) for k, v in state.items()} if isinstance(state, dict) else f(state)


def step_one(ef, state, x, seed_parts, comp_states=None):
    """``ef.step`` of one client (a block of one): its message, new state and new compressor states."""
    rows, new, comps = ef.step(_tree(state, lambda t: t.unsqueeze(0)) if state else None,
                               {n: t.unsqueeze(0) for n, t in x.items()}, [seed_parts], [comp_states])
    return {n: r.payload(0) for n, r in rows.items()}, _tree(new, lambda t: t[0]), comps[0]


def tracker_values(ef, state, like):
    """EF21's tracker g_j of one client's state, in ``like``'s dtypes (fixed16: ``q · step``)."""
    if ef.tracker == "full":
        return dict(state["g"])
    return {n: state["q"][n].to(like[n].dtype) * state["step"][n].to(like[n].dtype) for n in like}


def test_ef21_identity_tracker_equals_input():
    ef = EF21(make_compressor({"name": "identity", "values": "fp64"}))
    state = None
    for r, v in enumerate(client_inputs(30, [0], SHAPES)):
        _, state, _ = step_one(ef, state, v[0], (0, 0, r))
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
            msg, states[j], cstates[j] = step_one(ef, states[j], v[j], (0, j, r), cstates[j])
            decoded[j] = decode_message(C, msg, SHAPES, dtype=torch.float64)  # what the server sees
        G = ef21_server_update(G, decoded, {j: 1 / len(clients) for j in clients})
        for n in SHAPES:
            mean = sum(tracker_values(ef, states[j], v[j])[n] for j in clients) / len(clients)
            torch.testing.assert_close(G[n], mean, rtol=1e-12, atol=1e-14)


def test_ef21_topk_tracker_converges_to_fixed_input():
    ef = EF21(make_compressor({"name": "topk", "ratio": 0.1, "values": "fp64"}))
    v = {"w": torch.randn(20, 10, dtype=torch.float64)}
    state, errs = None, []
    for r in range(40):
        _, state, _ = step_one(ef, state, v, (0, 0, r))
        errs.append(float((state["g"]["w"] - v["w"]).norm() / v["w"].norm()))
    # contraction: ‖g − v‖² ≤ (1−α)^r ‖v‖² with α = 0.1
    assert all(e ** 2 <= 0.9 ** (r + 1) * (1 + 1e-9) for r, e in enumerate(errs))


def test_fixed16_tracker_stays_close_to_full_precision():
    full, fixed = (EF21(make_compressor({"name": "topk", "ratio": 0.2}), tracker=t) for t in ("full", "fixed16"))
    s1 = s2 = None
    for r, v in enumerate(client_inputs(20, [0], {"w": (30, 20)}, seed=3)):
        v = {n: t.float() for n, t in v[0].items()}
        _, s1, _ = step_one(full, s1, v, (0, 0, r))
        _, s2, _ = step_one(fixed, s2, v, (0, 0, r))
    g1 = s1["g"]["w"]
    g2 = tracker_values(fixed, s2, {"w": g1})["w"]
    assert float((g1 - g2).norm() / g1.norm()) < 1e-2
    assert s2["q"]["w"].dtype == torch.int16


def test_fixed16_needs_exact_difference_transport():
    with pytest.raises(ValueError, match="fixed16"):
        EF21(make_compressor({"name": "randk", "ratio": 0.1}), tracker="fixed16")


@pytest.mark.parametrize("spec, refused", [
    ({"name": "randk", "ratio": 0.05}, True),  # omega = d/k - 1 = 19
    ({"name": "randk_seeded", "ratio": 0.4}, True),  # omega = 1.5
    ({"name": "identity", "values": "qsgd", "levels": 1}, True),
    ({"name": "randk", "ratio": 0.05, "values": "fp16"}, True),  # rounded after: still rand-k's noise
    ({"name": "randk", "ratio": 0.05, "values": "int8"}, True),
    ({"name": "randk", "ratio": 0.6}, False),  # omega = 2/3: contractive with alpha = 1/3
    ({"name": "identity", "values": "natural"}, False),  # omega = 1/8
    ({"name": "topk", "ratio": 0.05}, False), ({"name": "svd", "rank": 1}, False), ({"name": "identity"}, False),
])
def test_feedback_refuses_an_unbiased_compressor_of_omega_at_least_one(spec, refused):
    """EF21 and EF14 need E||C(x) - x||^2 <= (1 - alpha)||x||^2, alpha > 0; an unbiased C is such a compressor
    exactly when omega < 1 (alpha = 1 - omega). The declared omega decides, checked on every layer; feedback
    'none' takes any compressor."""
    shapes = {"w": (20, 10), "b": (10,)}
    C = make_compressor(spec)
    for feedback in ("ef21", "ef14"):
        if refused:
            with pytest.raises(ValueError, match=rf"^compressor is unbiased with omega = .* >= 1 on layer 'w'.*"
                                                 rf"\({feedback}\) needs a contractive one"):
                check_contractive(feedback, C, shapes)
        else:
            check_contractive(feedback, C, shapes)
    check_contractive("none", C, shapes)


def test_ef14_telescopes():
    """Σ_r sent_r = Σ_r x_r − e_R exactly (the residual carries everything not yet sent), and each round
    sends top-k of ``e + x`` (written here), not of x alone: the telescoping holds for any ``sent``."""
    ef = EF14(make_compressor({"name": "topk", "ratio": 0.05, "values": "fp64"}))
    state, sent_sum, x_sum, e = None, 0, 0, {n: torch.zeros(s, dtype=torch.float64) for n, s in SHAPES.items()}
    for r, v in enumerate(client_inputs(25, [0], SHAPES)):
        msg, state, _ = step_one(ef, state, v[0], (0, 0, r))
        for n, shape in SHAPES.items():
            target = (e[n] + v[0][n]).reshape(-1)
            k = max(1, int(np.ceil(0.05 * target.numel())))
            want = torch.zeros_like(target)
            keep = target.abs().topk(k).indices
            want[keep] = target[keep]
            sent = ef.compressor.decompress(msg[n], shape=shape, dtype=torch.float64)
            torch.testing.assert_close(sent.reshape(-1), want, rtol=0, atol=0, msg=f"round {r}, {n}")
            e[n] = (target - want).reshape(shape)
        sent_sum = sent_sum + ef.compressor.decompress(msg["w"], dtype=torch.float64)
        x_sum = x_sum + v[0]["w"]
    torch.testing.assert_close(sent_sum, x_sum - state["e"]["w"], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- a single tensor is a block of one
def _payloads_equal(p, q):
    assert p.codec == q.codec and tuple(p.shape) == tuple(q.shape) and p.meta == q.meta
    assert [type(v) for v in p.meta.values()] == [type(v) for v in q.meta.values()]
    assert set(p.arrays) == set(q.arrays)
    for key in p.arrays:  # byte for byte: signed zeros included
        assert p.arrays[key].dtype == q.arrays[key].dtype and p.arrays[key].shape == q.arrays[key].shape
        assert p.arrays[key].tobytes() == q.arrays[key].tobytes()


def _every_compressor():
    """Every structure the registry builds with every value codec it accepts."""
    for name, (_, options, default) in COMPRESSORS.items():
        for values in VALUE_CODECS if not fixes_values(name) else [default]:
            if values in ("int4", "int8") and name != "identity":  # int2's code at other widths: one structure
                continue
            spec = {"name": name, "values": values}
            spec.update({"ratio": 0.1} if "ratio" in options else {"rank": 2} if "rank" in options else {})
            yield spec


@pytest.mark.parametrize("spec", list(_every_compressor()), ids=lambda s: f"{s['name']}-{s['values']}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_block_encode_equals_encoding_each_row_alone(spec, dtype):
    """Row i of one encode over B rows is the payload of row i encoded alone (a block of one) with the same
    context, byte for byte — arrays, headers, bit counts, new compressor states — ties included (an
    integer-valued row: many equal magnitudes), over two rounds (PowerSGD's warm start from its state);
    decoding the rows equals decoding each payload, and adding them into a base equals adding each."""
    C = make_compressor(spec)
    gen = torch.Generator().manual_seed(3)
    states = [None] * 5
    for r in range(2):
        for shape in ((12, 9), (30, 40), (7,)):
            X = torch.randn(5, *shape, generator=gen, dtype=dtype)
            X[1] = torch.randint(-3, 4, shape, generator=gen).to(dtype)
            ctxs = [Context(seed_parts=(4, j, r), state=states[j]) for j in range(5)]
            rows, new = C.encode(X, ctxs)
            assert len(rows) == 5
            dense = C.decode(rows, dtype=dtype)
            base = torch.randn(5, *shape, generator=gen, dtype=dtype)
            added = C.add_decoded_(base.clone(), rows, -1.0)
            for i in range(5):
                alone, state = C.compress(X[i], Context(seed_parts=(4, i, r), state=states[i]))
                _payloads_equal(rows.payload(i), alone)
                assert C.bits(rows.payload(i)) == C.bits(alone)
                assert (state is None) == (new[i] is None) and (state is None or torch.equal(state["Q"], new[i]["Q"]))
                one = C.decompress(alone, shape=shape, dtype=dtype)
                assert torch.equal(dense[i], one) and torch.equal(dense[i].signbit(), one.signbit())
                assert torch.equal(added[i], C.add_decoded_(base[i:i + 1].clone(), PayloadRows.of(alone), -1.0)[0])
            if shape == (30, 40):
                states = new


def _block_tree(trees):
    return stack_states(trees)


@pytest.mark.parametrize("kind, tracker", [("ef21", "full"), ("ef21", "fixed16"), ("ef14", "full"), ("none", "full")])
@pytest.mark.parametrize("spec", [{"name": "topk", "ratio": 0.1, "values": "fp64"},
                                  {"name": "identity", "values": "fp64"},
                                  {"name": "topk", "ratio": 0.2}, {"name": "randk", "ratio": 0.2, "values": "qsgd"},
                                  {"name": "powersgd", "rank": 2, "min_compression_rate": 1.0}])
@pytest.mark.parametrize("chunk_bytes", [None, 1, 1000])
def test_error_feedback_block_step_equals_each_client_alone(kind, tracker, spec, chunk_bytes, monkeypatch):
    """One step over 5 clients (some in their first round: zero rows of the stacked state) equals the step
    of each client alone (a block of one), bitwise: messages, states (signed zeros included) and compressor
    states; also when a layer's rows are taken in chunks of one or two rows (a reused chunk buffer that a
    payload aliased would show here)."""
    from compressors import error_feedback

    if tracker == "fixed16" and spec["name"] not in ("topk", "identity"):
        pytest.skip("fixed16 needs dense or top-k")
    if chunk_bytes is not None:
        monkeypatch.setattr(error_feedback, "CHUNK_BYTES", chunk_bytes)
    ef = make_error_feedback(kind, make_compressor(spec), tracker)
    clients = range(5)
    alone = {j: (None, None) for j in clients}
    block = {j: (None, None) for j in clients}
    dtype = torch.float64 if spec.get("values") == "fp64" else torch.float32
    for r, v in enumerate(client_inputs(4, list(clients), SHAPES, seed=7)):
        active = [j for j in clients if r > 0 or j % 2 == 0]  # odd clients join in round 1
        for j in clients:  # negative zeros: x + 0 and x - 0 differ in their sign
            v[j]["b"][:3] = -0.0
        V = {n: torch.stack([v[j][n].to(dtype) for j in active]) for n in SHAPES}
        rows, new, comps = ef.step(_block_tree([block[j][0] for j in active]), V, [(0, j, r) for j in active],
                                   [block[j][1] for j in active])
        for i, j in enumerate(active):
            msg, state, comp = step_one(ef, alone[j][0], {n: v[j][n].to(dtype) for n in SHAPES}, (0, j, r), alone[j][1])
            for n in SHAPES:
                _payloads_equal(rows[n].payload(i), msg[n])
            for key in state:
                for n in SHAPES:
                    got, want = new[key][n][i], state[key][n]
                    assert torch.equal(got, want) and torch.equal(got.signbit(), want.signbit())
            assert comps[i].keys() == comp.keys() and all(torch.equal(comps[i][n]["Q"], comp[n]["Q"]) for n in comp)
            alone[j] = (state, comp)
            block[j] = ({key: {n: t[i] for n, t in tree.items()} for key, tree in new.items()}, comps[i])


def test_a_non_finite_row_is_sent_and_fails_validation_alone():
    """A block with a NaN row: the client's own decode does not check values (compressors.values.OWN), so the
    NaN travels in that row's payload, which the server's validated decode rejects; the other rows are
    their lone steps' bitwise."""
    ef = EF21(make_compressor({"name": "topk", "ratio": 1.0}))
    V = {n: torch.randn(3, *s) for n, s in SHAPES.items()}
    V["w"][1, 2, 3] = float("nan")
    rows, _, _ = ef.step(None, V, [(0, j, 0) for j in range(3)])
    with pytest.raises(PayloadError):
        ef.compressor.decode(rows["w"])
    for i in (0, 2):
        alone, _, _ = step_one(ef, None, {n: t[i] for n, t in V.items()}, (0, i, 0))
        for n in V:
            for key, a in alone[n].arrays.items():
                assert np.array_equal(rows[n].arrays[key][i], a)
