import numpy as np
import pytest
import torch

from fedgluon.lmo.geometry import Geometry
from fedgluon.lmo.radius import (
    Constant,
    GluonAdaptive,
    Polynomial,
    Scheduled,
    SmoothnessTracker,
    Warmup,
    fit_l0_l1,
    make_schedule,
)


def test_schedules():
    assert Constant(0.1)(7) == 0.1
    assert Polynomial(1.0, 0.75)(15) == pytest.approx(16 ** -0.75)
    w = Warmup(1.0, total=110, warmup=10, decay="cosine", final_fraction=0.1)
    assert w(0) == pytest.approx(0.1) and w(9) == pytest.approx(1.0)
    assert w(10) == pytest.approx(1.0) and w(110) == pytest.approx(0.1) and w(500) == pytest.approx(0.1)
    lin = make_schedule("warmup_linear", 2.0, total=10)
    assert lin(5) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="schedule must be one of"):
        make_schedule("step", 0.1)
    with pytest.raises(ValueError, match="lr must be a positive"):
        Constant(-1.0)


def test_scheduled_radius_uses_multipliers():
    g = Geometry.from_shapes({"a": (4, 4), "h": (2, 4)}, roles={"h": "head"}, radius={"head": 8.0})
    r = Scheduled(Constant(0.5)).radii(0, g)
    assert r == {"a": 0.5, "h": 4.0}


def test_gluon_adaptive_formula():
    g = Geometry.from_shapes({"a": (4, 4), "h": (2, 4)}, roles={"h": "head"})
    rule = GluonAdaptive(L0={"hidden": 1.0, "head": 0.0}, L1={"hidden": 2.0, "h": 0.5})
    r = rule.radii(0, g, {"a": torch.tensor(3.0), "h": torch.tensor(0.0)})
    assert r["a"] == pytest.approx(3.0 / (1.0 + 2.0 * 3.0)) and r["h"] == 0.0
    with pytest.raises(ValueError, match="no value for parameter"):
        GluonAdaptive(L0=0.0, L1={"head": 1.0}).radii(0, g, {"a": torch.tensor(1.0), "h": torch.tensor(1.0)})


def test_fit_recovers_noiseless_l0_l1():
    gnorm = np.linspace(0.1, 5, 50)
    L0, L1 = fit_l0_l1(0.3 + 2.0 * gnorm, gnorm)
    assert L0 == pytest.approx(0.3, abs=1e-9) and L1 == pytest.approx(2.0, abs=1e-9)


def test_hinge_weight_reduces_underestimation():
    rng = np.random.default_rng(0)
    gnorm = rng.uniform(0.1, 5, 400)
    lhat = 1.0 + 1.5 * gnorm + rng.normal(0, 0.5, 400)
    under = []
    for lam in (0.0, 10.0):
        L0, L1 = fit_l0_l1(lhat, gnorm, lam)
        assert L0 >= 0 and L1 >= 0
        under.append(np.mean(lhat > L0 + L1 * gnorm))
    assert under[1] < under[0] - 0.2


def test_tracker_on_quadratic_finds_curvature():
    """f(x) = L/2 ||x||^2 with the Euclidean norm: L̂ = L exactly, so L0 = L, L1 = 0."""
    L = 3.0
    geometry = Geometry.from_shapes({"x": (5,)}, preset="euclidean")
    tracker = SmoothnessTracker(geometry)
    x = torch.randn(5, dtype=torch.float64)
    for _ in range(20):
        tracker.record({"x": x}, {"x": L * x})
        x = x - 0.1 * (L * x) / (L * x).norm() * torch.rand(1, dtype=torch.float64)
    (L0, L1), = tracker.fit().values()
    assert L0 == pytest.approx(L, rel=1e-8) and L1 == pytest.approx(0.0, abs=1e-8)
