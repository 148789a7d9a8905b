"""T1 of docs/ALGORITHMS.md §13 (§2.3–2.4 there), scaled down: fit layer-wise (L0, L1) along a trajectory.

MLP 64→128→128→10 on scikit-learn digits, full-batch gradients, Scion geometry, no momentum, fixed
radius ``t`` (the best of a small grid). Along the trajectory ``L̂_i[k] = ‖g_i^{k+1} − g_i^k‖_* /
‖X_i^{k+1} − X_i^k‖`` is fitted by ``L0_i + L1_i ‖g_i^{k+1}‖_*`` (hinge-weighted, λ ∈ {0, 10}).
Then Gluon's adaptive radius ``t_i = ‖g_i‖_*/(L0_i + L1_i ‖g_i‖_*)`` with the λ = 10 fit is run
against the best constant radius for the same number of steps.

    python experiments/t1_smoothness.py [--steps 600]
"""

from __future__ import annotations

import argparse

import pandas as pd
import torch
import torch.nn.functional as F

from fedgluon.lmo.optim import Gluon
from fedgluon.lmo.radius import SmoothnessTracker
from fedgluon.tasks.data.tabular import load_sklearn
from fedgluon.tasks.models import MLP
from fedgluon.tasks.registry import stratified_split


def data():
    return [torch.from_numpy(a) for a in stratified_split(*load_sklearn("digits"), 0.25, 0)]


def train(steps: int, *, lr: float = 0.02, adaptive=None, track: bool = False, seed: int = 0):
    xtr, xte, ytr, yte = data()
    torch.manual_seed(seed)
    model = MLP(64, (128, 128), 10)
    opt = Gluon(model, lr=lr, method="scion", beta=0.0, adaptive=adaptive)
    tracker = SmoothnessTracker(opt.geometry) if track else None
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(xtr), ytr).backward()
        if tracker is not None:
            tracker.record({n: p for n, p in model.named_parameters()},
                           {n: p.grad for n, p in model.named_parameters()})
        opt.step()
    with torch.no_grad():
        loss = F.cross_entropy(model(xtr), ytr).item()
        acc = (model(xte).argmax(1) == yte).float().mean().item()
    return loss, acc, tracker


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--radii", type=float, nargs="+", default=[0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5],
                    help="constant radii to tune over (the best must not sit on an edge)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    grid = {}
    for lr in args.radii:
        grid[lr] = train(args.steps, lr=lr)[:2]
        print(f"constant radius {lr:<6}: train loss {grid[lr][0]:.3g}  test acc {grid[lr][1]:.4f}")
    best_lr = min(grid, key=lambda k: grid[k][0])
    _, _, tracker = train(args.steps, lr=best_lr, track=True)
    rows = []
    fits = {lam: tracker.fit(lam) for lam in (0.0, 10.0)}
    for name in fits[0.0]:
        p = tracker.geometry.params[name]
        rows.append({"layer": name, "norm": p.norm.describe(), "L0 (λ=0)": fits[0.0][name][0],
                     "L1 (λ=0)": fits[0.0][name][1], "L0 (λ=10)": fits[10.0][name][0],
                     "L1 (λ=10)": fits[10.0][name][1],
                     "1/L1 (λ=10)": 1 / fits[10.0][name][1] if fits[10.0][name][1] > 0 else float("inf"),
                     "points": len(tracker.lhat[name])})
    table = pd.DataFrame(rows)
    print(f"\nbest constant radius: {best_lr} (train loss {grid[best_lr][0]:.3g})")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    L0 = {r["layer"]: max(r["L0 (λ=10)"], 0.0) for r in rows}
    L1 = {r["layer"]: max(r["L1 (λ=10)"], 1e-12) for r in rows}
    loss, acc, _ = train(args.steps, adaptive={"L0": L0, "L1": L1})
    print(f"\nGluon adaptive radius from the λ=10 fit: train loss {loss:.3g}  test acc {acc:.4f} "
          f"(best constant: {grid[best_lr][0]:.3g} / {grid[best_lr][1]:.4f})")



if __name__ == "__main__":
    main()
