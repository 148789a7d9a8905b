"""T2 report: squared norm of the full gradient vs uplink bits per client, MARINA vs DASHA, per step size.

Reads the `fedgluon tune` directory of experiments/t2_marina_dasha.sh (every trial that ran every
round, not only the tuned one: the script tunes with ``--scheduler fifo``), plots ``‖∇f(X^k)‖²``
against the cumulative per-round maximum over clients of the uplink value bits (the DASHA paper's
x-axis: 64 bits per sent coordinate) and writes a table with the bits each run needs to reach a common
target — the largest final ``‖∇f‖²`` of all runs, so every run reaches it — and the final ``‖∇f‖²``.

    python experiments/t2_report.py runs/t2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402


def load(tune_dir: Path) -> dict[tuple[str, float], pd.DataFrame]:
    """``(algorithm, gamma) -> metrics`` with ``grad_sq`` and ``bits`` columns, evaluated rounds only."""
    runs = {}
    tuned = pd.read_csv(tune_dir / "tuned.csv")
    for run_dir in tuned.loc[tuned["complete"], "run_dir"]:
        m = pd.read_csv(tune_dir / run_dir / "metrics.csv")
        cfg = OmegaConf.load(tune_dir / run_dir / "config.yaml")
        m["bits"] = m["up_values_max"].cumsum()
        m = m.dropna(subset=["grad_dual_norm"]).assign(grad_sq=lambda f: f["grad_dual_norm"] ** 2)
        runs[(cfg.algorithm.name, 1.0 / float(cfg.algorithm.adaptive.L0))] = m
    if not runs:
        raise SystemExit(f"no complete trials in {tune_dir / 'tuned.csv'}")
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tune_dir", type=Path)
    args = ap.parse_args()
    runs = load(args.tune_dir)
    target = max(float(m["grad_sq"].iloc[-1]) for m in runs.values())
    rows = []
    for (alg, gamma), m in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        hit = m[m["grad_sq"] <= target]
        rows.append({"gamma": gamma, "algorithm": alg, "final_grad_sq": float(m["grad_sq"].iloc[-1]),
                     "bits_to_target": float(hit["bits"].iloc[0]) if len(hit) else float("nan"),
                     "total_bits": float(m["bits"].iloc[-1]), "rounds": int(m["round"].iloc[-1]) + 1})
    table = pd.DataFrame(rows)
    table.to_csv(args.tune_dir / "t2.csv", index=False)
    gammas = sorted({g for _, g in runs})
    fig, axes = plt.subplots(1, len(gammas), figsize=(4.5 * len(gammas), 3.6), squeeze=False)
    for ax, gamma in zip(axes[0], gammas):
        for (alg, g), m in sorted(runs.items()):
            if g == gamma:
                ax.semilogy(m["bits"], m["grad_sq"], label=alg)
        ax.axhline(target, color="grey", lw=0.8, ls=":")
        ax.set(title=f"step {gamma:g}", xlabel="uplink bits per client (max over clients)", ylabel="‖∇f(x)‖²")
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.tune_dir / "t2.png", dpi=120)
    print(f"target ‖∇f‖² = {target:.3g} (the largest final value of all runs)\n")
    print(table.to_markdown(index=False, floatfmt=".4g") if _has_tabulate() else table.to_string(index=False))


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
