"""Estimator identities in float64 on deterministic problems."""

import pytest
import torch

from fedgluon.lmo.estimators import MVR, SARAH, EMAMomentum, LiMuon, MuonMVR, RefreshPolicy, make_estimator

SHAPES = {"w": (6, 4), "b": (6,)}


def grads(seed, shapes=None):
    shapes = SHAPES if shapes is None else shapes
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in shapes.items()}


def test_updates_are_pure():
    """Neither the old state nor the gradients passed in are modified."""
    for est in [EMAMomentum(0.9), MVR(0.5), MuonMVR(variant=2), SARAH(), LiMuon(rank=2)]:
        g0, g1, gp = grads(0), grads(1), grads(2)
        state, _ = est.step_one(None, g0)
        snapshot = {k: {n: t.clone() for n, t in v.items()} for k, v in state.items()}
        est.step_one(state, g1, gp)
        for k, v in state.items():
            for n, t in v.items():
                assert torch.equal(t, snapshot[k][n]), (est.name, k, n)
        for given, seed in ((g0, 0), (g1, 1), (gp, 2)):
            assert all(torch.equal(given[n], grads(seed)[n]) for n in given), est.name


def test_ema_matches_definition():
    est = EMAMomentum(beta=0.8, nesterov=True)
    m = {k: torch.zeros_like(v) for k, v in grads(0).items()}
    state = None
    for s in range(5):
        g = grads(s)
        state, out = est.step_one(state, g)
        m = {k: 0.8 * m[k] + 0.2 * g[k] for k in g}
        for k in g:
            torch.testing.assert_close(out[k], 0.8 * m[k] + 0.2 * g[k], rtol=1e-12, atol=1e-14)


def test_mvr_beta_zero_is_plain_gradient_and_beta_one_is_sarah():
    state0 = state1 = stateS = None
    for s in range(6):
        g, gp = grads(s), grads(100 + s)
        state0, out0 = MVR(beta=0.0).step_one(state0, g, gp)
        state1, out1 = MVR(beta=1.0).step_one(state1, g, gp)
        stateS, outS = SARAH().step_one(stateS, g, gp)
        for k in g:
            assert torch.equal(out0[k], g[k])
            torch.testing.assert_close(out1[k], outS[k], rtol=1e-12, atol=1e-12)


def test_mvr_between_zero_and_one_is_storm():
    """docs/ALGORITHMS.md §5 at β = 0.6 (not an end point): ``M = g₀`` first, then
    ``M ← g_k + β(M − ∇f(X^{k−1}; ξ_k))``."""
    beta, state, m = 0.6, None, None
    for s in range(6):
        g, gp = grads(s), grads(100 + s)
        state, out = MVR(beta=beta).step_one(state, g, None if s == 0 else gp)
        m = dict(g) if m is None else {k: g[k] + beta * (m[k] - gp[k]) for k in g}
        for k in g:
            torch.testing.assert_close(out[k], m[k], rtol=1e-12, atol=1e-14)


def test_limuon_below_full_rank_recurses_on_the_best_rank_r_momentum():
    """docs/ALGORITHMS.md §7 at rank 3 of a 12×10 matrix: ``M ← g + β(M̂ − g_prev)``, ``M̂`` the rank-3
    truncated SVD of the last M (the bias keeps its full state). With 7 oversampling columns the sketch
    spans all 10 columns, so the randomized SVD is the exact truncated one, written here with torch's SVD."""
    shapes, beta, r = {"w": (12, 10), "b": (12,)}, 0.7, 3
    est, state, m = LiMuon(beta=beta, rank=r, oversample=7), None, None

    def truncated(W):
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return U[:, :r] * S[:r] @ Vh[:r]

    for s in range(5):
        g, gp = grads(s, shapes), grads(40 + s, shapes)
        state, out = est.step_one(state, g, None if s == 0 else gp)
        if m is None:
            m = dict(g)
        else:
            m = {"w": g["w"] + beta * (truncated(m["w"]) - gp["w"]), "b": g["b"] + beta * (m["b"] - gp["b"])}
        for k in g:
            torch.testing.assert_close(out[k], m[k], rtol=1e-10, atol=1e-12)


def test_sarah_with_noisy_gradients_follows_its_recursion():
    """``V ← V + ∇f(X_k; ξ_k) − ∇f(X_{k−1}; ξ_k)`` with independent noise at every call, so the estimate is
    not the current gradient (the noiseless test below cannot tell SARAH from plain gradients)."""
    state, v = None, None
    for s in range(6):
        g, gp = grads(s), grads(100 + s)
        state, out = SARAH().step_one(state, g, None if s == 0 else gp)
        v = dict(g) if v is None else {k: v[k] + g[k] - gp[k] for k in g}
        for k in g:
            torch.testing.assert_close(out[k], v[k], rtol=1e-12, atol=1e-14)
        assert s == 0 or any(not torch.allclose(out[k], g[k]) for k in g)


def test_sarah_noiseless_equals_true_gradient():
    """Full-batch, deterministic: V_k = V_{k-1} + ∇f(X_k) − ∇f(X_{k−1}) = ∇f(X_k) (telescoping)."""
    A = torch.randn(5, 5, dtype=torch.float64)
    grad = lambda x: {"x": A @ x + torch.sin(x)}  # noqa: E731
    x_prev, state = None, None
    x = torch.randn(5, dtype=torch.float64)
    for _ in range(40):
        state, v = SARAH().step_one(state, grad(x), None if x_prev is None else grad(x_prev))
        torch.testing.assert_close(v["x"], grad(x)["x"], rtol=1e-10, atol=1e-12)
        x_prev, x = x, x - 0.05 * v["x"]


@pytest.mark.parametrize("scale", [1.0, 0.01])  # at 0.01 no ‖c‖ exceeds 1: the branch without clipping
def test_muon_mvr_matches_reference_code(scale):
    """docs/ALGORITHMS.md §6: c = g + γβ/(1−β)(g − last); clip; M = βM + (1−β)c."""
    beta, gamma = 0.9, 0.3
    for variant in (1, 2):
        est = MuonMVR(beta=beta, gamma=gamma, clip=True, variant=variant)
        state, m, last = None, {k: torch.zeros_like(v) for k, v in grads(0).items()}, None
        for s in range(6):
            g = {k: scale * t for k, t in grads(s).items()}
            gp = {k: scale * t for k, t in grads(50 + s).items()}
            state, out = est.step_one(state, g, gp)
            ref_last = (gp if variant == 2 else last) if s > 0 else None
            for k in g:
                c = g[k] if ref_last is None else g[k] + gamma * beta / (1 - beta) * (g[k] - ref_last[k])
                if c.norm() > 1:
                    c = c / c.norm()
                m[k] = beta * m[k] + (1 - beta) * c
                torch.testing.assert_close(out[k], m[k], rtol=1e-12, atol=1e-14)
            last = g


def test_limuon_full_rank_equals_mvr_and_low_rank_state_is_small():
    shapes = {"w": (12, 10), "b": (12,)}
    s_l = s_m = None
    for s in range(5):
        g, gp = grads(s, shapes), grads(40 + s, shapes)
        s_l, out_l = LiMuon(beta=0.7, rank=10).step_one(s_l, g, gp)
        s_m, out_m = MVR(beta=0.7).step_one(s_m, g, gp)
        for k in g:
            torch.testing.assert_close(out_l[k], out_m[k], rtol=1e-12, atol=1e-12)
    state, _ = LiMuon(beta=0.7, rank=2).step_one(None, grads(0, shapes))
    assert state["P"]["w"].shape == (12, 2) and state["Q"]["w"].shape == (10, 2)
    assert "b" in state["full"]


def test_needs_previous_gradient_error():
    state, _ = MVR(0.5).step_one(None, grads(0))
    with pytest.raises(ValueError, match="needs the gradient at the previous iterate"):
        MVR(0.5).step_one(state, grads(1))


def test_refresh_policy():
    gen = torch.Generator().manual_seed(0)
    p = RefreshPolicy(prob=0.25)
    draws = [p.due(k, gen) for k in range(1, 4001)]
    assert abs(sum(draws) / 4000 - 0.25) < 0.03  # 4.5 standard deviations
    assert [RefreshPolicy(period=3).due(k, gen) for k in range(7)] == [True, False, False, True, False, False, True]
    with pytest.raises(ValueError, match="exactly one of"):
        RefreshPolicy()


@pytest.mark.parametrize("bad, msg", [({"name": "adam"}, "estimator must be one of"),
                                      ({"name": "ema", "beta": 1.5}, "beta must be in")])
def test_bad_estimator_config(bad, msg):
    name = bad.pop("name")
    with pytest.raises(ValueError, match=msg):
        make_estimator(name, **bad)
