"""Compare tuned methods of a `fedgluon tune` directory at a common target.

For each method's best configuration (the ``best`` trials of tuned.csv, one per seed) and each seed:
the cumulative uplink bits per client at the first evaluation whose test loss is within ``--slack``
(default 5%) of the best method's final test loss, averaged over seeds (also divided by the model size in fp32 bits, the
EF21-Muon paper's normalisation, and the downlink bits per client to the same point);
savings = 1 − uplink bits / uplink bits of ``--baseline``. int32 bit convention. Also the test
accuracy at equal uplink bits: the last evaluation within the smallest whole-run uplink budget per
client of all methods (``accuracy_at_budget``).
Several tune directories (methods run for different numbers of rounds) are compared together.
Writes <first tune dir>/comparison.csv (and ``--plot``: accuracy vs uplink bits) and prints a Markdown table.

    python experiments/compare.py runs/t3 --baseline gluon
    python experiments/compare.py runs/fmnist/dense runs/fmnist/compressed --baseline gluon --plot runs/fmnist/acc.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tune_dirs", type=Path, nargs="+")
    ap.add_argument("--baseline", default="gluon")
    ap.add_argument("--slack", type=float, default=0.05)
    ap.add_argument("--plot", type=Path, default=None, help="write test accuracy vs uplink bits per client here")
    args = ap.parse_args()
    runs, lrs, model_bits = {}, {}, 0
    tables = {d: pd.read_csv(d / "tuned.csv") for d in args.tune_dirs}
    names = [a for t in tables.values() for a in t.loc[t["best"], "algorithm"].unique()]
    for tune_dir, tuned in tables.items():
        best = tuned[tuned["best"]]
        for alg in best["algorithm"].unique():
            chosen = best[best["algorithm"] == alg]  # the best config's trials, one per seed
            # an algorithm tuned in several directories (dense and compressed, say) is labelled by directory
            label = alg if names.count(alg) == 1 else f"{alg}@{tune_dir.name}"
            runs[label] = [pd.read_csv(tune_dir / r / "metrics.csv") for r in chosen["run_dir"]]
            lrs[label] = str(chosen["config"].iloc[0]).split(",")[0].split("=")[-1]
            model = torch.load(tune_dir / chosen["run_dir"].iloc[0] / "model.pt", weights_only=True)
            model_bits = 32 * sum(t.numel() for t in model.values())
    finals = {a: sum(m["test_loss"].dropna().iloc[-1] for m in ms) / len(ms) for a, ms in runs.items()}
    target = min(finals.values()) * (1 + args.slack)
    budget = min(sum(m["up_bits_per_client_cum"].iloc[-1] for m in ms) / len(ms) for ms in runs.values())
    rows = []
    for alg, metrics in runs.items():
        hits, downs = [], []
        for m in metrics:
            m = m.assign(down_per_client_cum=(m["down_int32_total"] / m["receivers"].clip(lower=1)).cumsum())
            ev = m.dropna(subset=["test_loss"])
            reached = ev[ev["test_loss"] <= target]
            hits.append(float(reached["up_bits_per_client_cum"].iloc[0]) if len(reached) else float("nan"))
            downs.append(float(reached["down_per_client_cum"].iloc[0]) if len(reached) else float("nan"))
        evals = [m.dropna(subset=["test_accuracy"]) for m in metrics]
        within = [e[e["up_bits_per_client_cum"] <= budget * 1.0001]["test_accuracy"] for e in evals]
        at_budget = [float(w.iloc[-1]) if len(w) else float("nan") for w in within]  # NaN: no evaluation yet
        rows.append({"algorithm": alg, "lr": lrs[alg], "rounds": len(metrics[0]),
                     "final_test_loss": finals[alg],
                     "final_test_accuracy": sum(m["test_accuracy"].dropna().iloc[-1] for m in metrics) / len(metrics),
                     "seeds_reaching_target": sum(h == h for h in hits), "seeds": len(hits),
                     "bits_to_target": sum(hits) / len(hits) if all(h == h for h in hits) else float("nan"),
                     "up_to_target_over_model": (sum(hits) / len(hits) / model_bits) if all(h == h for h in hits)
                     else float("nan"),
                     "down_bits_to_target": sum(downs) / len(downs) if all(d == d for d in downs) else float("nan"),
                     "total_uplink_bits": sum(m["up_bits_per_client_cum"].iloc[-1] for m in metrics) / len(metrics),
                     "accuracy_at_budget": sum(at_budget) / len(at_budget)})
    table = pd.DataFrame(rows)
    base = table.set_index("algorithm").loc[args.baseline, "bits_to_target"]
    table["saving_vs_" + args.baseline] = 1 - table["bits_to_target"] / base
    table.to_csv(args.tune_dirs[0] / "comparison.csv", index=False)
    if args.plot is not None:
        plot(runs, args.plot, budget)
    print(f"target test loss: {target:.4f} (best final {min(finals.values()):.4f} + {args.slack:.0%}); "
          f"uplink budget for accuracy_at_budget: {budget:.4g} bits per client\n")
    print(markdown(table))


def plot(runs: dict[str, list[pd.DataFrame]], path: Path, budget: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for alg, metrics in runs.items():
        ev = [m.dropna(subset=["test_accuracy"]) for m in metrics]
        ax.plot(ev[0]["up_bits_per_client_cum"], sum(e["test_accuracy"].to_numpy() for e in ev) / len(ev), label=alg)
    ax.axvline(budget, color="grey", lw=0.8, ls=":")
    ax.set(xscale="log", xlabel="uplink bits per client (int32 convention)", ylabel="test accuracy (mean over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(table: pd.DataFrame) -> str:
    def cell(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(table.columns) + " |", "|" + " --- |" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
