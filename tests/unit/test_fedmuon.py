"""``fedmuon`` (arXiv 2510.27403) and ``fedmuon-bc`` (arXiv 2509.26337): float64 runs against few-line loops
written here from the papers' equations (full local batches, SVD LMO), and their bits per round."""

import pytest
import torch
from helpers import client_state
from test_algorithms import EXACT, problem, trajectory

from fedgluon.algorithms import make_algorithm
from fedgluon.sim.driver import run_plain

ROUNDS, TAU = 4, 2
LR = EXACT["lr"]


def radius(r, s):
    """The run's polynomial schedule at local step s of round r: ``lr (rτ + s + 1)^{-1/2}``."""
    return LR * (r * TAU + s + 1) ** -0.5


def full_gradient(obj, X):
    return obj.gradient(X, obj.full_batch())[1]


def zeros(X):
    return {n: torch.zeros_like(t) for n, t in X.items()}


def mean(models):
    return {n: sum(m[n] for m in models) / len(models) for n in models[0]}


def assert_rounds(xs, ys):
    assert len(xs) == len(ys) == ROUNDS
    for r, (a, b) in enumerate(zip(xs, ys)):
        for n in b:
            torch.testing.assert_close(a[n], b[n], rtol=1e-10, atol=1e-12, msg=f"round {r}, {n}")


def fedmuon_reference(objs, X0, geom, beta, alpha, aggregate):
    """arXiv 2510.27403: momentum from M̄ (or 0), the step ``x ← x − η[(1−α) orth(M) + αΔᵍ]`` (``−η orth(M)``
    is ``η lmo(M)``), ``x ← mean x_i``, ``Δᵍ = −(x^{r+1} − x^r)/(Kη)`` kept as ``ηΔᵍ`` (η varies with the
    step), ``M̄ ← mean M_i``. The paper's heavy-ball ``M ← βM + g`` is written here as ``(1−β)`` times it,
    ``M ← βM + (1−β)g`` (M̄ scales with it): orth ignores the scale, and the SVD of a nearly singular M
    differs by ~1e-9 between the two scalings, more than the reduction's tolerance."""
    X, Mbar, eta_dg, out = dict(X0), zeros(X0), zeros(X0), []
    for r in range(ROUNDS):
        ends, moms = [], []
        for obj in objs:
            Xi, M = dict(X), dict(Mbar) if aggregate else zeros(X0)
            for s in range(TAU):
                g = full_gradient(obj, Xi)
                M = {n: beta * M[n] + (1 - beta) * g[n] for n in M}
                d = geom.lmo(M)
                Xi = {n: Xi[n] + (1 - alpha) * radius(r, s) * d[n] - alpha * eta_dg[n] for n in Xi}
            ends.append(Xi)
            moms.append(M)
        new = mean(ends)
        eta_dg = {n: -(new[n] - X[n]) / TAU for n in X}
        X, Mbar = new, mean(moms)
        out.append(X)
    return out


@pytest.mark.parametrize("alpha, aggregate", [(0.0, False), (0.5, True), (0.3, False)])
def test_fedmuon_equals_the_papers_loop(alpha, aggregate):
    """α = 0 without momentum aggregation is local Muon steps (momentum restarted every round, models
    averaged): ``local-gluon``'s method, here against the loop, not against its code."""
    _, objs, X0, geom = problem(num_clients=2, batch_size=10 ** 6)
    xs, _ = trajectory("fedmuon", objs, X0, geom, rounds=ROUNDS, local_steps=TAU, beta=0.8, alpha=alpha,
                       momentum_aggregation=aggregate, **EXACT)
    assert_rounds(xs, fedmuon_reference(objs, X0, geom, 0.8, alpha, aggregate))


def muon_reference(obj, X0, geom, beta, steps):
    """Centralised Muon with EMA momentum, kept across rounds: ``M ← βM + (1−β)g``, ``X ← X + t lmo(M)``."""
    X, M, out = dict(X0), zeros(X0), []
    for k in range(steps):
        g = full_gradient(obj, X)
        M = {n: beta * M[n] + (1 - beta) * g[n] for n in M}
        d = geom.lmo(M)
        X = {n: X[n] + LR * (k + 1) ** -0.5 * d[n] for n in X}
        if (k + 1) % TAU == 0:
            out.append(X)
    return out


@pytest.mark.parametrize("clients, identical", [(1, False), (3, True)])
def test_fedmuon_bc_with_equal_control_variates_is_centralised_muon(clients, identical):
    """The reduction arXiv 2509.26337 implies: c = Σ_i w_i c_i, so when every client's c_i is the same
    (one client, or identical clients on full batches) the correction m − c_i + c is m and the method
    is Muon run for R·τ steps with its momentum kept across rounds."""
    _, objs, X0, geom = problem(num_clients=clients, identical=identical, batch_size=10 ** 6)
    xs, _ = trajectory("fedmuon-bc", objs, X0, geom, rounds=ROUNDS, local_steps=TAU, beta=0.7, **EXACT)
    assert_rounds(xs, muon_reference(objs[0], X0, geom, 0.7, ROUNDS * TAU))


def fedmuon_bc_reference(objs, X0, geom, a):
    """arXiv 2509.26337 Alg. 1, full participation: ``m_i ← (1−a)m_i + a g`` from ``m_i = c_i``,
    ``x_i ← x_i + η lmo(m_i − c_i + c)``, ``c_i ← m_i``, ``c ← c + (1/n)Σ_i Δc_i``, ``x ← x + (1/n)Σ_i Δx_i``."""
    n = len(objs)
    X, c, cs, out = dict(X0), zeros(X0), [zeros(X0) for _ in objs], []
    for r in range(ROUNDS):
        dx, dc = [], []
        for i, obj in enumerate(objs):
            Xi, m = dict(X), dict(cs[i])
            for s in range(TAU):
                g = full_gradient(obj, Xi)
                m = {k: (1 - a) * m[k] + a * g[k] for k in m}
                d = geom.lmo({k: m[k] - cs[i][k] + c[k] for k in m})
                Xi = {k: Xi[k] + radius(r, s) * d[k] for k in Xi}
            dx.append({k: Xi[k] - X[k] for k in X})
            dc.append({k: m[k] - cs[i][k] for k in m})
            cs[i] = m
        c = {k: c[k] + sum(d[k] for d in dc) / n for k in c}
        X = {k: X[k] + sum(d[k] for d in dx) / n for k in X}
        out.append(X)
    return out


def test_fedmuon_bc_equals_algorithm_1_on_heterogeneous_clients():
    _, objs, X0, geom = problem(num_clients=2, batch_size=10 ** 6)
    xs, _ = trajectory("fedmuon-bc", objs, X0, geom, rounds=ROUNDS, local_steps=TAU, beta=0.6, **EXACT)
    assert_rounds(xs, fedmuon_bc_reference(objs, X0, geom, 0.4))


@pytest.mark.parametrize("name, options, up, down", [
    ("fedmuon", {}, 2, 3),  # Δ and M_i up; X, M̄ and Δᵍ down
    ("fedmuon", {"momentum_aggregation": False}, 1, 2),  # Δ up; X and Δᵍ down
    ("fedmuon", {"alpha": 0.0}, 2, 2),  # Δ and M_i up; X and M̄ down
    ("fedmuon", {"alpha": 0.0, "momentum_aggregation": False}, 1, 1),  # local Muon: Δ up, X down
    ("fedmuon-bc", {}, 2, 2),  # Δx and Δc up; x and c down
])
def test_bits_per_round_count_every_term(name, options, up, down):
    """Per round, 64-bit values: uplink ``up·d`` per accepted client, downlink ``down·d`` per receiver
    (half of 4 clients take part each round)."""
    _, objs, X0, geom = problem(num_clients=4)
    res = run_plain(make_algorithm(name, geom, local_steps=2, **options, **EXACT), objs, X0, 3, participation=0.5)
    d = sum(t.numel() for t in X0.values())
    frame = res.frame()
    assert (frame["accepted"] == 2).all() and (frame["participants"] == 2).all()
    assert (frame["up_int32_total"] == 2 * up * d * 64).all()
    assert (frame["down_int32_total"] == 2 * down * d * 64).all()


def test_options_are_checked():
    _, _, _, geom = problem(num_clients=1)
    with pytest.raises(ValueError, match="alpha must be in"):
        make_algorithm("fedmuon", geom, alpha=1.5)
    with pytest.raises(ValueError, match="beta must be in"):
        make_algorithm("fedmuon-bc", geom, beta=1.0)


@pytest.mark.parametrize("drop", ["control:", ""], ids=["control-terms", "model-delta"])
def test_a_reply_without_its_control_terms_is_rejected_and_c_stays_the_mean_of_the_clients(drop):
    """Client 1's reply loses its control terms (or its model delta) every other round: it is rejected, its
    momentum row stays as before the round, and the server's c equals Σ_j w_j c_j over the committed rows."""
    _, objs, X0, geom = problem(num_clients=3, dtype=torch.float32)
    algo = make_algorithm("fedmuon-bc", geom, local_steps=2, lr=0.02)

    def tamper(k, j, reply):
        if j == 1 and k % 2 == 1:
            reply.message = {n: p for n, p in reply.message.items() if (n.startswith("control:") == (drop == ""))}
        return reply

    res = run_plain(algo, objs, X0, 4, seed=2, tamper=tamper)
    assert res.frame()["rejected"].tolist() == [0, 1, 0, 1]
    assert res.table.commits.tolist() == [4, 2, 4]
    rows = [client_state(res.table, j)["m"] for j in range(3)]
    c = {n.removeprefix("control:"): t for n, t in res.server_state["G"].items() if n.startswith("control:")}
    assert c.keys() == X0.keys()
    for n in c:
        torch.testing.assert_close(c[n], sum(rows[j][n] for j in range(3)) / 3, rtol=1e-5, atol=1e-7)


