"""The GPU paths: Newton–Schulz in bf16 on CUDA (batched, compiled), the LMO identities on CUDA, the
server's LMO and the client blocks' gradients on the GPU inside whole runs. Skipped without CUDA: CI has
no GPU, so these run on a GPU machine (the device tool; BENCHMARKS.md says when they last did), and the
CPU fallbacks are what the rest of the suite checks.

Tolerances in bf16 are relative Frobenius errors, ``‖A − B‖_F / ‖B‖_F``: bf16 keeps 8 bits of mantissa
(relative rounding 2⁻⁹ ≈ 2e-3 per operation), and five NS steps of 3 matmuls each compound it.
"""

import pandas as pd
import pytest
import torch
from helpers import run_inprocess, same_metrics

from fedgluon.config import spec as specs
from fedgluon.lmo.geometry import Geometry
from fedgluon.lmo.norms import RMS, ColNorm, RowNorm, Sign, Spectral
from fedgluon.lmo.polar import NewtonSchulz, SVDPolar, resolve_dtype
from fedgluon.sim.driver import run_plain
from fedgluon.tasks.models import MLP

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

TASK = {"name": "synthetic", "num_clients": 6, "dim": 24, "classes": 5, "hidden": [48, 32], "mean_samples": 40,
        "batch_size": 16}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a − b‖_F / ‖b‖_F`` in float64 on the CPU."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm())


def gaussian(*shape: int, seed: int = 0, device: str = "cuda") -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device)


def test_ns_on_cuda_is_bf16_by_default_and_batched_equals_per_matrix():
    """``dtype="auto"`` is bf16 on CUDA; the batched call equals per-matrix calls (to bf16 rounding) and the
    fp32 result on the CPU (to bf16's accuracy); asked for fp32, CUDA gives the CPU's fp32 result. Measured
    on an H100 (torch 2.11): batched and per-matrix bitwise equal, bf16 1.6e-2 from fp32, CUDA fp32 1.2e-6
    from the CPU's."""
    G = gaussian(6, 96, 48)
    assert resolve_dtype("auto", G) == torch.bfloat16
    ns = NewtonSchulz()
    batched = ns(G)
    assert batched.dtype == torch.float32 and batched.is_cuda
    single = torch.stack([ns(g) for g in G])
    cpu32 = NewtonSchulz()(G.cpu())
    assert rel(batched, single) < 1e-2, rel(batched, single)
    assert rel(batched, cpu32) < 3e-2, rel(batched, cpu32)
    gpu32 = NewtonSchulz(dtype="float32")(G)
    torch.testing.assert_close(gpu32.cpu(), cpu32, rtol=1e-4, atol=1e-5)


def test_ns_in_bf16_keeps_singular_values_in_a_band():
    """The quintic's band in bf16 on CUDA: every singular value with σ_i/‖G‖_F > 1e-2 maps to p(σ_i) in
    [0.6, 1.25] (fp32's band, tests/unit/test_norms.py, is [0.65, 1.17]); the NS estimate of the dual norm,
    −<G, lmo(G)>, is 0.7–1.0 of the nuclear norm. Measured on an H100: p(σ) in [0.680, 1.136], the dual
    estimate 0.80–0.85 of the nuclear norm."""
    norm = Spectral(factor=1.0, oracle=NewtonSchulz())
    for shape in [(64, 64), (128, 32), (32, 128), (256, 64)]:
        G = gaussian(4, *shape, seed=sum(shape))
        U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
        L, est = norm.lmo_and_dual(G)
        mapped = -torch.einsum("bmi,bmn,bin->bi", U, L.double(), Vh)
        sel = mapped[S / S.norm(dim=1, keepdim=True) > 1e-2]
        assert 0.6 < sel.min() and sel.max() < 1.25, (shape, float(sel.min()), float(sel.max()))
        ratio = est.double() / torch.linalg.matrix_norm(G.double(), ord="nuc")
        assert ((ratio > 0.7) & (ratio < 1.0)).all(), (shape, ratio)


def test_compiled_ns_on_cuda_is_as_accurate_as_eager():
    """``ns_compile: true`` on CUDA (TorchInductor) in bf16: its result and the eager one each lie within bf16's
    accuracy of the fp32 result. They are not equal to bf16 rounding of each other: Inductor rounds the fused
    ``b·A + c·A²`` and ``a·X + B·X`` differently from cuBLAS's epilogue, and the quintic's slope at 0
    (3.4445 per step) amplifies such differences in the small singular directions. Measured on an H100:
    eager 1.4e-2 and 1.6e-2 from fp32 (quintic, Polar Express), compiled 1.4e-2 and 1.3e-2, the two
    1.6e-2 and 1.9e-2 apart."""
    for coefficients in ("quintic", "polar_express"):
        G = gaussian(4, 128, 64, seed=3)
        exact = NewtonSchulz(coefficients=coefficients, dtype="float32")(G)
        eager = NewtonSchulz(coefficients=coefficients)(G)
        compiled = NewtonSchulz(coefficients=coefficients, compile=True)(G)
        assert compiled.dtype == eager.dtype and compiled.is_cuda
        errors = {"eager": rel(eager, exact), "compiled": rel(compiled, exact)}
        assert max(errors.values()) < 3e-2, (coefficients, errors)


@pytest.mark.parametrize("norm", [Sign(factor=2.0), ColNorm(factor=0.5), RowNorm(factor=3.0), RMS(factor=0.1),
                                  Spectral(factor=1.5, oracle=SVDPolar())], ids=lambda n: n.name)
def test_exact_lmos_on_cuda_meet_the_dual_norm_and_equal_the_cpu(norm):
    """``<G, lmo(G)> = −‖G‖_*`` and ``‖lmo(G)‖ = 1`` in fp32 on CUDA, and the CPU's result."""
    G = gaussian(3, 40, 24, seed=7)
    U = norm.lmo(G)
    assert U.is_cuda
    torch.testing.assert_close((G * U).flatten(1).sum(1), -norm.dual(G), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(norm.norm(U), torch.ones(3, device="cuda"), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(U.cpu(), norm.lmo(G.cpu()), rtol=1e-4, atol=1e-5)


def test_geometry_sends_cpu_spectral_groups_to_the_gpu_in_bf16():
    """``lmo_device: auto`` (the default) computes CPU-held spectral groups on the GPU in bf16 and returns
    them to the CPU; ``cpu`` keeps them there in fp32. The two agree to bf16's accuracy (1.3e-2 and
    1.5e-2 apart on an H100); the other norms run where their tensors are, bitwise the same."""
    model = MLP(64, (128, 96), 10)
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    on_gpu = Geometry.from_model(model, preset="muon").lmo(grads)
    on_cpu = Geometry.from_model(model, preset="muon", lmo_device="cpu").lmo(grads)
    spectral = [n for n, g in Geometry.from_model(model, preset="muon").params.items() if g.norm.name == "spectral"]
    assert spectral
    for name in grads:
        assert on_gpu[name].device.type == "cpu"
        if name in spectral:
            assert 0 < rel(on_gpu[name], on_cpu[name]) < 3e-2, (name, rel(on_gpu[name], on_cpu[name]))
        else:
            assert torch.equal(on_gpu[name], on_cpu[name])


def _spec(**kw) -> dict:
    return specs.normalise({"task": TASK, "geometry": {"preset": "muon"}, "rounds": 5, "seed": 3, "block_size": 3,
                            "algorithm": {"name": "gluon-ef21-mvr", "lr": 0.05,
                                          "compressor": {"name": "topk", "ratio": 0.1}}, **kw})


def _run(spec: dict, **kw):
    task, algo = specs.build(spec)
    return run_plain(algo, task.objectives, task.initial_params(), spec["rounds"], seed=spec["seed"],
                     block_size=spec["block_size"], evaluate=lambda X, k: task.evaluate(X), **kw)


def test_a_gpu_run_agrees_with_the_cpu_run_to_rounding():
    """Client gradients and the server's LMO on the GPU in fp32 (``ns_dtype: float32``): every round's
    losses within 1e-4 of the CPU run's, and the bits exactly (they depend on shapes, not values)."""
    geometry = {"preset": "muon", "ns_dtype": "float32"}
    gpu = _run(_spec(client_device="cuda", geometry=geometry)).frame()
    cpu = _run(_spec(client_device="cpu", geometry={**geometry, "lmo_device": "cpu"})).frame()
    bits = [c for c in cpu.columns if c.startswith(("up_", "down_"))]
    assert bits
    pd.testing.assert_frame_equal(gpu[bits], cpu[bits], check_exact=True)
    for col in ("train_loss", "test_loss"):
        pd.testing.assert_series_equal(gpu[col], cpu[col], rtol=1e-4)


def test_gpu_runs_are_the_same_across_engines_and_workers():
    """Device for device the engines agree: the in-process Flower engine with blocks on the GPU equals the
    plain driver with the same blocks, and two workers equal one (bf16 NS on the GPU, the default)."""
    spec = _spec(client_device="cuda")
    plain = _run(spec).frame()
    assert "test_loss" in plain.columns
    same_metrics(_run(spec, workers=2).frame(), plain)
    same_metrics(pd.DataFrame(run_inprocess(spec).history), plain, loss_rtol=1e-6)
