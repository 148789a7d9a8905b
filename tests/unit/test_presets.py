"""The ``form`` option of Muon-MVR1/2: ``"reference"`` follows the published Muon-MVR code (arXiv 2509.15816,
github.com/MaeChd/MUON-MVR), checked against an independent transcription of that code's update below;
``"fedgluon"`` (default) is unchanged."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fedgluon.algorithms import make_algorithm
from fedgluon.clients.objective import SupervisedObjective
from fedgluon.core.rng import generator
from fedgluon.lmo.geometry import Geometry
from fedgluon.lmo.optim import Gluon
from fedgluon.sim.driver import run_plain

LR, WD, STEPS = 0.02, 0.1, 20


class Net(nn.Module):
    """A 3-D conv kernel and biases (the code's AdamW branch) and one matrix (its Muon branch)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def make_data(n=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 6, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, 3, (n,), generator=gen)


def make_net(seed=0):
    torch.manual_seed(seed)
    return Net().double()


# ---------------------------------------------------------------- the published update, transcribed
def polar(m):
    """U Vᵀ over the nonzero singular values (Newton–Schulz maps σ = 0 to 0; a softmax head's gradient has
    rank ≤ classes − 1)."""
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    keep = s > 1e-12 * s[0]
    return u[:, keep] @ vh[keep]


def published_muon_mvr(model, batches, *, approx, lr=LR, wd=WD, momentum=0.95, gamma=0.025,
                       adamw_betas=(0.95, 0.99), eps=1e-8):
    """The code's MuonMVR.step (``is_approx=True``: MVR1; False: MVR2, where the training loop first
    loads X_{t-1}, computes the batch's gradient there and calls ``update_last_grad``), with the exact
    polar factor in place of its Newton-Schulz. Returns the parameters after every step."""
    x_now = {n: p.detach().clone() for n, p in model.named_parameters()}
    st = {n: {"step": 0, "exp_avg": torch.zeros_like(p), "last_grad": torch.zeros_like(p),
              "exp_avg_sq": torch.zeros_like(p)} for n, p in x_now.items()}
    b1, b2 = adamw_betas

    def grad(params, batch):
        leaves = {n: t.clone().requires_grad_(True) for n, t in params.items()}
        loss = F.cross_entropy(functional_call(model, leaves, (batch[0],)), batch[1])
        return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))

    x_old, out = None, []
    for batch in batches:
        if not approx and x_old is not None:  # update_last_grad at the previous iterate, same batch
            for n, g in grad(x_old, batch).items():
                st[n]["last_grad"] = g
        x_old = {n: t.clone() for n, t in x_now.items()}
        g_all = grad(x_now, batch)
        for n, p in x_now.items():
            s, g = st[n], g_all[n]
            s["step"] += 1
            b = momentum if p.ndim == 2 else b1
            c = (g - s["last_grad"]) * (gamma * (b / (1 - b))) + g
            if c.norm() > 1:
                c = c / c.norm()
            s["exp_avg"] = b * s["exp_avg"] + (1 - b) * c
            if p.ndim == 2:
                update = polar(s["exp_avg"] / (1 - momentum))
                x_now[n] = p * (1 - lr * wd) - lr * 0.2 * math.sqrt(max(p.shape[0], p.shape[1])) * update
            else:
                s["exp_avg_sq"] = b2 * s["exp_avg_sq"] + (1 - b2) * c * c
                direction = s["exp_avg"] / (eps + s["exp_avg_sq"].sqrt())
                scale = (1 - b1 ** s["step"]) / (1 - b2 ** s["step"]) ** 0.5
                x_now[n] = p * (1 - lr * wd) - lr / scale * direction
            if approx:
                s["last_grad"] = g.clone()
        out.append({n: t.clone() for n, t in x_now.items()})
    return out


def optimizer_run(model, batches, method, **kw):
    opt = Gluon(model, lr=LR, method=method, weight_decay=WD, spectral_method="svd", **kw)
    out = []
    for x, y in batches:
        def closure(x=x, y=y):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)
        out.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return out


def batches_of(n_steps=STEPS, size=8, seed=1):
    x, y = make_data(seed=seed)
    gen = torch.Generator().manual_seed(seed)
    return [(x[i], y[i]) for i in (torch.randperm(len(x), generator=gen)[:size] for _ in range(n_steps))]


def max_gap(a, b):
    return max(max(float((a[k][n] - b[k][n]).abs().max()) for n in a[k]) for k in range(len(a)))


@pytest.mark.parametrize("variant", [1, 2])
@pytest.mark.parametrize("hyper", [{}, {"beta": 0.9, "gamma": 0.1, "adamw_betas": (0.8, 0.95)}])
def test_optimizer_reference_form_follows_the_published_code(variant, hyper):
    """The code's defaults, and values that tell its momentum from AdamW's β₁ (which its c uses there)."""
    batches = batches_of()
    code_kw = {"momentum": hyper["beta"], "gamma": hyper["gamma"], "adamw_betas": hyper["adamw_betas"]} if hyper else {}
    ref = published_muon_mvr(make_net(), batches, approx=variant == 1, **code_kw)
    ours = optimizer_run(make_net(), batches, f"muon-mvr{variant}", form="reference", **hyper)
    assert max_gap(ours, ref) <= 1e-10
    moved = max_gap(ref[-1:], [{n: p.detach() for n, p in make_net().named_parameters()}])
    assert moved > 1e-2  # the comparison is not vacuous


@pytest.mark.parametrize("variant", [1, 2])
def test_gluon_mvr_reference_form_with_one_client_follows_the_published_code(variant):
    x, y = make_data(seed=2)
    model = make_net()
    objective = SupervisedObjective(model, x, y, batch_size=8)
    seed = 5
    batches = [objective.sample_batch(generator(seed, "sample", 0, k)) for k in range(STEPS)]
    ref = published_muon_mvr(copy.deepcopy(model), batches, approx=variant == 1)
    geometry = Geometry.from_model(model, preset="muon_mvr", spectral_method="svd")
    algo = make_algorithm("gluon-mvr", geometry, variant=f"muon_mvr{variant}", form="reference", lr=LR,
                          weight_decay=WD, values="fp64")
    X0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = run_plain(algo, [objective], X0, rounds=STEPS, seed=seed)
    X = result.server_state["X"]
    assert max(float((X[n] - ref[-1][n]).abs().max()) for n in X) <= 1e-10


def test_first_step_is_the_codes_and_differs_from_fedgluons():
    """The code's last_grad starts at zero: c1 = g1 + γβ/(1−β)·g1 = 1.475·g1 before clipping."""
    from fedgluon.lmo.estimators import make_estimator

    g = {"w": torch.full((3, 2), 0.01, dtype=torch.float64), "b": torch.full((3,), 0.01, dtype=torch.float64)}
    _, est = make_estimator("muon_mvr1", beta=0.95, gamma=0.025, form="reference").step_one(None, g)
    torch.testing.assert_close(est["w"], 1.475 * g["w"], rtol=1e-12, atol=0)  # M1/(1−β) = c1
    _, est = make_estimator("muon_mvr1", beta=0.95, gamma=0.025).step_one(None, g)
    torch.testing.assert_close(est["w"], 0.05 * g["w"], rtol=1e-12, atol=0)  # M1 = (1−β)·g1


# ---------------------------------------------------------------- the default form is today's
def todays_muon_mvr(model, batches, *, variant, lr=LR, wd=WD, beta=0.95, gamma=0.025):
    """fedgluon's form as it was before ``form`` existed: c1 = g1, the ``muon`` geometry (spectral with
    sqrt(max(1, m/n)) on matrices and on the conv reshape, RMS on vectors), an LMO on every parameter."""
    x_now = {n: p.detach().clone() for n, p in model.named_parameters()}
    m = {n: torch.zeros_like(p) for n, p in x_now.items()}

    def grad(params, batch):
        leaves = {n: t.clone().requires_grad_(True) for n, t in params.items()}
        loss = F.cross_entropy(functional_call(model, leaves, (batch[0],)), batch[1])
        return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))

    last, x_old, out = None, None, []
    for batch in batches:
        if variant == 2 and x_old is not None:
            last = grad(x_old, batch)
        x_old = {n: t.clone() for n, t in x_now.items()}
        g_all = grad(x_now, batch)
        for n, p in x_now.items():
            g = g_all[n]
            c = g if last is None else g + gamma * beta / (1 - beta) * (g - last[n])
            if c.norm() > 1:
                c = c / c.norm()
            m[n] = beta * m[n] + (1 - beta) * c
            if p.ndim >= 2:
                mat = m[n].reshape(p.shape[0], -1)
                scale = 1 / math.sqrt(max(1.0, mat.shape[0] / mat.shape[1]))
                lmo = -polar(mat).reshape(p.shape) / scale
            else:
                lmo = -m[n] / m[n].norm() * math.sqrt(p.numel())
            x_now[n] = p * (1 - lr * wd) + lr * lmo
        if variant == 1:
            last = g_all
        out.append({n: t.clone() for n, t in x_now.items()})
    return out


@pytest.mark.parametrize("variant", [1, 2])
@pytest.mark.parametrize("form", [None, "fedgluon"])
def test_default_form_is_unchanged(variant, form):
    batches = batches_of(n_steps=8)
    ref = todays_muon_mvr(make_net(), batches, variant=variant)
    kw = {} if form is None else {"form": form}
    ours = optimizer_run(make_net(), batches, f"muon-mvr{variant}", **kw)
    assert max_gap(ours, ref) <= 1e-10
    reference = optimizer_run(make_net(), batches, f"muon-mvr{variant}", form="reference")
    assert max_gap(reference, ref) > 1e-3  # the two forms differ


@pytest.mark.parametrize("variant", [1, 2])
def test_gluon_mvr_default_form_is_unchanged(variant):
    x, y = make_data(seed=3)
    model = make_net()
    objective = SupervisedObjective(model, x, y, batch_size=8)
    batches = [objective.sample_batch(generator(7, "sample", 0, k)) for k in range(8)]
    ref = todays_muon_mvr(copy.deepcopy(model), batches, variant=variant, beta=0.9)  # gluon-mvr's default β
    algo = make_algorithm("gluon-mvr", Geometry.from_model(model, preset="muon", spectral_method="svd"),
                          variant=f"muon_mvr{variant}", lr=LR, weight_decay=WD, values="fp64")
    X0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    X = run_plain(algo, [objective], X0, rounds=8, seed=7).server_state["X"]
    assert max(float((X[n] - ref[-1][n]).abs().max()) for n in X) <= 1e-10


# ---------------------------------------------------------------- bad values: one clear error
def test_bad_form_is_one_clear_error():
    with pytest.raises(ValueError, match=r"form must be one of \['fedgluon', 'reference'\], got 'ref'"):
        Gluon(make_net(), method="muon-mvr2", form="ref")
    with pytest.raises(ValueError, match=r"form 'reference' applies to methods \['muon-mvr1', 'muon-mvr2'\]"):
        Gluon(make_net(), method="muon", form="reference")
    geometry = Geometry.from_model(make_net(), preset="muon_mvr")
    with pytest.raises(ValueError, match=r"algorithm.form must be one of \['fedgluon', 'reference'\], got 'x'"):
        make_algorithm("gluon-mvr", geometry, variant="muon_mvr1", form="x")
    with pytest.raises(ValueError, match=r"applies to variants \['muon_mvr1', 'muon_mvr2'\], got variant 'storm'"):
        make_algorithm("gluon-mvr", geometry, form="reference")
    with pytest.raises(ValueError, match=r"needs geometry.preset 'muon_mvr'.*\['conv.weight', 'conv.bias', "
                                         r"'fc.bias'\]"):
        make_algorithm("gluon-mvr", Geometry.from_model(make_net(), preset="muon"), variant="muon_mvr2",
                       form="reference")


def test_bad_form_in_a_config_is_one_error_line(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from fedgluon.exp.cli import main

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["run", "engine.name=plain", "rounds=1", "task.num_clients=2", "--quiet",
                                       "algorithm={name: gluon-mvr, variant: muon_mvr2, form: bogus}"])
    assert result.exit_code != 0
    assert "error: algorithm.form must be one of ['fedgluon', 'reference'], got 'bogus'" in result.output
    assert "Traceback" not in result.output
