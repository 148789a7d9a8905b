"""The algorithm catalogue: exact reductions (float64, SVD LMO), determinism, bits, rejected payloads."""

import dataclasses
import inspect

import numpy as np
import pytest
import torch
from helpers import client_state, synthetic_federation

from fedgluon.algorithms import ALGORITHMS, make_algorithm
from fedgluon.clients.objective import SupervisedObjective
from fedgluon.lmo.geometry import Geometry
from fedgluon.sim.driver import client_weights, run_plain
from fedgluon.sim.metrics import TIMING_COLUMNS
from fedgluon.tasks.data.synthetic import leaf_synthetic
from fedgluon.tasks.models import MLP

ROUNDS = 16


def problem(num_clients=4, dtype=torch.float64, batch_size=8, seed=0, identical=False, large_batch_size=24):
    data = leaf_synthetic(num_clients, 0.5, 0.5, dim=10, classes=4, mean_samples=40, seed=seed, dtype=dtype)
    if identical:
        data = [data[0]] * num_clients
    torch.manual_seed(seed)
    model = MLP(10, (12,), 4).to(dtype)
    objs = [SupervisedObjective(model, x, y, batch_size=batch_size, large_batch_size=large_batch_size) for x, y in data]
    X0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    geom = Geometry.from_model(model, spectral_method="svd")
    return model, objs, X0, geom


def trajectory(name, objs, X0, geom, rounds=ROUNDS, seed=0, **options):
    xs = []
    algo = make_algorithm(name, geom, **options)
    res = run_plain(algo, objs, X0, rounds, seed=seed,
                    evaluate=lambda X, k: xs.append({n: t.clone() for n, t in X.items()}) or {})
    return xs, res


def assert_same(xs, ys, rtol=1e-10):
    assert len(xs) == len(ys)
    for k, (a, b) in enumerate(zip(xs, ys)):
        for n in a:
            torch.testing.assert_close(a[n], b[n], rtol=rtol, atol=1e-12, msg=f"round {k}, {n}")


EXACT = {"values": "fp64", "lr": 0.03, "schedule": "polynomial", "power": 0.5}
IDENTITY = {"name": "identity", "values": "fp64"}


@pytest.mark.parametrize("compressed, parent, shared", [
    ("gluon-ef21", "gluon", {"beta": 0.8}),
    ("gluon-ef21-sarah", "gluon-sarah", {"refresh_prob": 0.2}),
    ("gluon-ef21-mvr", "gluon-mvr", {"beta": 0.7}),
    ("gluon-ef21", "gluon", {"beta": 0.8, "nesterov": True}),
])
def test_ef21_identity_equals_uncompressed_parent(compressed, parent, shared):
    _, objs, X0, geom = problem()
    xs, _ = trajectory(compressed, objs, X0, geom, compressor=IDENTITY, **EXACT, **shared)
    ys, _ = trajectory(parent, objs, X0, geom, **EXACT, **shared)
    assert_same(xs, ys)


def test_ef21_with_nesterov_equals_an_independent_loop():
    """``gluon-ef21`` with ``nesterov`` and top-k (float64, full local batches, 3 clients) against a loop
    written here: ``m_j ← βm_j + (1−β)g_j``, ``d_j = βm_j + (1−β)g_j``, ``G_j ← G_j + topk(d_j − G_j)``,
    ``X ← X + t_k lmo(mean_j G_j)`` with ``t_k = lr (k+1)^{-1/2}``."""
    _, objs, X0, geom = problem(num_clients=3, batch_size=10 ** 6)
    beta, ratio = 0.8, 0.3
    xs, _ = trajectory("gluon-ef21", objs, X0, geom, beta=beta, nesterov=True,
                       compressor={"name": "topk", "ratio": ratio, "values": "fp64"}, **EXACT)

    def topk(t):
        k = max(1, int(np.ceil(ratio * t.numel())))
        flat, out = t.flatten(), torch.zeros(t.numel(), dtype=t.dtype)
        idx = flat.abs().topk(k).indices
        out[idx] = flat[idx]
        return out.view_as(t)

    X = {n: t.clone() for n, t in X0.items()}
    m = [{n: torch.zeros_like(t) for n, t in X0.items()} for _ in objs]
    G = [{n: torch.zeros_like(t) for n, t in X0.items()} for _ in objs]
    for k in range(ROUNDS):
        for j, obj in enumerate(objs):
            _, g = obj.gradient(X, obj.full_batch())
            m[j] = {n: beta * m[j][n] + (1 - beta) * g[n] for n in X}
            G[j] = {n: G[j][n] + topk(beta * m[j][n] + (1 - beta) * g[n] - G[j][n]) for n in X}
        step = geom.lmo({n: sum(Gj[n] for Gj in G) / len(G) for n in X})
        X = {n: X[n] + EXACT["lr"] * (k + 1) ** -0.5 * step[n] for n in X}
        for n in X:
            torch.testing.assert_close(xs[k][n], X[n], rtol=1e-8, atol=1e-10, msg=f"round {k}, {n}")


def test_marina_identity_no_refresh_equals_sarah():
    """MARINA with the identity compressor and p = 0 after round 0 is SARAH on the clients' mean."""
    _, objs, X0, geom = problem()
    xs, _ = trajectory("gluon-marina", objs, X0, geom, compressor=IDENTITY, refresh_period=10 ** 9, **EXACT)
    ys, _ = trajectory("gluon-sarah", objs, X0, geom, refresh_period=10 ** 9, **EXACT)
    assert_same(xs, ys)


def test_marina_identity_with_refresh_equals_sarah_with_refresh():
    _, objs, X0, geom = problem()
    xs, r1 = trajectory("gluon-marina", objs, X0, geom, compressor=IDENTITY, refresh_prob=0.3, **EXACT)
    ys, r2 = trajectory("gluon-sarah", objs, X0, geom, refresh_prob=0.3, **EXACT)
    assert r1.frame()["refresh"].sum() > 3
    assert_same(xs, ys)


def test_dasha_identity_equals_mvr():
    """With ω = 0, a = 1: m_j = H_j' − G_j, so G_j = H_j' and the server holds the mean MVR estimate."""
    _, objs, X0, geom = problem()
    xs, _ = trajectory("gluon-dasha-mvr", objs, X0, geom, compressor=IDENTITY, beta=0.6, **EXACT)
    ys, _ = trajectory("gluon-mvr", objs, X0, geom, beta=0.6, **EXACT)
    assert_same(xs, ys)


def test_bidir_identity_downlink_equals_ef21():
    _, objs, X0, geom = problem()
    spec = {"name": "topk", "ratio": 0.2, "values": "fp64"}
    xs, _ = trajectory("ef21-muon-bidir", objs, X0, geom, compressor=spec, downlink=IDENTITY, **EXACT)
    ys, _ = trajectory("gluon-ef21", objs, X0, geom, compressor=spec, **EXACT)
    assert_same(xs, ys)


@pytest.mark.parametrize("clients, identical", [(1, False), (3, True)])
def test_local_gluon_one_step_equals_gluon_without_momentum(clients, identical):
    """Mean of LMO directions = LMO of the mean gradient only when the clients' gradients agree: one client,
    or identical clients on full batches (their minibatches are drawn per client id)."""
    _, objs, X0, geom = problem(num_clients=clients, identical=identical, batch_size=10 ** 6 if identical else 8)
    xs, _ = trajectory("local-gluon", objs, X0, geom, local_steps=1, beta=0.0, **EXACT)
    ys, _ = trajectory("gluon", objs, X0, geom, beta=0.0, **EXACT)
    assert_same(xs, ys)


def test_sarah_one_client_full_batch_equals_exact_gradient_gluon():
    model, objs, X0, geom = problem(num_clients=1, batch_size=10 ** 6, large_batch_size=None)
    xs, _ = trajectory("gluon-sarah", objs, X0, geom, refresh_period=10 ** 9, **EXACT)
    # independent parent: X ← X + t_k lmo(∇f(X)) with the exact gradient of the full local set
    X, lr = {n: t.clone() for n, t in X0.items()}, EXACT["lr"]
    for k in range(ROUNDS):
        _, g = objs[0].gradient(X, objs[0].full_batch())
        d = geom.lmo(g)
        X = {n: X[n] + lr * (k + 1) ** -0.5 * d[n] for n in X}
        for n in X:
            torch.testing.assert_close(xs[k][n], X[n], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["gluon-sarah", "gluon-ef21-sarah"])
def test_sarah_with_minibatches_and_periodic_large_batch_refreshes(name):
    """Three clients, minibatches of 8, a large batch of 24 (of ~40 samples) every third round, written here:
    ``V_j = ∇f_j(X_k; large batch)`` on rounds 0, 3, 6, ..., else ``V_j ← V_j + ∇f_j(X_k; ξ) − ∇f_j(X_{k−1}; ξ)``
    on one minibatch ξ drawn by ``generator(seed, "sample", j, k)``; ``X ← X + t_k lmo(mean_j V_j)``. Taking the
    minibatch on refresh rounds, or the large batch on the others, fails it."""
    from fedgluon.core.rng import generator

    model, objs, X0, geom = problem(num_clients=3)
    extra = {"compressor": IDENTITY} if name == "gluon-ef21-sarah" else {}
    xs, res = trajectory(name, objs, X0, geom, rounds=8, seed=2, refresh_period=3, **EXACT, **extra)
    assert res.frame()["refresh"].tolist() == [1, 0, 0, 1, 0, 0, 1, 0]
    X, Xp, V = {n: t.clone() for n, t in X0.items()}, None, [None] * 3
    for k in range(8):
        for j, o in enumerate(objs):
            gen = generator(2, "sample", j, k)
            if k % 3 == 0:
                batch = o.large_batch(gen)
                assert len(batch[1]) == 24
                V[j] = o.gradient(X, batch)[1]
            else:
                batch = o.sample_batch(gen)
                assert len(batch[1]) == 8
                now, prev = o.gradient(X, batch)[1], o.gradient(Xp, batch)[1]
                V[j] = {n: V[j][n] + now[n] - prev[n] for n in X}
        d = geom.lmo({n: sum(v[n] for v in V) / 3 for n in X})
        Xp, X = X, {n: X[n] + EXACT["lr"] * (k + 1) ** -0.5 * d[n] for n in X}
        for n in X:
            torch.testing.assert_close(xs[k][n], X[n], rtol=1e-10, atol=1e-12, msg=f"round {k}, {n}")


def test_same_seed_bitwise_and_different_seeds_differ():
    _, objs, X0, geom = problem(dtype=torch.float32)
    opts = {"compressor": {"name": "randk", "ratio": 0.1}, "refresh_prob": 0.2, "lr": 0.02}
    a, ra = trajectory("gluon-marina", objs, X0, geom, seed=5, rounds=10, **opts)
    b, rb = trajectory("gluon-marina", objs, X0, geom, seed=5, rounds=10, **opts)
    c, _ = trajectory("gluon-marina", objs, X0, geom, seed=6, rounds=10, **opts)
    for n in a[-1]:
        assert torch.equal(a[-1][n], b[-1][n])
    assert any(not torch.equal(a[-1][n], c[-1][n]) for n in a[-1])
    cols = [c for c in ra.frame().columns if c not in TIMING_COLUMNS]
    assert ra.frame()[cols].equals(rb.frame()[cols])


@pytest.mark.parametrize("name", ["gluon-ef21", "gluon-dasha-mvr"])
def test_rejected_payload_keeps_trackers_consistent(name):
    """Client 2's payload is corrupted every third round: it is rejected, its state stays as before the
    round, and the server's G equals Σ_j w_j G_j over the committed client trackers."""
    model, objs, X0, geom, _ = synthetic_federation()
    spec = {"name": "topk", "ratio": 0.1} if name == "gluon-ef21" else {"name": "randk", "ratio": 0.1}
    algo = make_algorithm(name, geom, compressor=spec, lr=0.02)

    def tamper(k, j, reply):
        if j == 2 and k % 3 == 1:
            layer = sorted(reply.message)[0]
            arrays = dict(reply.message[layer].arrays)
            key = next(a for a in arrays if a.startswith("v."))
            bad = arrays[key].copy()
            bad.flat[0] = np.nan if bad.dtype.kind == "f" else 255
            arrays[key] = bad
            reply.message = {**reply.message, layer: dataclasses.replace(reply.message[layer], arrays=arrays)}
        return reply

    res = run_plain(algo, objs, X0, 12, seed=2, tamper=tamper, participation=1.0)
    df = res.frame()
    assert df["rejected"].tolist() == [1 if k % 3 == 1 else 0 for k in range(12)]
    w = client_weights(objs)
    tracker_key = "ef" if name == "gluon-ef21" else None
    G = res.server_state["G"]
    for n in G:
        rows = [client_state(res.table, j) for j in range(len(objs))]
        total = sum(w[j] * (rows[j][tracker_key]["g"][n] if tracker_key else rows[j]["g"][n])
                    for j in range(len(objs)))
        torch.testing.assert_close(G[n], total, rtol=1e-5, atol=1e-6)


def test_rejected_client_state_is_not_advanced():
    model, objs, X0, geom, _ = synthetic_federation()
    algo = make_algorithm("gluon-ef21", geom, compressor={"name": "topk", "ratio": 0.1})

    def tamper(k, j, reply):
        if j == 4 and k == 3:
            reply.round = 99  # a stale or replayed reply
        return reply
    run_a = run_plain(algo, objs, X0, 4, seed=0, tamper=tamper)
    run_b = run_plain(algo, objs, X0, 3, seed=0)
    a, b = client_state(run_a.table, 4), client_state(run_b.table, 4)
    for n in a["ef"]["g"]:
        assert torch.equal(a["ef"]["g"][n], b["ef"]["g"][n])
    # the rejected round is not counted: 3 commits, its X_prev still the model of round 2
    assert int(run_a.table.commits[4]) == int(run_b.table.commits[4]) == 3
    assert int(run_a.table.seen[4]) == int(run_b.table.seen[4]) == 2
    assert run_a.frame()["rejected"].tolist() == [0, 0, 0, 1]


def test_partial_participation_and_weights():
    model, objs, X0, geom, loss = synthetic_federation()
    res = run_plain(make_algorithm("gluon-ef21", geom, lr=0.05), objs, X0, 10, seed=0, participation=0.3,
                    weights="samples")
    df = res.frame()
    assert (df["participants"] == 3).all()
    assert loss(res.server_state["X"]) < loss(X0)
    with pytest.raises(ValueError, match="participation fraction"):
        run_plain(make_algorithm("gluon", geom), objs, X0, 1, participation=1.5)


def test_bad_options_name_the_field():
    _, _, _, geom = problem()
    with pytest.raises(ValueError, match="algorithm must be one of"):
        make_algorithm("fedprox", geom)
    with pytest.raises(ValueError, match="unknown option.*allowed"):
        make_algorithm("gluon", geom, momentum=0.9)
    with pytest.raises(ValueError, match="variant must be one of"):
        make_algorithm("gluon-mvr", geom, variant="mvr3")
    for name in ("gluon-dasha-mvr", "gluon-marina"):  # their analyses need E[Q(x)] = x
        with pytest.raises(ValueError, match=f"^compressor must be unbiased for {name}"):
            make_algorithm(name, geom, compressor={"name": "topk", "ratio": 0.1})


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_docstrings_state_equations_sources_and_rules(name):
    cls = ALGORITHMS[name]
    text = (inspect.getdoc(cls) or "") + (inspect.getmodule(cls).__doc__ or "")
    assert "←" in text  # the update equations, as ``X ← ...``
    assert "arXiv" in text or "et al." in text or "ALGORITHMS" in text  # the source
    assert "participation" in text.lower() and "reject" in text.lower()


@pytest.mark.parametrize("feedback", ["ef14", "none"])
def test_sgd_error_feedback_choices_equal_an_independent_loop(feedback):
    """``sgd`` (no momentum) with top-k and EF14 / no feedback, full local batches, float64, against a loop
    written here: ``p_j = topk(e_j + g_j)``, ``e_j ← e_j + g_j − p_j`` (EF14) or ``p_j = topk(g_j)``;
    ``X ← X − lr (k+1)^{-1/2} · mean_j p_j`` (the run's polynomial schedule drives torch's learning rate)."""
    _, objs, X0, geom = problem(num_clients=3, batch_size=10 ** 6)
    lr, ratio = 0.2, 0.25
    xs, _ = trajectory("sgd", objs, X0, geom, rounds=8, lr=lr, momentum=0.0, error_feedback=feedback,
                       schedule="polynomial", power=0.5,
                       compressor={"name": "topk", "ratio": ratio, "values": "fp64"}, values="fp64")

    def topk(t):
        k = max(1, int(np.ceil(ratio * t.numel())))
        flat = t.reshape(-1)
        out = torch.zeros_like(flat)
        idx = flat.abs().topk(k).indices
        out[idx] = flat[idx]
        return out.reshape(t.shape)

    X = {n: t.clone() for n, t in X0.items()}
    e = [{n: torch.zeros_like(t) for n, t in X0.items()} for _ in objs]
    for k in range(8):
        sent = []
        for j, obj in enumerate(objs):
            _, g = obj.gradient(X, obj.full_batch())
            p = {n: topk(e[j][n] + g[n]) if feedback == "ef14" else topk(g[n]) for n in g}
            if feedback == "ef14":
                e[j] = {n: e[j][n] + g[n] - p[n] for n in g}
            sent.append(p)
        X = {n: X[n] - lr * (k + 1) ** -0.5 * sum(p[n] for p in sent) / len(sent) for n in X}
        for n in X:
            torch.testing.assert_close(xs[k][n], X[n], rtol=1e-10, atol=1e-12)


def test_ef14_changes_the_trajectory_and_bad_feedback_is_named():
    _, objs, X0, geom = problem(num_clients=2, batch_size=10 ** 6)
    opts = {"lr": 0.2, "momentum": 0.0, "compressor": {"name": "topk", "ratio": 0.1}}
    a, _ = trajectory("sgd", objs, X0, geom, rounds=4, error_feedback="ef14", **opts)
    b, _ = trajectory("sgd", objs, X0, geom, rounds=4, error_feedback="none", **opts)
    assert not torch.equal(a[-1]["head.weight"], b[-1]["head.weight"])
    with pytest.raises(ValueError, match=r"error_feedback must be one of \['ef21', 'ef14', 'none'\]"):
        make_algorithm("gluon-ef21", geom, error_feedback="ef99")
    with pytest.raises(ValueError, match="tracker='fixed16' needs error_feedback='ef21'"):
        make_algorithm("gluon-ef21", geom, error_feedback="ef14", tracker="fixed16")


@pytest.mark.parametrize("rank", [1, 12])
def test_limuon_runs_whatever_layers_its_rank_factors(rank):
    """Rank 12 factors no layer of the 10-12-4 MLP (all kept full), rank 1 every matrix: a branch of the state
    without leaves is not kept by the client-state table, and the next round read it as missing (KeyError
    'P' for every client from round 1, found by a review)."""
    _, objs, X0, geom = problem()
    _, res = trajectory("limuon", objs, X0, geom, rounds=3, rank=rank)
    log = res.client_log
    assert log and all(r["status"] == "accepted" for r in log), {r["reason"] for r in log}
