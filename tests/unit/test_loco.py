"""diloco and muloco (fedgluon/algorithms/loco.py): reductions against few-line references written here,
float64, full participation; the inner optimizer's state kept across rounds and counted in the row."""

import numpy as np
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
from fedgluon.tasks.data.synthetic import leaf_synthetic
from fedgluon.tasks.models import MLP

IDENTITY = {"name": "identity", "values": "fp64"}
PLAIN_OUTER = {"outer_lr": 1.0, "outer_momentum": 0.0, "values": "fp64", "compressor": IDENTITY}


def tiny(num_clients):
    data = leaf_synthetic(num_clients, 0.5, 0.5, dim=6, classes=3, mean_samples=20, seed=3, dtype=torch.float64)
    torch.manual_seed(0)
    model = MLP(6, (5,), 3).to(torch.float64)
    objs = [SupervisedObjective(model, x, y, batch_size=4) for x, y in data]
    X0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    return model, objs, X0, Geometry.from_model(model, spectral_method="svd")


def grad(model, X, batch):
    """∇ of the mean cross-entropy at X on ``batch``, by autograd (independent of fedgluon's gradients)."""
    P = {n: t.detach().clone().requires_grad_(True) for n, t in X.items()}
    x, y = batch
    loss = F.cross_entropy(functional_call(model, P, (x,)), y)
    return dict(zip(P, torch.autograd.grad(loss, list(P.values()))))


def batch(obj, seed, j, k, s=0):
    """Client j's minibatch of inner step s of round k: ``generator(seed, "sample", j, k[, s])``, as the driver."""
    return obj.sample_batch(generator(seed, "sample", j, k) if s == 0 else generator(seed, "sample", j, k, s))


def final(name, objs, X0, geom, rounds, **options):
    return run_plain(make_algorithm(name, geom, **options), objs, X0, rounds, seed=5)


def test_diloco_sgd_h1_plain_outer_is_gradient_descent_on_the_mean_gradient():
    """H = 1 plain SGD step, outer lr 1 without momentum, identity: ``X ← X − η mean_j ∇f_j(X; ξ_j)``."""
    model, objs, X0, geom = tiny(3)
    eta, rounds = 0.3, 3
    res = final("diloco", objs, X0, geom, rounds, inner="sgd", local_steps=1, lr=eta, **PLAIN_OUTER)
    X = dict(X0)
    for k in range(rounds):
        gs = [grad(model, X, batch(o, 5, j, k)) for j, o in enumerate(objs)]
        X = {n: X[n] - eta * sum(g[n] for g in gs) / len(gs) for n in X}
    for n in X:
        torch.testing.assert_close(res.server_state["X"][n], X[n], rtol=1e-12, atol=1e-14)


def test_diloco_outer_nesterov_matches_the_papers_update():
    """Outer step ``b ← μb + Δ``, ``X ← X − η_out(Δ + μb)`` with Δ = X − X^H, two rounds, defaults 0.7 / 0.9."""
    model, objs, X0, geom = tiny(2)
    eta = 0.2
    res = final("diloco", objs, X0, geom, 2, inner="sgd", local_steps=1, lr=eta, values="fp64", compressor=IDENTITY)
    X, b = dict(X0), None
    for k in range(2):
        gs = [grad(model, X, batch(o, 5, j, k)) for j, o in enumerate(objs)]
        delta = {n: eta * sum(g[n] for g in gs) / len(gs) for n in X}  # X − mean X_j^1
        b = {n: delta[n] if b is None else 0.9 * b[n] + delta[n] for n in X}
        X = {n: X[n] - 0.7 * (delta[n] + 0.9 * b[n]) for n in X}
    for n in X:
        torch.testing.assert_close(res.server_state["X"][n], X[n], rtol=1e-12, atol=1e-14)


def adamw_reference(model, obj, X0, rounds, H, lr, wd, keep):
    """One client, outer lr 1 without momentum: the model after ``rounds`` rounds of H torch AdamW steps,
    the optimizer kept across rounds (``keep``) or rebuilt each round."""
    P = {n: t.detach().clone().requires_grad_(True) for n, t in X0.items()}
    opt = None
    for k in range(rounds):
        if opt is None or not keep:
            opt = torch.optim.AdamW(list(P.values()), lr=lr, weight_decay=wd)
        for s in range(H):
            x, y = batch(obj, 5, 0, k, s)
            opt.zero_grad()
            F.cross_entropy(functional_call(model, P, (x,)), y).backward()
            opt.step()
    return {n: p.detach() for n, p in P.items()}


def test_diloco_keeps_adamw_state_across_rounds():
    """Round 2 continues round 1's AdamW (moments and bias-correction count), as DiLoCo's workers do: one
    client with outer lr 1 and no momentum is 2H consecutive torch AdamW steps, not two restarts."""
    model, objs, X0, geom = tiny(1)
    H, lr, wd = 2, 0.05, 0.1
    res = final("diloco", objs, X0, geom, 2, local_steps=H, lr=lr, weight_decay=wd, **PLAIN_OUTER)
    kept = adamw_reference(model, objs[0], X0, 2, H, lr, wd, keep=True)
    restarted = adamw_reference(model, objs[0], X0, 2, H, lr, wd, keep=False)
    for n in kept:
        torch.testing.assert_close(res.server_state["X"][n], kept[n], rtol=1e-10, atol=1e-12)
    assert max(float((kept[n] - restarted[n]).abs().max()) for n in kept) > 1e-4
    assert int(client_state(res.table, 0)["inner"]["step"]["t"]) == 2 * H


def test_muloco_keeps_momentum_across_rounds():
    """The committed momentum after two rounds (H = 1, β = 0.5) is ``β(1−β)g₁ + (1−β)g₂``: round 2's
    EMA starts from round 1's, g_k at the broadcast model of round k on its batch."""
    model, objs, X0, geom = tiny(1)
    beta = 0.5
    res = final("muloco", objs, X0, geom, 2, local_steps=1, lr=0.05, beta=beta, nesterov=False, **PLAIN_OUTER)
    g1 = grad(model, X0, batch(objs[0], 5, 0, 0))
    X1 = final("muloco", objs, X0, geom, 1, local_steps=1, lr=0.05, beta=beta, nesterov=False,
               **PLAIN_OUTER).server_state["X"]
    g2 = grad(model, X1, batch(objs[0], 5, 0, 1))
    m = client_state(res.table, 0)["inner"]["m"]
    for n in m:
        torch.testing.assert_close(m[n], beta * (1 - beta) * g1[n] + (1 - beta) * g2[n], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name, per_entry", [("diloco", 2), ("muloco", 1)])
def test_inner_state_bytes_are_in_the_client_row(name, per_entry):
    """AdamW keeps m, v and a step count; Muon its momentum (plus MuLoCo's EF14 residual): all in the row."""
    model, objs, X0, geom = tiny(2)
    res = final(name, objs, X0, geom, 1, local_steps=1, values="fp64")
    d = sum(t.numel() for t in X0.values())
    ef = d if name == "muloco" else 0
    count = 8 if name == "diloco" else 0
    assert res.table.bytes_per_client == 8 * (per_entry * d + ef) + count + 16


def test_muloco_sends_two_bits_per_value_and_a_scale_per_tensor():
    model, objs, X0, geom = tiny(2)
    res = final("muloco", objs, X0, geom, 2, local_steps=2)
    d, layers = sum(t.numel() for t in X0.values()), len(X0)
    assert res.frame()["up_int32_total"].tolist() == [2 * (2 * d + 32 * layers)] * 2


def test_bad_options_name_the_field():
    *_, geom = tiny(1)
    for options, match in [({"inner": "lion"}, "inner must be one of"), ({"outer_momentum": 1.0}, "outer_momentum"),
                           ({"outer_lr": 0.0}, "outer_lr"), ({"state_dtype": "bfloat16"}, "state_dtype"),
                           ({"local_lr": 0.1}, "unknown option")]:
        with pytest.raises(ValueError, match=match):
            make_algorithm("diloco", geom, **options)
    with pytest.raises(ValueError, match="unknown option"):
        make_algorithm("muloco", geom, inner="adamw")


def test_muloco_end_to_end_matches_inner_muon_ef14_int2_and_outer_nesterov():
    """Two clients, H = 2, three rounds, MuLoCo's defaults but β: each client's inner step is
    ``M ← βM + (1−β)g``, ``X_j ← X_j + t·lmo((1−β)g + βM)`` (each layer's LMO of the geometry, t = lr·ρ_i),
    M kept across rounds; its uplink ``u_j = X_j^H − X`` goes through EF14 with the 2-bit absmax quantiser
    (``p = Q(e + u)``, ``e ← e + u − p``; per tensor ``s = max|v|`` as float32, levels {−s, 0, s});
    the server takes outer Nesterov SGD (0.7, 0.9) on ``Δ = −mean_j p_j``."""
    model, objs, X0, geom = tiny(2)
    beta, lr, H, rounds = 0.8, 0.05, 2, 3
    res = final("muloco", objs, X0, geom, rounds, local_steps=H, lr=lr, beta=beta, values="fp64")

    def int2(v):
        s = float(np.float32(v.abs().max()))
        return s * torch.round(v / s).clamp(-1, 1) if s > 0 else torch.zeros_like(v)

    def lmo(n, G):
        return geom.params[n].norm.lmo(G.unsqueeze(0))[0]

    X, b = dict(X0), None
    M = [{n: torch.zeros_like(t) for n, t in X0.items()} for _ in objs]
    e = [{n: torch.zeros_like(t) for n, t in X0.items()} for _ in objs]
    for k in range(rounds):
        p = []
        for j, o in enumerate(objs):
            Xj = dict(X)
            for s in range(H):
                g = grad(model, Xj, batch(o, 5, j, k, s))
                M[j] = {n: beta * M[j][n] + (1 - beta) * g[n] for n in X}
                Xj = {n: Xj[n] + lr * geom.params[n].radius * lmo(n, (1 - beta) * g[n] + beta * M[j][n]) for n in X}
            u = {n: Xj[n] - X[n] for n in X}
            p.append({n: int2(e[j][n] + u[n]) for n in X})
            e[j] = {n: e[j][n] + u[n] - p[j][n] for n in X}
        delta = {n: -sum(pj[n] for pj in p) / len(p) for n in X}
        b = {n: delta[n] if b is None else 0.9 * b[n] + delta[n] for n in X}
        X = {n: X[n] - 0.7 * (delta[n] + 0.9 * b[n]) for n in X}
    for n in X:
        torch.testing.assert_close(res.server_state["X"][n], X[n], rtol=1e-10, atol=1e-12)
    for j in range(2):
        row = client_state(res.table, j)
        for n in X:
            torch.testing.assert_close(row["inner"]["m"][n], M[j][n], rtol=1e-10, atol=1e-12)
