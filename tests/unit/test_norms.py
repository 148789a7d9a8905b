"""Property tests for every LMO: <G, lmo(G)> = -||G||_*, ||lmo(G)|| = 1, lmo(0) = 0."""

import math
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedgluon.lmo.geometry import NORMS
from fedgluon.lmo.norms import ColNorm, Euclidean, RowNorm, Sign, Spectral, rms
from fedgluon.lmo.polar import NewtonSchulz, SVDPolar

EXACT = {
    "spectral_svd": lambda shape: Spectral(factor=math.sqrt(shape[1] / shape[0]), oracle=SVDPolar()),
    "sign": lambda shape: Sign(factor=float(shape[-1])),
    "col": lambda shape: ColNorm(factor=1 / math.sqrt(shape[0])),
    "row": lambda shape: RowNorm(factor=1 / math.sqrt(shape[-1])),
    "euclidean": lambda shape: Euclidean(factor=2.5),
    "rms": rms,
}
SHAPES = [(8, 8), (16, 4), (4, 16), (1, 7), (7, 1)]


def adversarial(shape, kind, gen):
    if kind == "gaussian":
        return torch.randn(shape, generator=gen, dtype=torch.float64)
    if kind == "rank1":
        return torch.outer(torch.randn(shape[0], generator=gen, dtype=torch.float64),
                           torch.randn(shape[1], generator=gen, dtype=torch.float64))
    if kind == "tiny":
        return 1e-300 * torch.randn(shape, generator=gen, dtype=torch.float64)
    if kind == "huge":
        return 1e300 * torch.randn(shape, generator=gen, dtype=torch.float64)
    if kind == "sparse":
        x = torch.zeros(shape, dtype=torch.float64)
        x.view(-1)[0] = -3.0
        return x
    raise AssertionError(kind)


KINDS = ["gaussian", "rank1", "tiny", "huge", "sparse"]


def exact_norms(shape):
    return {k: f(shape) for k, f in EXACT.items()}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", KINDS)
def test_lmo_identities_exact_float64(shape, kind):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, kind)).encode()))  # the same seed every run
    G = adversarial(shape, kind, gen).unsqueeze(0)
    for name, norm in exact_norms(shape).items():
        U = norm.lmo(G)
        dual = norm.dual(G)
        inner = (G * U).sum()
        # <G, lmo(G)> = -||G||_*  (relative to the scale of ||G||_*)
        assert torch.isclose(inner, -dual[0], rtol=1e-10, atol=0), (name, kind, inner, dual)
        # ||lmo(G)|| = 1
        assert torch.isclose(norm.norm(U)[0], torch.tensor(1.0, dtype=torch.float64), rtol=1e-10), (name, kind)
        # lmo(G) minimises <G, .> over the unit ball: no random unit vector does better
        for _ in range(20):
            Z = torch.randn_like(G)
            Z = Z / norm.norm(Z)[0]
            assert (G * Z).sum() >= inner * (1 + 1e-9) - 1e-300


def _groups(G, axis):
    """Each column (axis 0) or row (axis 1) scaled to unit ℓ2 norm, and the sum of their norms."""
    n = np.linalg.norm(G, axis=axis, keepdims=True)
    return G / n, n.sum()


CLOSED_FORMS = {  # name: (lmo(G)·c, dual(G)·c), numpy, from the norms' definitions (Scion's table)
    "spectral_svd": lambda G: (-(np.linalg.svd(G, full_matrices=False)[0] @ np.linalg.svd(G, full_matrices=False)[2]),
                               np.linalg.svd(G, compute_uv=False).sum()),
    "sign": lambda G: (-np.sign(G), np.abs(G).sum()),
    "col": lambda G: (-_groups(G, 0)[0], _groups(G, 0)[1]),
    "row": lambda G: (-_groups(G, 1)[0], _groups(G, 1)[1]),
    "euclidean": lambda G: (-G / np.linalg.norm(G), np.linalg.norm(G)),
    "rms": lambda G: (-G / np.linalg.norm(G), np.linalg.norm(G)),
}


@pytest.mark.parametrize("shape", [(5, 3), (3, 5), (4, 4)])
def test_lmo_and_dual_equal_closed_forms_written_here(shape):
    """Each norm's LMO and dual norm against its closed form in numpy (not against each other): spectral
    ``−UVᵀ/c`` and ``Σσ/c``; sign ``−sign(G)/c`` and ``Σ|G|/c``; column (row) norm: each column (row)
    scaled to unit length, ``/c``, and the sum of column (row) norms ``/c``; Euclidean and RMS
    ``−G/(c‖G‖_F)`` and ``‖G‖_F/c``. A swap of columns and rows, or a dual off by a constant, fails."""
    G = np.random.default_rng(zlib.crc32(repr(shape).encode())).standard_normal(shape)
    for name, norm in exact_norms(shape).items():
        lmo, dual = CLOSED_FORMS[name](G)
        T = torch.from_numpy(G).unsqueeze(0)
        np.testing.assert_allclose(norm.lmo(T)[0].numpy(), lmo / norm.factor, rtol=1e-10, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(float(norm.dual(T)[0]), dual / norm.factor, rtol=1e-10, err_msg=name)
    assert rms(shape).factor == pytest.approx(1 / math.sqrt(math.prod(shape)))


@pytest.mark.parametrize("name", list(NORMS))
def test_zero_input_gives_zero(name):
    norm = NORMS[name]((6, 4), NewtonSchulz(), None)
    G = torch.zeros(2, 6, 4)
    assert torch.equal(norm.lmo(G), torch.zeros_like(G))
    assert torch.equal(norm.dual(G), torch.zeros(2))


def test_conv_spectral_is_spectral_of_reshape():
    G = torch.randn(1, 8, 3, 3, 3, dtype=torch.float64)
    norm = Spectral(factor=9 * math.sqrt(3 / 8), oracle=SVDPolar())
    U = norm.lmo(G)
    assert U.shape == G.shape
    assert torch.isclose((G * U).sum(), -norm.dual(G)[0], rtol=1e-10)
    assert torch.isclose(norm.norm(U)[0], torch.tensor(1.0, dtype=torch.float64), rtol=1e-10)
    svals = torch.linalg.svdvals(U.reshape(8, 27))
    assert torch.allclose(svals, torch.full_like(svals, 1 / norm.factor), rtol=1e-10)


@settings(max_examples=60, deadline=None)
@given(m=st.integers(1, 12), n=st.integers(1, 12), scale=st.floats(1e-20, 1e20), seed=st.integers(0, 10_000))
def test_lmo_identities_hypothesis(m, n, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    G = scale * torch.randn(3, m, n, generator=gen, dtype=torch.float64)
    for name, norm in exact_norms((m, n)).items():
        U = norm.lmo(G)
        assert torch.allclose((G * U).flatten(1).sum(1), -norm.dual(G), rtol=1e-9), name
        assert torch.allclose(norm.norm(U), torch.ones(3, dtype=torch.float64), rtol=1e-9), name


def test_spectral_newton_schulz_band():
    """NS is approximate. Measured here (fp32, 5 steps, Gaussian matrices up to 256x64): every
    singular value σ_i with σ_i/‖G‖_F > 1e-2 maps to p(σ_i) in [0.68, 1.14] (quintic) and
    [0.87, 1.13] (Polar Express); we assert [0.65, 1.17] and [0.85, 1.15]. The dual-norm estimate
    −<G, NS-lmo(G)> / ‖G‖_* lies in [0.70, 1.0] and [0.95, 1.05]."""
    gen = torch.Generator().manual_seed(1)
    bands = {"quintic": ((0.65, 1.17), (0.70, 1.0)), "polar_express": ((0.85, 1.15), (0.95, 1.05))}
    for shape in [(64, 64), (128, 32), (32, 128), (256, 64)]:
        G = torch.randn(4, *shape, generator=gen, dtype=torch.float64)
        U, S, Vh = torch.linalg.svd(G, full_matrices=False)
        for coeffs, (sv_band, dual_band) in bands.items():
            norm = Spectral(factor=1.0, oracle=NewtonSchulz(coefficients=coeffs, dtype="float32"))
            L, est = norm.lmo_and_dual(G)
            ratio = est / norm.dual(G)
            assert ((ratio > dual_band[0]) & (ratio < dual_band[1])).all(), (shape, coeffs, ratio)
            mapped = -torch.einsum("bmi,bmn,bin->bi", U, L, Vh)  # p(σ_i) along each singular pair
            sel = mapped[S / S.norm(dim=1, keepdim=True) > 1e-2]
            assert sel.min() > sv_band[0] and sel.max() < sv_band[1], (shape, coeffs, sel.min(), sel.max())
