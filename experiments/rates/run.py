"""Measure the convergence-rate exponents and the compression factors (experiments/README.md, "Rates").

    python -m experiments.rates.run                 # the full experiment: results/ beside this file
    python -m experiments.rates.run --quick         # a seconds-long smoke run, into runs/rates-quick
    python -m experiments.rates.run --part rates    # only item 2 (or --part compression)

Writes to ``--out`` (default ``experiments/rates/results``, the committed results; with ``--quick``,
``runs/rates-quick`` under the working directory, so a smoke run never replaces them):

| file | content |
| --- | --- |
| ``pilot.csv`` | ``--part pilot`` only: one row per (method, t₀) at K = 1,000 on pilot seed 100 |
| ``rates.csv`` | one row per (method, K, seed): the schedule, min_k ‖∇f(X^k)‖_*, final loss and σ |
| ``rates_fit.csv`` | per method: the fitted exponent, its 95% intervals, the theory's exponent |
| ``compression_best.csv`` | per (method, clients, ratio): the best radius, its rounds, the bounds' prediction |
| ``rates.png`` | min ‖∇f‖_* against K on log–log axes, seed means with per-seed ranges and fitted lines |
| ``compression.csv`` | one row per (method, clients, ratio, radius, seed): rounds to the target |
| ``compression_fit.csv`` | per (method, clients): the best rounds per ratio and the factor the bounds predict |
| ``compression.png`` | best rounds to the target against 1/α (top-k) and ω (rand-k) |
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from pathlib import Path

import pandas as pd

from . import compression, rate
from .fit import fit_exponent

DEFAULT_OUT = Path(__file__).resolve().parent / "results"  # the committed results the README's tables quote
QUICK_OUT = Path("runs") / "rates-quick"  # --quick's default: a smoke run never replaces the committed results
T0_GRID = (0.3, 1.0, 3.0, 10.0)
T0 = 1.0  # the radius constant of every method (module docstring of rate.py)
PILOT_SEED = 100


def _run_rate(args: tuple) -> dict:
    return rate.run_one(*args)


def _pool_iter(fn, tasks: list[tuple], jobs: int):
    if jobs <= 1:
        yield from map(fn, tasks)
        return
    with mp.get_context("spawn").Pool(jobs) as pool:
        yield from pool.imap(fn, tasks)


def _pool_map(fn, tasks: list[tuple], jobs: int) -> list[dict]:
    return list(_pool_iter(fn, tasks, jobs))


def pilot(out: Path, methods, jobs: int, grid=T0_GRID, K: int = 1000) -> pd.DataFrame:
    """Every method at horizon K on the pilot seed for every t₀ of ``grid`` (``--part pilot``): the
    evidence for the common t₀ = 1 of the sweep (see experiments/README.md)."""
    rows = _pool_map(_run_rate, [(m, K, PILOT_SEED, t0) for m in methods for t0 in grid], jobs)
    frame = pd.DataFrame(rows).sort_values(["method", "t0"])
    frame.to_csv(out / "pilot.csv", index=False)
    return frame


def sweep(out: Path, horizons, seeds, methods, jobs: int, t0: float = T0, name: str = "rates.csv") -> pd.DataFrame:
    """Every (method, K, seed): the horizons up to 1,000 for every seed first, then the longer ones
    seed by seed (so a stopped sweep leaves whole seeds); each finished run is appended to the CSV
    at once."""
    path = out / name
    path.unlink(missing_ok=True)
    short = [K for K in horizons if K <= 1000]
    tasks = [(m, K, s, t0) for K in sorted(short) for s in seeds for m in methods]  # every seed's short runs first
    tasks += [(m, K, s, t0) for s in seeds for K in sorted(set(horizons) - set(short)) for m in methods]
    rows = []
    for row in _pool_iter(_run_rate, tasks, jobs):
        rows.append(row)
        pd.DataFrame([row]).to_csv(path, mode="a", header=len(rows) == 1, index=False)
    frame = pd.DataFrame(rows).sort_values(["method", "K", "seed"])
    frame.to_csv(path, index=False)
    return frame


def fit_table(frame: pd.DataFrame, methods) -> pd.DataFrame:
    """Per method and largest horizon K_max, the exponent of min_k ‖∇f‖_* in K with its intervals,
    fitted over the horizons up to K_max and the seeds that ran all of them (at least two). With a
    complete sweep the row with K_max = 10,000 is the headline; a stopped sweep still gives the
    rows its seeds cover."""
    fits = []
    for m in methods:
        table = frame[frame.method == m].pivot(index="seed", columns="K", values="min_grad_dual_norm")
        horizons = sorted(table.columns)
        for kmax in horizons[2:]:
            sub = table[[k for k in horizons if k <= kmax]].dropna(axis=0)
            if sub.shape[0] < 2:
                continue
            f = fit_exponent(list(sub.columns), sub.to_numpy())
            fits.append({"method": m, "K_max": kmax, "horizons": len(sub.columns), "exponent": f.slope,
                         "ci_lo": f.lo, "ci_hi": f.hi, "seed_mean": f.seed_mean, "seed_ci_lo": f.seed_lo,
                         "seed_ci_hi": f.seed_hi, "seeds": f.seeds, "theory": rate.THEORY[m],
                         "within_0.05": bool(abs(f.slope - rate.THEORY[m]) <= 0.05)})
    return pd.DataFrame(fits)


def rates(out: Path, horizons, seeds, methods, jobs: int, name: str = "rates.csv") -> pd.DataFrame:
    """Item 2: sweep, fits (``rates_fit.csv``), plot (``rates.png``); returns the fit table."""
    sweep(out, horizons, seeds, methods, jobs, name=name)
    return fit_and_plot(out, methods)


def fit_and_plot(out: Path, methods) -> pd.DataFrame:
    """Fits and figure from every ``rates*.csv`` in ``out`` (sweeps split over seeds, ``--part fit``)."""
    frame = pd.concat([pd.read_csv(p) for p in sorted(out.glob("rates*.csv")) if p.name != "rates_fit.csv"])
    frame = frame.drop_duplicates(["method", "K", "seed"]).sort_values(["method", "K", "seed"])
    table = fit_table(frame, methods)
    table.to_csv(out / "rates_fit.csv", index=False)
    if table.empty:  # fewer than three horizons or two seeds: nothing to fit yet (--part fit once they are in)
        return table
    from .plots import plot_rates

    plot_rates(frame, table, out / "rates.png")
    return table


def output_dir(out: Path | None, quick: bool) -> Path:
    """``--out`` as given, else the committed results (a full run) or ``QUICK_OUT`` (a ``--quick`` smoke run)."""
    if out is not None:
        return out
    return QUICK_OUT if quick else DEFAULT_OUT


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="convergence-rate exponents and compression factors")
    ap.add_argument("--quick", action="store_true", help="tiny horizons and grids: a smoke run of seconds")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"output folder (default {DEFAULT_OUT}; with --quick, {QUICK_OUT})")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (one torch thread each)")
    ap.add_argument("--part", choices=("all", "rates", "compression", "pilot", "fit"), default="all")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--horizons", type=int, nargs="+", default=None, help="default: 100 300 1000 3000 10000")
    ap.add_argument("--seed-start", type=int, default=0, help="first seed of the sweep (seeds start..start+seeds-1)")
    ap.add_argument("--csv", default="rates.csv", help="the sweep's output file name inside --out")
    args = ap.parse_args(argv)
    if args.jobs < 1 or args.seeds < 1:
        print("error: --jobs and --seeds must be >= 1", file=sys.stderr)
        return 2
    args.out = output_dir(args.out, args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    pd.set_option("display.width", 160)
    if args.part == "pilot":
        frame = pilot(args.out, rate.METHODS, args.jobs, (1.0, 3.0) if args.quick else T0_GRID,
                      K=20 if args.quick else 1000)
        print(frame[["method", "t0", "min_grad_dual_norm", "final_loss"]].to_string(index=False))
    if args.part in ("all", "rates"):
        horizons = (5, 10, 20) if args.quick else tuple(args.horizons or rate.HORIZONS)
        seeds = range(args.seed_start, args.seed_start + (2 if args.quick else args.seeds))
        table = rates(args.out, horizons, seeds, rate.METHODS, args.jobs, args.csv)
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.part == "fit":
        print(fit_and_plot(args.out, rate.METHODS).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.part in ("all", "compression"):
        table = compression.run(args.out, quick=args.quick, jobs=args.jobs)
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"wall {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
