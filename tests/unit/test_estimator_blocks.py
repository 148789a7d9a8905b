"""Block estimator updates: row i of a block step equals client i's own step, bitwise.

The parent is the per-client implementation fedgluon had before the block form (``state is None`` on the
first step, unbatched tensors), copied here verbatim as ``ref_*`` so that the library's code is checked
against an independent copy, not against itself. One part is shared, not copied: ``ref_limuon`` sketches with
the library's :func:`~fedgluon.core.linalg.randomized_svd`, which tests/unit/test_compressor_constants.py checks
on its own against the Halko–Martinsson–Tropp bound (and tests/unit/test_estimators.py checks LiMuon's
recursion below full rank against torch's truncated SVD).
"""

import math

import pytest
import torch

from fedgluon.algorithms.base import _cast_floats
from fedgluon.core.linalg import randomized_svd
from fedgluon.core.rng import generator
from fedgluon.lmo.estimators import SARAH, LiMuon, make_estimator


# ---------------------------------------------------------------- the per-client parent (copied, unchanged)
def ref_ema(est, state, g_now, g_prev=None):
    b = est.beta
    if state is None:
        m_old = {k: (g.clone() if est.init == "grad" else torch.zeros_like(g)) for k, g in g_now.items()}
        m = m_old if est.init == "grad" else {k: torch.lerp(m_old[k], g, 1 - b) for k, g in g_now.items()}
    else:
        m = {k: torch.lerp(state["m"][k], g, 1 - b) for k, g in g_now.items()}
    out = {k: torch.lerp(m[k], g, 1 - b) for k, g in g_now.items()} if est.nesterov else m
    return {"m": m}, out


def ref_mvr(est, state, g_now, g_prev=None):
    if state is None:
        m = {k: g.clone() for k, g in g_now.items()}
    else:
        m = {k: g + est.beta * (state["m"][k] - g_prev[k]) for k, g in g_now.items()}
    return {"m": m}, m


def _ref_clip(c):
    n = torch.linalg.vector_norm(c)
    return c / n if n > 1 else c


def _ref_corrected(est, g, last, beta):
    c = g if last is None else g + est.gamma * beta / (1 - beta) * (g - last)
    return _ref_clip(c) if est.clip else c


def _ref_last(est, state, g_prev):
    if state is None:
        return None
    return g_prev if est.variant == 2 else state["last"]


def ref_muon_mvr(est, state, g_now, g_prev=None):
    if est.form == "reference":
        return ref_muon_mvr_reference(est, state, g_now, g_prev)
    b, last = est.beta, _ref_last(est, state, g_prev)
    m_old = state["m"] if state is not None else {k: torch.zeros_like(g) for k, g in g_now.items()}
    m = {k: torch.lerp(m_old[k], _ref_corrected(est, g, None if last is None else last[k], b), 1 - b)
         for k, g in g_now.items()}
    new_state = {"m": m}
    if est.variant == 1:
        new_state["last"] = {k: g.clone() for k, g in g_now.items()}
    return new_state, m


def ref_muon_mvr_reference(est, state, g_now, g_prev):
    last = _ref_last(est, state, g_prev)
    b1, b2 = est.adamw_betas
    if state is None:
        state = {"m": {k: torch.zeros_like(g) for k, g in g_now.items()},
                 "v": {k: torch.zeros_like(g) for k, g in g_now.items() if g.ndim != 2},
                 "step": {"t": torch.tensor(0, dtype=torch.int64)}}
    t = int(state["step"]["t"]) + 1
    m, v, out = {}, {}, {}
    for k, g in g_now.items():
        b = est.beta if g.ndim == 2 else b1
        c = _ref_corrected(est, g, torch.zeros_like(g) if last is None else last[k], b)
        m[k] = torch.lerp(state["m"][k], c, 1 - b)
        if g.ndim == 2:
            out[k] = m[k] / (1 - b)
        else:
            v[k] = torch.lerp(state["v"][k], c * c, 1 - b2)
            out[k] = m[k] / (est.adamw_eps + v[k].sqrt()) * (math.sqrt(1 - b2 ** t) / (1 - b1 ** t))
    new_state = {"m": m, "v": v, "step": {"t": torch.tensor(t, dtype=torch.int64)}}
    if est.variant == 1:
        new_state["last"] = {k: g.clone() for k, g in g_now.items()}
    return new_state, out


def ref_sarah(est, state, g_now, g_prev=None):
    if state is None:
        v = {k: g.clone() for k, g in g_now.items()}
    else:
        v = {k: state["v"][k] + g - g_prev[k] for k, g in g_now.items()}
    return {"v": v}, v


def ref_sarah_refresh(est, state, g_large):
    v = {k: g.clone() for k, g in g_large.items()}
    return {"v": v}, v


def _ref_limuon_compress(est, m, step):
    gen = generator(est.seed, "sketch", step)
    P, Q, full = {}, {}, {}
    for k in sorted(m):
        t = m[k]
        if t.ndim >= 2 and min(t.shape[0], math.prod(t.shape[1:])) > est.rank:
            p, q = randomized_svd(t.reshape(t.shape[0], -1), est.rank, est.oversample, gen)
            P[k], Q[k] = p, q
        else:
            full[k] = t
    return {"P": P, "Q": Q, "full": full}


def ref_limuon(est, state, g_now, g_prev=None):
    if state is None:
        m, step = {k: g.clone() for k, g in g_now.items()}, 0
    else:
        m_hat = dict(state["full"])
        for k in state["P"]:
            m_hat[k] = (state["P"][k] @ state["Q"][k].mT).reshape(g_now[k].shape)
        m = {k: g + est.beta * (m_hat[k] - g_prev[k]) for k, g in g_now.items()}
        step = int(state["step"]["k"]) + 1
    new_state = _ref_limuon_compress(est, m, step)
    new_state["step"] = {"k": torch.tensor(step)}
    return new_state, m


REFERENCE = {"ema": ref_ema, "mvr": ref_mvr, "muon_mvr1": ref_muon_mvr, "muon_mvr2": ref_muon_mvr,
             "sarah": ref_sarah, "limuon": ref_limuon}

# ---------------------------------------------------------------- the comparison
CONFIGS = [
    ("ema", {"beta": 0.9}), ("ema", {"beta": 0.9, "nesterov": True}), ("ema", {"beta": 0.8, "init": "grad"}),
    ("ema", {"beta": 0.8, "init": "grad", "nesterov": True}), ("mvr", {"beta": 0.7}),
    ("muon_mvr1", {"beta": 0.9, "gamma": 0.3}), ("muon_mvr2", {"beta": 0.9, "gamma": 0.3}),
    ("muon_mvr1", {"beta": 0.9, "gamma": 0.3, "clip": False}),
    ("muon_mvr1", {"beta": 0.95, "gamma": 0.025, "form": "reference"}),
    ("muon_mvr2", {"beta": 0.95, "gamma": 0.025, "form": "reference"}),
    ("sarah", {}), ("limuon", {"beta": 0.7, "rank": 2, "seed": 3}),
]
# a matrix, a conv kernel, a vector and a scalar; "big" (270·260 entries) is above torch's parallel grain
SHAPES = {"w": (9, 7), "conv": (6, 3, 2, 2), "b": (9,), "s": (), "big": (270, 260)}


def grads(seed, dtype, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for k, s in SHAPES.items()}


def stack(trees):
    return torch.utils._pytree.tree_map(lambda *rows: torch.stack(rows), *trees)


def assert_row_equal(block, i, tree, what):
    flat_b, spec_b = torch.utils._pytree.tree_flatten(block)
    flat_t, spec_t = torch.utils._pytree.tree_flatten(tree)
    assert spec_b == spec_t, what
    for b, t in zip(flat_b, flat_t):
        assert b[i].dtype == t.dtype and b[i].shape == t.shape and torch.equal(b[i], t), what


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name, kw", CONFIGS, ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items())}"
                                                    for n, kw in CONFIGS])
def test_block_rows_equal_per_client_updates(name, kw, dtype):
    """Four clients joining at different steps (first rows mixed with later ones, and a block of one): every
    row of the block state and estimate equals that client's per-client update, bitwise. Clients 0 and 3
    see gradients of norm > 1 (Muon-MVR clips them), 1 and 2 of norm < 1. Non-first rows with stale
    state rows must not leak into first rows: a first row is handed a state row full of garbage."""
    est, ref = make_estimator(name, **kw), REFERENCE[name]
    joins = [0, 1, 1, 3]  # client i's first step is at step joins[i]
    scales = [3.0, 1e-3, 1e-2, 5.0]
    ref_states = [None] * 4
    block = est.zero_state(stack([grads(0, dtype)] * 4))
    for step in range(5):
        active = [i for i in range(4) if joins[i] <= step]
        g = [grads(100 * step + i, dtype, scales[i]) for i in range(4)]
        gp = [grads(100 * step + 50 + i, dtype, scales[i]) for i in range(4)]
        first = torch.tensor([joins[i] == step for i in active])
        state_in = {k: {n: t[active] for n, t in v.items()} for k, v in block.items()}
        if step == 1:  # a first row holding garbage must not change the math
            state_in = torch.utils._pytree.tree_map(
                lambda t, f=first: torch.where(f.view(-1, *[1] * (t.ndim - 1)), torch.full_like(t, 7), t), state_in)
        G, GP = stack([g[i] for i in active]), stack([gp[i] for i in active])
        new_block, est_block = est.update(state_in, G, GP if est.needs_previous else None, first)
        for r, i in enumerate(active):
            ref_states[i], ref_est = ref(est, ref_states[i], g[i], gp[i] if ref_states[i] is not None else None)
            assert_row_equal(new_block, r, ref_states[i], f"{name} state, step {step}, client {i}")
            assert_row_equal(est_block, r, ref_est, f"{name} estimate, step {step}, client {i}")
            one_state, one_est = est.update(
                {k: {n: t[r:r + 1] for n, t in v.items()} for k, v in state_in.items()},
                {k: t[r:r + 1] for k, t in G.items()}, {k: t[r:r + 1] for k, t in GP.items()}, first[r:r + 1])
            assert_row_equal(one_state, 0, ref_states[i], f"{name} B=1 state, step {step}, client {i}")
            assert_row_equal(one_est, 0, ref_est, f"{name} B=1 estimate, step {step}, client {i}")
        for k, v in new_block.items():
            for n, t in v.items():
                block[k][n][active] = t


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_sarah_block_refresh_equals_per_client(dtype):
    est = SARAH()
    states = [ref_sarah(est, None, grads(i, dtype))[0] for i in range(3)] + [None]
    block = stack([s if s is not None else est.zero_state(stack([grads(0, dtype)]))
                   for s in states[:3]] + [{"v": {k: torch.zeros_like(t) for k, t in grads(0, dtype).items()}}])
    g = [grads(10 + i, dtype) for i in range(4)]
    new, v = est.refresh(block, stack(g), torch.tensor([False, False, False, True]))
    for i in range(4):
        ref_state, ref_v = ref_sarah_refresh(est, states[i], g[i])
        assert_row_equal(new, i, ref_state, f"sarah refresh state {i}")
        assert_row_equal(v, i, ref_v, f"sarah refresh estimate {i}")


def test_limuon_sketch_is_seeded_by_each_clients_step():
    """Two clients at different steps in one block: each row's factors are those of its own step's sketch."""
    est = LiMuon(beta=0.7, rank=2, seed=3)
    dtype = torch.float64
    s0 = ref_limuon(est, None, grads(1, dtype))[0]  # client 0 at step 1 next
    G, GP = stack([grads(2, dtype), grads(3, dtype)]), stack([grads(4, dtype), grads(5, dtype)])
    zero = est.zero_state(stack([grads(0, dtype)]))
    state = stack([s0, torch.utils._pytree.tree_map(lambda t: t[0], zero)])
    new, _ = est.update(state, G, GP, torch.tensor([False, True]))
    assert new["step"]["k"].tolist() == [1, 0]
    ref1, _ = ref_limuon(est, s0, grads(2, dtype), grads(4, dtype))
    assert_row_equal(new, 0, ref1, "limuon client at step 1")


@pytest.mark.parametrize("name, kw", [("mvr", {"beta": 0.7}), ("muon_mvr1", {"form": "reference"}),
                                      ("limuon", {"rank": 2})])
def test_state_dtype_rows(name, kw):
    """``state_dtype``: a block state stored in float16 (Algorithm.estimate's cast) and cast back steps each row
    as that client's own float16-stored state does; integer step counters are left alone."""
    est, ref = make_estimator(name, **kw), REFERENCE[name]
    g0 = [grads(i, torch.float32) for i in range(3)]
    refs = [_cast_floats(ref(est, None, g)[0], torch.float16) for g in g0]
    block = _cast_floats(est.update(est.zero_state(stack(g0)), stack(g0), None, torch.ones(3, dtype=torch.bool))[0],
                         torch.float16)
    for i in range(3):
        assert_row_equal(block, i, refs[i], f"{name} fp16 state {i}")
    g1, gp = [grads(10 + i, torch.float32) for i in range(3)], [grads(20 + i, torch.float32) for i in range(3)]
    new, out = est.update(_cast_floats(block, torch.float32), stack(g1), stack(gp), torch.zeros(3, dtype=torch.bool))
    for i in range(3):
        s, o = ref(est, _cast_floats(refs[i], torch.float32), g1[i], gp[i])
        assert_row_equal(new, i, s, f"{name} state from fp16 {i}")
        assert_row_equal(out, i, o, f"{name} estimate from fp16 {i}")


def test_step_one_and_schema():
    """``step_one`` (the optimizer's B = 1 step on unbatched tensors, ``None``: first step) equals the
    parent's, for a later and a first step; ``schema`` names one client's state layout."""
    est = make_estimator("muon_mvr2", form="reference")
    dtype = torch.float32
    s1 = ref_muon_mvr(est, None, grads(1, dtype))[0]
    g, gp = [grads(2, dtype), grads(3, dtype)], [grads(4, dtype), None]
    for i, state in enumerate([s1, None]):
        got_state, got_est = est.step_one(state, g[i], gp[i])
        ref_state, ref_est = ref_muon_mvr(est, state, g[i], gp[i])
        assert_row_equal(stack([got_state]), 0, ref_state, f"step_one state {i}")
        assert_row_equal(stack([got_est]), 0, ref_est, f"step_one estimate {i}")
    schema = est.schema({k: s for k, s in SHAPES.items()}, torch.float32)
    assert schema["m"]["w"] == ((9, 7), torch.float32) and "w" not in schema["v"] and "big" not in schema["v"]
    assert schema["step"]["t"] == ((), torch.int64)
    assert make_estimator("limuon", rank=2).schema({"w": (9, 7)}, torch.float64)["P"]["w"] == ((9, 2), torch.float64)


def test_bad_first_mask():
    est = make_estimator("mvr", beta=0.5)
    G = stack([grads(0, torch.float32)] * 2)
    with pytest.raises(ValueError, match=r"first must be a \(2,\) bool tensor"):
        est.update(est.zero_state(G), G, G, torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="needs the gradient at the previous iterate"):
        est.update(est.zero_state(G), G, None, torch.tensor([True, False]))
