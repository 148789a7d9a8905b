"""fedgluon.lmo.optim.Gluon against independently written references."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from fedgluon.lmo.optim import Gluon
from fedgluon.tasks.models import MLP


def reference_muon_step(params, bufs, grads, lr, beta=0.95):
    """KellerJordan/Muon muon_update (nesterov, NS5 quintic) in fp32, written out here."""
    for name, p in params.items():
        g = grads[name]
        bufs[name] = bufs[name] * beta + (1 - beta) * g if name in bufs else (1 - beta) * g
        u = (1 - beta) * g + beta * bufs[name]
        X = u.T if u.shape[0] > u.shape[1] else u
        X = X / (X.norm() + 1e-7)
        for _ in range(5):
            A = X @ X.T
            B = -4.7750 * A + 2.0315 * A @ A
            X = 3.4445 * X + B @ X
        orth = X.T if u.shape[0] > u.shape[1] else X
        orth = orth * math.sqrt(max(1.0, u.shape[0] / u.shape[1]))
        p.sub_(lr * orth)


def test_gluon_reproduces_reference_muon_step_for_step():
    torch.manual_seed(0)
    model = MLP(20, (48, 24), 5, bias=False)
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    # lmo_device="cpu": the reference runs NS in fp32 on the CPU (on a GPU machine "auto" would take bf16 there)
    opt = Gluon(model, lr=0.02, method="muon", roles={"*": "hidden"}, lmo_device="cpu")
    bufs = {}
    for step in range(10):
        x, y = torch.randn(16, 20), torch.randint(0, 5, (16,))
        # reference gradient at the reference parameters
        ref_model = copy.deepcopy(model)
        with torch.no_grad():
            for n, p in ref_model.named_parameters():
                p.copy_(ref[n])
        F.cross_entropy(ref_model(x), y).backward()
        reference_muon_step(ref, bufs, {n: p.grad for n, p in ref_model.named_parameters()}, 0.02)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), ref[n], rtol=1e-4, atol=1e-5, msg=f"step {step} {n}")


def plain_lmo_step_reference(W, b, gW, gb, t):
    """X ← X + t·lmo(∇f(X)) with the exact spectral LMO (scion factor) and the RMS LMO, by hand."""
    U, S, Vh = torch.linalg.svd(gW, full_matrices=False)
    c = math.sqrt(W.shape[1] / W.shape[0])
    return W - t / c * (U @ Vh), b - t * math.sqrt(b.numel()) * gb / gb.norm()


def test_mvr_beta_zero_equals_plain_gradient_lmo_float64():
    torch.manual_seed(1)
    X = torch.randn(64, 6, dtype=torch.float64)
    Y = torch.randn(64, 4, dtype=torch.float64)
    lin = torch.nn.Linear(6, 4).double()
    W, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    opt = Gluon(lin, lr=0.05, method="gluon-mvr", beta=0.0, schedule="constant", spectral_method="svd")
    for _ in range(30):
        def closure():
            opt.zero_grad()
            loss = ((lin(X) - Y) ** 2).mean()
            loss.backward()
            return loss
        opt.step(closure)
        Wr = W.clone().requires_grad_()
        br = b.clone().requires_grad_()
        ((X @ Wr.T + br - Y) ** 2).mean().backward()
        W, b = plain_lmo_step_reference(W, b, Wr.grad, br.grad, 0.05)
        torch.testing.assert_close(lin.weight.detach(), W, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(lin.bias.detach(), b, rtol=1e-10, atol=1e-12)


def test_sarah_through_closures_equals_true_gradient_float64():
    """Full batch, no refresh after step 0: the SARAH estimate is the true gradient at X^k."""
    torch.manual_seed(2)
    X = torch.randn(50, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (50,))
    model = MLP(5, (7,), 3).double()
    opt = Gluon(model, lr=0.02, method="gluon-sarah", refresh_period=10**9, spectral_method="svd")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(X), y)
        loss.backward()
        return loss

    for _ in range(30):
        closure()
        true = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step(closure)
        for n in true:
            torch.testing.assert_close(opt._est_state["v"][n], true[n], rtol=1e-10, atol=1e-13)


def test_state_dict_resume_is_bitwise():
    torch.manual_seed(3)
    data = [(torch.randn(8, 10), torch.randint(0, 3, (8,))) for _ in range(8)]

    def train(model, opt, batches):
        for x, y in batches:
            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)  # noqa: B023 - called within the iteration that defines it
                loss.backward()
                return loss
            opt.step(closure)

    m1 = MLP(10, (16,), 3)
    m2 = copy.deepcopy(m1)
    o1 = Gluon(m1, lr=0.01, method="muon-mvr2")
    train(m1, o1, data)
    o2 = Gluon(m2, lr=0.01, method="muon-mvr2")
    train(m2, o2, data[:4])
    saved = copy.deepcopy(o2.state_dict())
    m3 = copy.deepcopy(m2)
    o3 = Gluon(m3, lr=0.01, method="muon-mvr2")
    o3.load_state_dict(saved)
    train(m3, o3, data[4:])
    for (n, a), (_, b) in zip(m1.named_parameters(), m3.named_parameters()):
        assert torch.equal(a, b), n


def test_constrained_mode_stays_in_ball():
    torch.manual_seed(4)
    model = MLP(8, (8,), 4)
    opt = Gluon(model, lr=0.2, method="scion", constrained=True, spectral_method="svd",
                radius={"hidden": 2.0, "head": 3.0, "vector": 1.0})
    for _ in range(60):
        x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    norms = opt.geometry.norms({n: p.detach() for n, p in model.named_parameters()})
    for n, v in norms.items():
        rho = opt.geometry.params[n].radius
        assert float(v) <= rho * (1 + 1e-5), (n, float(v), rho)


def test_errors_are_clear():
    model = MLP(4, (4,), 2)
    with pytest.raises(ValueError, match="method must be one of"):
        Gluon(model, method="adamw")
    with pytest.raises(TypeError, match="unknown options"):
        Gluon(model, momentum=0.9)
    opt = Gluon(model, method="gluon-mvr")
    x = torch.randn(3, 4)
    model(x).sum().backward()
    opt.step()
    model(x).sum().backward()
    with pytest.raises(ValueError, match="needs step\\(closure\\)"):
        opt.step()
