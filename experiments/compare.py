"""Compare tuned methods of a `fedgluon tune` directory at a common target.

For each method's best configuration (tuned.csv) and each seed: the cumulative uplink bits per
client at the first evaluation whose test loss is within ``--slack`` (default 5%) of the best
method's final test loss, averaged over seeds (also divided by the model size in fp32 bits, the
EF21-Muon paper's normalisation, and the downlink bits per client to the same point);
savings = 1 − uplink bits / uplink bits of ``--baseline``. int32 bit convention.
Writes <tune dir>/comparison.csv and prints a Markdown table.

    python experiments/compare.py runs/t3 --baseline gluon
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tune_dir", type=Path)
    ap.add_argument("--baseline", default="gluon")
    ap.add_argument("--slack", type=float, default=0.05)
    args = ap.parse_args()
    tuned = pd.read_csv(args.tune_dir / "tuned.csv")
    runs = {}
    for _, row in tuned.iterrows():
        sweep_dir = args.tune_dir / row["algorithm"]
        members = pd.read_csv(sweep_dir / "members.csv")
        chosen = members[members["config"].astype(str) == row["best_config"]]
        runs[row["algorithm"]] = [pd.read_csv(sweep_dir / m / "metrics.csv") for m in chosen["member"]]
    finals = {a: sum(m["test_loss"].dropna().iloc[-1] for m in ms) / len(ms) for a, ms in runs.items()}
    target = min(finals.values()) * (1 + args.slack)
    first_member = pd.read_csv(args.tune_dir / tuned["algorithm"].iloc[0] / "members.csv")["member"].iloc[0]
    model = torch.load(args.tune_dir / tuned["algorithm"].iloc[0] / first_member / "model.pt", weights_only=True)
    model_bits = 32 * sum(t.numel() for t in model.values())
    rows = []
    for alg, metrics in runs.items():
        hits, downs = [], []
        for m in metrics:
            m = m.assign(down_per_client_cum=(m["down_int32_total"] / m["receivers"].clip(lower=1)).cumsum())
            ev = m.dropna(subset=["test_loss"])
            reached = ev[ev["test_loss"] <= target]
            hits.append(float(reached["up_bits_per_client_cum"].iloc[0]) if len(reached) else float("nan"))
            downs.append(float(reached["down_per_client_cum"].iloc[0]) if len(reached) else float("nan"))
        rows.append({"algorithm": alg, "lr": tuned.set_index("algorithm").loc[alg, "best_config"].split(",")[0],
                     "final_test_loss": finals[alg],
                     "final_test_accuracy": sum(m["test_accuracy"].dropna().iloc[-1] for m in metrics) / len(metrics),
                     "seeds_reaching_target": sum(h == h for h in hits), "seeds": len(hits),
                     "bits_to_target": sum(hits) / len(hits) if all(h == h for h in hits) else float("nan"),
                     "up_to_target_over_model": (sum(hits) / len(hits) / model_bits) if all(h == h for h in hits)
                     else float("nan"),
                     "down_bits_to_target": sum(downs) / len(downs) if all(d == d for d in downs) else float("nan"),
                     "total_uplink_bits": sum(m["up_bits_per_client_cum"].iloc[-1] for m in metrics) / len(metrics)})
    table = pd.DataFrame(rows)
    base = table.set_index("algorithm").loc[args.baseline, "bits_to_target"]
    table["saving_vs_" + args.baseline] = 1 - table["bits_to_target"] / base
    table.to_csv(args.tune_dir / "comparison.csv", index=False)
    print(f"target test loss: {target:.4f} (best final {min(finals.values()):.4f} + {args.slack:.0%})\n")
    print(markdown(table))


def markdown(table: pd.DataFrame) -> str:
    def cell(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(table.columns) + " |", "|" + " --- |" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
