"""Plots of runs and sweeps (matplotlib, Agg backend): loss/accuracy vs rounds and vs uplink bits,
and the communication-vs-accuracy Pareto plot of a sweep. Axes name the bit convention."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def plot_run(frame: pd.DataFrame, path: str | Path, title: str = "",
             bits_label: str = "uplink bits per client") -> None:
    """2×2: test loss and accuracy against rounds and against cumulative uplink bits per client."""
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    ev = frame.dropna(subset=["test_loss"]) if "test_loss" in frame else frame
    for row, metric in enumerate(("test_loss", "test_accuracy")):
        if metric not in ev:
            continue
        axes[row][0].plot(ev["round"], ev[metric])
        axes[row][0].set_xlabel("round")
        axes[row][1].plot(ev["up_bits_per_client_cum"], ev[metric])
        axes[row][1].set_xlabel(f"cumulative {bits_label}")
        axes[row][1].set_xscale("log")
        for ax in axes[row]:
            ax.set_ylabel(metric.replace("_", " "))
            ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_pareto(table: pd.DataFrame, path: str | Path, x: str = "uplink_bits_per_client_mean",
                y: str = "final_test_accuracy_mean", label: str = "member", title: str = "",
                xlabel: str | None = None) -> None:
    """One point per sweep configuration (mean over seeds, error bars = std) and the Pareto front
    (fewest bits for at least that accuracy)."""
    fig, ax = plt.subplots(figsize=(7, 5))
    t = table.dropna(subset=[x, y]).sort_values(x)
    xerr = t[x.replace("_mean", "_std")] if x.replace("_mean", "_std") in t else None
    yerr = t[y.replace("_mean", "_std")] if y.replace("_mean", "_std") in t else None
    ax.errorbar(t[x], t[y], xerr=xerr, yerr=yerr, fmt="o", capsize=3)
    for _, r in t.iterrows():
        ax.annotate(str(r[label]), (r[x], r[y]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front, best = [], -float("inf")
    for _, r in t.iterrows():
        if r[y] > best:
            best = r[y]
            front.append((r[x], r[y]))
    if front:
        ax.step(*zip(*front), where="post", color="tab:red", alpha=0.6, label="Pareto front")
        ax.legend()
    ax.set_xscale("log")
    ax.set_xlabel(xlabel or x.replace("_", " "))
    ax.set_ylabel(y.replace("_", " "))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
