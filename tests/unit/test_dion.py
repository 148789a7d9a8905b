"""Dion and Orth-Dion (fedgluon/algorithms/dion.py): reductions against few-line references written here,
float64, full local batches, constant radius; and the commit rule of rounds with two phases."""

import pytest
import torch
import torch.nn.functional as F
from helpers import client_state
from torch.func import functional_call

from fedgluon.algorithms import make_algorithm
from fedgluon.clients.objective import SupervisedObjective
from fedgluon.core.rng import generator
from fedgluon.lmo.geometry import Geometry
from fedgluon.sim.driver import run_plain
from fedgluon.sim.faults import FaultPlan
from fedgluon.tasks.data.synthetic import leaf_synthetic
from fedgluon.tasks.models import MLP

LR, BETA = 0.05, 0.9


def problem(num_clients, head="spectral"):
    """An MLP whose every layer but the head has the spectral norm (biases as m×1 matrices), the head
    ``head``; full local batches."""
    data = leaf_synthetic(num_clients, 0.5, 0.5, dim=10, classes=4, mean_samples=30, seed=1, dtype=torch.float64)
    torch.manual_seed(0)
    model = MLP(10, (12,), 4).to(torch.float64)
    objs = [SupervisedObjective(model, x, y, batch_size=10 ** 6) for x, y in data]
    X0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    norms = [{"pattern": "*", "norm": "spectral"}, {"pattern": "head.weight", "norm": head}]
    geom = Geometry.from_model(model, spectral_method="svd", overrides=norms)
    return model, data, objs, X0, geom


def grads(model, X, data):
    """Each client's full-batch gradient, by autograd here."""
    out = []
    for x, y in data:
        leaves = {n: t.detach().requires_grad_(True) for n, t in X.items()}
        loss = F.cross_entropy(functional_call(model, leaves, (x,)), y)
        out.append(dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())))))
    return out


def run(name, objs, X0, geom, rounds, **options):
    xs = []
    algo = make_algorithm(name, geom, lr=LR, schedule="constant", values="fp64", beta=BETA,
                          **{k: v for k, v in options.items() if v is not None})
    res = run_plain(algo, objs, X0, rounds, evaluate=lambda X, k: xs.append({n: t.clone() for n, t in X.items()}) or {})
    return xs, res


def polar(W):
    U, _, Vh = torch.linalg.svd(W, full_matrices=False)
    return U @ Vh


ADAPTIVE = {"L0": 10.0, "L1": 0.5}


@pytest.mark.parametrize("adaptive", [None, ADAPTIVE])
def test_full_rank_exact_svd_equals_gluon_with_the_same_momentum(adaptive):
    """r = min(m, n), orthonormalise="svd": Dion = Gluon with EMA momentum β (zero start), 3 clients:
    ``M_j ← βM_j + (1−β)g_j``, ``X ← X − t·polar(mean_j M_j)/c``. The head's cross-entropy gradient has
    rank classes − 1, so its polar factor is not unique: it has the sign norm, ``X ← X − t·sign(mean)/c``
    (fedgluon's choice for layers without a spectral norm). With Gluon's adaptive radius
    ``t = d/(L0 + L1·d)`` of the dual norm ``d`` of the EMA mean (nuclear norm / c, ℓ1 / c for the head):
    Dion's heavy-ball sums are 1/(1−β) times that EMA, so a wrong scale would change every spectral step."""
    model, data, objs, X0, geom = problem(3, head="sign")
    rounds = 8
    xs, _ = run("dion", objs, X0, geom, rounds, rank_fraction=1.0, orthonormalise="svd", adaptive=adaptive)
    X = {n: t.clone() for n, t in X0.items()}
    M = [{n: torch.zeros_like(t) for n, t in X.items()} for _ in data]
    for k in range(rounds):
        for j, g in enumerate(grads(model, X, data)):
            M[j] = {n: BETA * M[j][n] + (1 - BETA) * g[n] for n in X}
        for n, x in X.items():
            mean = sum(Mj[n] for Mj in M) / len(M)
            c = geom.params[n].norm.factor
            if n == "head.weight":
                unit, dual = torch.sign(mean), mean.abs().sum() / c
            else:
                matrix = mean.reshape(x.shape[0], -1)
                unit, dual = polar(matrix).reshape(x.shape), torch.linalg.matrix_norm(matrix, ord="nuc") / c
            t = LR if adaptive is None else dual / (adaptive["L0"] + adaptive["L1"] * dual)
            X[n] = x - t * unit / c
        for n in X:
            torch.testing.assert_close(xs[k][n], X[n], rtol=1e-10, atol=1e-12, msg=f"round {k}, {n}")


def test_three_clients_small_rank_equal_power_iteration_on_weighted_means():
    """Three clients of unequal sizes (``weights="samples"``), rank 2, Dion: the server's P is the QR of the
    weighted mean of the clients' ``P_j = B_j Q``, its R the weighted mean of ``R_j = B_jᵀ P``, and each
    client's error feedback subtracts its own ``P R_jᵀ``; below full rank ``P Pᵀ B_j ≠ B_j``, so the
    averaging and the feedback both show in the iterates."""
    model, data, objs, X0, geom = problem(3)
    sizes = [len(y) for _, y in data]
    assert len(set(sizes)) > 1, sizes  # unequal weights
    w = [s / sum(sizes) for s in sizes]
    rounds, r = 6, 2
    xs = []
    algo = make_algorithm("dion", geom, lr=LR, schedule="constant", values="fp64", beta=BETA, rank=r)
    run_plain(algo, objs, X0, rounds, weights="samples",
              evaluate=lambda X, k: xs.append({n: t.clone() for n, t in X.items()}) or {})
    X = {n: t.clone() for n, t in X0.items()}
    mat = {n: (t.shape[0], t[0].numel()) for n, t in X.items()}
    rank = {n: min(r, *mat[n]) for n in X}

    def colnorm(R):
        return R / torch.linalg.vector_norm(R, dim=0).clamp_min(1e-8)

    Q = {n: colnorm(torch.randn(mat[n][1], rank[n], generator=generator(0, "dion-q", i), dtype=torch.float64))
         for i, n in enumerate(X)}
    M = [{n: torch.zeros(mat[n], dtype=torch.float64) for n in X} for _ in data]
    assert any(rank[n] < min(mat[n]) for n in X)
    for k in range(rounds):
        g = grads(model, X, data)
        for n, x in X.items():
            B = [M[j][n] + g[j][n].reshape(mat[n]) for j in range(3)]
            P = torch.linalg.qr(sum(w[j] * B[j] @ Q[n] for j in range(3))).Q
            R = [Bj.T @ P for Bj in B]
            for j in range(3):
                M[j][n] = B[j] - (1 - BETA) * P @ R[j].T
            Q[n] = colnorm(sum(w[j] * R[j] for j in range(3)))
            X[n] = x - LR * (P @ Q[n].T).reshape(x.shape) / geom.params[n].norm.factor
        for n in X:
            torch.testing.assert_close(xs[k][n], X[n], rtol=1e-10, atol=1e-12, msg=f"round {k}, {n}")


@pytest.mark.parametrize("name", ["dion", "orth-dion"])
def test_one_client_small_rank_equals_power_iteration(name):
    """One client, rank 2: ``B = M + G``, ``P = qr(BQ)``, ``R = BᵀP``, ``M = B − (1−μ)PRᵀ``,
    ``Q = colnorm(R)`` (Dion) or ``qr(R)`` with a positive diagonal (Orth-Dion), ``X ← X − t·PQᵀ/c``; Q starts
    from the seeded Gaussian ``generator(seed, "dion-q", layer index)`` passed through the same rule."""
    model, data, objs, X0, geom = problem(1)
    rounds, r = 6, 2
    xs, res = run(name, objs, X0, geom, rounds, rank=r)

    def right(R):
        if name == "dion":
            return R / torch.linalg.vector_norm(R, dim=0).clamp_min(1e-8)
        Qr, T = torch.linalg.qr(R)
        return Qr * torch.sign(torch.diagonal(T))  # the QR with a positive diagonal

    X = {n: t.clone() for n, t in X0.items()}
    mat = {n: (t.shape[0], t[0].numel()) for n, t in X.items()}
    rank = {n: min(r, *mat[n]) for n in X}
    Q = {n: right(torch.randn(mat[n][1], rank[n], generator=generator(0, "dion-q", i), dtype=torch.float64))
         for i, n in enumerate(X)}
    M = {n: torch.zeros(mat[n], dtype=torch.float64) for n in X}
    for k in range(rounds):
        g = grads(model, X, data)[0]
        for n, x in X.items():
            B = M[n] + g[n].reshape(mat[n])
            P = torch.linalg.qr(B @ Q[n]).Q
            R = B.T @ P
            M[n] = B - (1 - BETA) * P @ R.T
            Q[n] = right(R)
            X[n] = x - LR * (P @ Q[n].T).reshape(x.shape) / geom.params[n].norm.factor
        for n in X:
            torch.testing.assert_close(xs[k][n], X[n], rtol=1e-10, atol=1e-12, msg=f"round {k}, {n}")
    # bits per phase: P_j (m·r) up in phase 0, R_j (n·r) in phase 1; Q down in phase 0 with the model, P in phase 1
    row = res.frame().iloc[0]
    assert row["up_phase0_values_total"] == 64 * sum(mat[n][0] * rank[n] for n in X)
    assert row["up_phase1_values_total"] == 64 * sum(mat[n][1] * rank[n] for n in X)
    assert row["down_phase1_values_total"] == 64 * sum(mat[n][0] * rank[n] for n in X)
    model_values = sum(t.numel() for t in X0.values())
    assert row["down_phase0_values_total"] == 64 * (model_values + sum(mat[n][1] * rank[n] for n in X))
    assert row["up_values_total"] == row["up_phase0_values_total"] + row["up_phase1_values_total"]
    assert row["phases"] == 2  # two round trips in the simulated time (fedgluon.exp.experiment)


def test_a_client_out_in_phase_two_keeps_its_state_and_the_round_goes_on():
    """Faults in the second phase (raise) and a reply rejected there: those clients' rows are as before
    the round (their phase-0 proposal is never committed); the other clients are committed."""
    model, data, objs, X0, geom = problem(6)
    plan = FaultPlan.from_spec({"raise_prob": 0.5, "phase": 1})
    failing = {j for j in range(6) if plan.draw(0, j, 2, phase=1)}
    assert failing and len(failing) < 5, failing  # the seed's draw: some fail in round 2, not all

    calls = []

    def tamper(k, j, reply):  # called for each phase's replies in turn
        calls.append((k, j))
        if (k, j) == (2, min(set(range(6)) - failing)) and calls.count((k, j)) == 2:
            reply.round = 99  # a replayed reply in the second phase: rejected
        return reply

    opts = {"lr": LR, "values": "fp64", "rank": 2}
    before = run_plain(make_algorithm("dion", geom, **opts), objs, X0, 2, faults=plan)
    after = run_plain(make_algorithm("dion", geom, **opts), objs, X0, 3, faults=plan, tamper=tamper)
    out = failing | {min(set(range(6)) - failing)}
    row = after.frame().iloc[2]
    assert (row["failed"], row["rejected"], row["accepted"]) == (len(failing), 1, 6 - len(out))
    for j in range(6):
        a, b = client_state(after.table, j)["M"], client_state(before.table, j)["M"]
        same = all(torch.equal(a[n], b[n]) for n in a)
        assert same == (j in out), j
        assert int(after.table.commits[j]) == int(before.table.commits[j]) + (j not in out)
    assert all(plan.draw(0, j, k) is None for j in range(6) for k in range(3))  # nothing fails in phase 0


def test_stop_and_resume_equals_the_uninterrupted_run(tmp_path):
    """Partial participation, a stop after round 2 with a checkpoint (server Q's source R, client
    momenta), then a resume: metrics, client log, model and client-state table bitwise as without the stop."""
    from helpers import stop_and_resume

    _, _, objs, X0, geom = problem(5)
    algo = make_algorithm("orth-dion", geom, lr=LR, rank=2)
    stop_and_resume(algo, objs, X0, 5, 2, tmp_path / "c.pt", seed=4, participation=3)
