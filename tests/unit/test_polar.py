import pytest
import torch

from fedgluon.lmo.polar import NewtonSchulz, SVDPolar, coefficient_schedule, resolve_dtype


def test_batched_equals_per_matrix():
    G = torch.randn(6, 48, 24)
    ns = NewtonSchulz()
    batched = ns(G)
    single = torch.stack([ns(g) for g in G])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-6)


def test_cpu_never_bf16_by_default():
    assert resolve_dtype("auto", torch.zeros(2, 2)) == torch.float32
    assert resolve_dtype("auto", torch.zeros(2, 2, dtype=torch.float64)) == torch.float64
    out = NewtonSchulz()(torch.randn(8, 8))
    assert out.dtype == torch.float32
    with pytest.raises(ValueError, match="ns_dtype must be one of"):
        resolve_dtype("int8", torch.zeros(1))


def test_ns_matches_reference_quintic_iteration():
    """Against KellerJordan's NS5 written here in fp32 (X/(||X||_F+1e-7), wide orientation)."""
    G = torch.randn(40, 24)
    X = G.T.clone()
    X = X / (X.norm() + 1e-7)
    a, b, c = 3.4445, -4.7750, 2.0315
    for _ in range(5):
        A = X @ X.T
        B = b * A + c * A @ A
        X = a * X + B @ X
    torch.testing.assert_close(NewtonSchulz()(G), X.T, rtol=1e-4, atol=1e-5)


def test_polar_express_converges_to_svd():
    G = torch.randn(32, 32, dtype=torch.float64)
    exact = SVDPolar()(G)
    approx = NewtonSchulz(steps=10, coefficients="polar_express")(G)
    assert (approx - exact).abs().max() < 1e-2
    sched = coefficient_schedule("polar_express", 10)
    assert sched[-1] == (1.875, -1.25, 0.375) and len(sched) == 10
    assert sched[0][0] == pytest.approx(8.28721201814563 / 1.01)


def test_svd_polar_rank_deficient_maps_null_directions_to_zero():
    u, v = torch.randn(10, 1, dtype=torch.float64), torch.randn(1, 6, dtype=torch.float64)
    P = SVDPolar()(u @ v)
    expected = (u / u.norm()) @ (v / v.norm())
    torch.testing.assert_close(P, expected, rtol=1e-10, atol=1e-12)


def test_bad_config_errors_name_the_field():
    with pytest.raises(ValueError, match="ns_coefficients"):
        NewtonSchulz(coefficients="cubic")  # type: ignore[arg-type]  # a wrong value on purpose
    with pytest.raises(ValueError, match="ns_steps"):
        NewtonSchulz(steps=0)


def test_ns_compile_is_checked():
    from fedgluon.lmo.polar import make_polar

    with pytest.raises(ValueError, match="ns_compile must be true or false"):
        NewtonSchulz(compile="yes")  # type: ignore[arg-type]  # a wrong type on purpose
    with pytest.raises(ValueError, match="ns_compile applies to spectral_method 'newton_schulz'"):
        make_polar("svd", compile=True)
