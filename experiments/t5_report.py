"""T5 report: test accuracy vs uplink floats for PowerSGD variants, and the logged compression ratio
against the formula.

For each member of the `fedgluon sweep` directory of experiments/t5_powersgd.sh: the algorithm, rank,
warm start and error feedback from its config.yaml; final test loss, final and best test accuracy
(mean, and the final accuracy's std, over seeds); uplink floats per client per round from the logged
value bits (fp32: bits / 32); the logged compression ratio (dense floats / sent floats) and the one the
formula predicts, ``Σ_layers n·m / Σ_layers ((n+m)·r if the layer is compressed else n·m)`` — PowerSGD's ``nm/((n+m)r)``
per matrix, with vectors and matrices below ``min_compression_rate`` sent dense.

    python experiments/t5_report.py runs/t5
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from compressors import make_compressor  # noqa: E402


def describe(cfg) -> dict:
    alg = OmegaConf.to_container(cfg.algorithm)
    comp = alg.get("compressor", {"name": "identity"}) if alg["name"] != "gluon" else {"name": "identity"}
    low_rank = comp["name"] == "powersgd"
    return {"algorithm": alg["name"], "rank": comp.get("rank", 2) if low_rank else None,
            "warm_start": comp.get("warm_start", True) if low_rank else None,
            "error_feedback": alg.get("error_feedback", "ef21") if low_rank else "-", "compressor": comp}


def formula_ratio(compressor_spec: dict, shapes: list[tuple[int, ...]]) -> float:
    comp = make_compressor(compressor_spec)
    dense = sum(torch.Size(s).numel() for s in shapes)
    sent = sum(comp._structure_for(s).n_values(s) for s in shapes)
    return dense / sent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dir", type=Path)
    args = ap.parse_args()
    members = pd.read_csv(args.sweep_dir / "members.csv")
    rows, curves = [], {}
    for _, m in members.iterrows():
        d = args.sweep_dir / m["member"]
        info = describe(OmegaConf.load(d / "config.yaml"))
        metrics = pd.read_csv(d / "metrics.csv")
        shapes = [tuple(t.shape) for t in torch.load(d / "model.pt", weights_only=True).values()]
        floats = metrics["up_values_mean"] / 32
        dense = sum(torch.Size(s).numel() for s in shapes)
        label = (f"{info['algorithm']} dense" if info["rank"] is None else
                 f"{info['algorithm']} r={info['rank']} {'warm' if info['warm_start'] else 'cold'} "
                 f"{info['error_feedback']}")
        ev = metrics.dropna(subset=["test_accuracy"])
        curves.setdefault(label, []).append((floats.cumsum()[ev.index], ev["test_accuracy"]))
        rows.append({"method": label, "seed": m["seed"], "final_loss": float(ev["test_loss"].iloc[-1]),
                     "final_accuracy": float(ev["test_accuracy"].iloc[-1]),
                     "best_accuracy": float(ev["test_accuracy"].max()),
                     "floats_per_round": float(floats.iloc[-1]),
                     "ratio_logged": dense / float(floats.iloc[-1]),
                     "ratio_formula": formula_ratio(info["compressor"], shapes)})
    per_seed = pd.DataFrame(rows)
    table = per_seed.groupby("method", sort=False).agg(
        final_loss=("final_loss", "mean"), final_accuracy=("final_accuracy", "mean"),
        final_std=("final_accuracy", "std"), best_accuracy=("best_accuracy", "mean"), seeds=("seed", "count"),
        floats_per_round=("floats_per_round", "mean"), ratio_logged=("ratio_logged", "mean"),
        ratio_formula=("ratio_formula", "mean")).reset_index()
    table.to_csv(args.sweep_dir / "t5.csv", index=False)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, runs in curves.items():
        x, y = runs[0][0], sum(r[1].to_numpy() for r in runs) / len(runs)
        ax.plot(x, y, label=label, ls="-" if label.startswith("sgd") else "--")
    ax.set(xscale="log", xlabel="uplink floats per client (cumulative)", ylabel="test accuracy (mean over seeds)",
           ylim=(0.5, 1.0), title="T5: PowerSGD in the FL loop (digits, 8 clients)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.sweep_dir / "t5.png", dpi=120)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))


if __name__ == "__main__":
    main()
