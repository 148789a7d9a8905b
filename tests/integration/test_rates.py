"""The rate experiment (experiments/rates): its exponent fit and a ``--quick`` run end to end."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from experiments.rates import rate
from experiments.rates.fit import fit_exponent
from experiments.rates.run import DEFAULT_OUT, QUICK_OUT, main, output_dir


def test_fit_recovers_a_known_exponent():
    rng = np.random.default_rng(3)
    K = np.array([100, 300, 1000, 3000, 10000])
    values = 2.5 * K ** -0.3 * np.exp(rng.normal(0, 0.05, size=(8, K.size)))
    fit = fit_exponent(K, values)
    assert abs(fit.slope + 0.3) < 0.03
    assert fit.lo < -0.3 < fit.hi
    assert fit.seed_lo < -0.3 < fit.seed_hi
    assert fit.seeds == 8


def test_fit_interval_narrows_with_less_noise():
    rng = np.random.default_rng(0)
    K = np.array([100, 1000, 10000])
    noise = rng.normal(size=(6, K.size))
    wide = fit_exponent(K, K ** -0.25 * np.exp(0.2 * noise))
    narrow = fit_exponent(K, K ** -0.25 * np.exp(0.02 * noise))
    assert narrow.hi - narrow.lo < (wide.hi - wide.lo) / 5


def test_fit_rejects_bad_values():
    with pytest.raises(ValueError, match="positive"):
        fit_exponent([10, 100], [[1.0, 0.0], [1.0, 0.5]])
    with pytest.raises(ValueError, match="horizons"):
        fit_exponent([10, 100, 1000], [[1.0, 0.5]])


def test_schedules_follow_the_theorems():
    momentum = rate.schedule("gluon", 10_000, 2.0, 32, 1797)
    assert momentum.radius == pytest.approx(2.0 * 10_000 ** -0.75)
    assert momentum.beta == pytest.approx(1 - 0.01)
    mvr = rate.schedule("gluon-mvr", 1000, 1.0, 32, 1797)
    assert mvr.radius == pytest.approx(0.01) and mvr.beta == pytest.approx(0.99)
    sarah = rate.schedule("gluon-sarah", 1000, 1.0, 32, 1797)
    assert sarah.refresh_prob == pytest.approx(0.01) and sarah.large_batch == 1797
    assert rate.schedule("gluon-sarah", 100, 1.0, 32, 1797).large_batch == math.ceil(32 * 100 ** (2 / 3))


def test_a_quick_run_never_writes_into_the_committed_results():
    assert output_dir(None, quick=True) == QUICK_OUT and not QUICK_OUT.is_absolute()
    assert output_dir(None, quick=False) == DEFAULT_OUT
    assert output_dir(Path("elsewhere"), quick=True) == Path("elsewhere")


def test_quick_run_end_to_end(tmp_path):
    assert main(["--quick", "--jobs", "1", "--out", str(tmp_path)]) == 0
    runs = pd.read_csv(tmp_path / "rates.csv")
    assert set(runs.method) == set(rate.METHODS)
    assert len(runs) == len(rate.METHODS) * 3 * 2  # methods × quick horizons × quick seeds
    assert (runs.min_grad_dual_norm > 0).all()
    # every method learns: a longer horizon ends at a lower loss, for each seed (the minimum gradient norm
    # includes the start, so it cannot exceed the initial one whatever the method does)
    for (method, seed), one in runs.sort_values("K").groupby(["method", "seed"]):
        assert one.final_loss.is_monotonic_decreasing and one.final_loss.nunique() == len(one), (method, seed)
    fits = pd.read_csv(tmp_path / "rates_fit.csv")
    assert list(fits.method) == list(rate.METHODS)
    assert np.isfinite(fits.exponent).all() and (fits.ci_lo <= fits.ci_hi).all()
    assert dict(zip(fits.method, fits.theory)) == pytest.approx(rate.THEORY)
    comp = pd.read_csv(tmp_path / "compression_fit.csv")
    assert set(comp.method) == {"gluon-ef21-sarah", "gluon-marina"}
    assert {"measured_slope", "bound_slope", "clients"} <= set(comp.columns)
    best = pd.read_csv(tmp_path / "compression_best.csv")
    assert {"factor", "rounds", "predicted_rounds", "radius"} <= set(best.columns)
    for png in ("rates.png", "compression.png"):
        assert (tmp_path / png).stat().st_size > 1000


def test_bad_arguments_give_one_error_line(capsys):
    assert main(["--jobs", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
