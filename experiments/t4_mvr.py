"""T4 of docs/ALGORITHMS.md §13, scaled down: Muon vs Muon-MVR1 vs Muon-MVR2 vs STORM-MVR on one machine.

MLP 64→128→128→10 on scikit-learn digits, batch 32, ``fedgluon.lmo.optim.Gluon`` with the Muon geometry
(hidden spectral with Muon's shape scale, head sign, vectors RMS), NS5 in fp32, constant radius tuned per
method over {0.01, 0.02, 0.05} by final full-batch train loss (mean of 2 seeds). MVR2 and STORM take two
gradients per step (same batch at X^k and X^{k−1}); the table reports the train loss both at equal
iterations and at equal gradient evaluations.

    python experiments/t4_mvr.py [--epochs 10]
"""

from __future__ import annotations

import argparse

import pandas as pd
import torch
import torch.nn.functional as F

from fedgluon.lmo.optim import Gluon, minibatch_epoch
from fedgluon.tasks.data.tabular import load_sklearn
from fedgluon.tasks.models import MLP
from fedgluon.tasks.registry import stratified_split

METHODS = {"muon": {"method": "muon"}, "muon-mvr1": {"method": "muon-mvr1"}, "muon-mvr2": {"method": "muon-mvr2"},
           "storm (gamma=1, no clip)": {"method": "gluon-mvr", "preset": "muon", "beta": 0.9, "schedule": "constant"}}
GRAD_PER_STEP = {"muon": 1, "muon-mvr1": 1, "muon-mvr2": 2, "storm (gamma=1, no clip)": 2}


def run(options: dict, lr: float, epochs: int, seed: int) -> list[float]:
    xtr, _, ytr, _ = (torch.from_numpy(a) for a in stratified_split(*load_sklearn("digits"), 0.25, 0))
    torch.manual_seed(seed)
    model = MLP(64, (128, 128), 10)
    opt = Gluon(model, lr=lr, **options)
    g = torch.Generator().manual_seed(seed)
    curve = []

    def record() -> None:
        with torch.no_grad():
            curve.append(F.cross_entropy(model(xtr), ytr).item())

    for _ in range(epochs):
        minibatch_epoch(opt, model, xtr, ytr, 32, generator=g, after_step=record)
    return curve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = []
    for name, options in METHODS.items():
        best = None
        for lr in (0.01, 0.02, 0.05):
            curves = [run(options, lr, args.epochs, seed) for seed in (0, 1)]
            mean = [sum(c[i] for c in curves) / len(curves) for i in range(len(curves[0]))]
            if best is None or mean[-1] < best[1][-1]:
                best = (lr, mean)
        lr, curve = best
        steps = len(curve)
        equal_grads = steps // GRAD_PER_STEP[name]  # the iteration where a 1-gradient method's budget runs out
        rows.append({"method": name, "lr": lr, "grads/step": GRAD_PER_STEP[name], "iterations": steps,
                     "loss @ 1/2 iterations": curve[steps // 2 - 1], "loss @ all iterations": curve[-1],
                     f"loss @ {steps} gradient evals": curve[equal_grads - 1]})
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.4g}"))


if __name__ == "__main__":
    main()
