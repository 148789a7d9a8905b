"""The two figures of the rate experiment (small PNGs, matplotlib's Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd


def plot_rates(frame: pd.DataFrame, fits: pd.DataFrame, path: Path) -> None:
    """min_k ‖∇f‖_* against K per method: seed means (dots), per-seed min–max (bars), fitted lines."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=90)
    # per method the fit over the most seeds, then the longest horizons
    fits = fits.sort_values(["seeds", "K_max"], ascending=False).drop_duplicates("method")
    fits = fits.set_index("method").loc[[m for m in dict.fromkeys(frame.method) if m in set(fits.method)]].reset_index()
    for i, row in enumerate(fits.itertuples()):
        sub = frame[frame.method == row.method].groupby("K")["min_grad_dual_norm"]
        K = np.array(sub.mean().index, dtype=float)
        mean, lo, hi = sub.mean().to_numpy(), sub.min().to_numpy(), sub.max().to_numpy()
        color = f"C{i}"
        ax.errorbar(K, mean, yerr=[mean - lo, hi - mean], fmt="o", color=color, ms=4, capsize=2)
        c = np.exp(np.mean(np.log(mean)) - row.exponent * np.mean(np.log(K)))
        label = f"{row.method}: {row.exponent:+.2f} [{row.ci_lo:+.2f}, {row.ci_hi:+.2f}] (theory {row.theory:+.2f})"
        ax.plot(K, c * K ** row.exponent, "-", color=color, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("horizon K (iterations)")
    ax.set_ylabel("min over k ≤ K of ‖∇f(X^k)‖_*")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_compression(best: pd.DataFrame, path: Path) -> None:
    """Best rounds to the target against the compression factor (1/α or ω), per method and clients,
    with the bounds' prediction scaled to the least compressed ratio (dashed)."""
    methods = list(dict.fromkeys(best["method"]))
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.6), dpi=90, squeeze=False)
    for ax, method in zip(axes[0], methods):
        for i, (n, sub) in enumerate(best[best.method == method].groupby("clients")):
            sub = sub.sort_values("factor")
            color = f"C{i}"
            ax.plot(sub["factor"], sub["rounds"], "o-", color=color, label=f"{n} client(s), measured")
            ax.plot(sub["factor"], sub["predicted_rounds"], "--", color=color, label=f"{n} client(s), bound")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("1/α (top-k)" if "ef21" in method else "ω (rand-k)")
        ax.set_ylabel("rounds to target (best radius)")
        ax.set_title(method, fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
