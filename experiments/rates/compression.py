"""Item 3: how the rounds to a fixed ‖∇f‖_* grow with the compression, against the bounds' factors.

The problem of :mod:`.problem` (same data, model, geometry and metric), split iid over n ∈ {1, 10}
clients; every client computes its full local gradient (no sampling noise, so the rounds measure the
compression alone). fedgluon's own algorithms run in the plain driver (``fedgluon.sim.driver.run_plain``):

* ``gluon-ef21-sarah`` with top-k (contractive, α = k/d, the smallest over layers), no refreshes after
  round 0 (with exact local gradients the SARAH estimator is the exact gradient);
* ``gluon-marina`` with rand-k (unbiased, ω = d/k − 1, the largest over layers), refresh (dense)
  rounds with MARINA's p = 1/(ω+1).

For every (method, n, ratio) the constant radius t is searched on a grid of ratio √2 (from T_START
down until a run reaches ``‖∇f(X^k)‖_* ≤ TARGET``, then up while the rounds fall), and the fewest
rounds is kept: a run stops at the target, once it cannot beat the best so far, or after PATIENCE
rounds without a 0.1% lower loss (too large a radius oscillates above the target).
One seed (0) per point: top-k with exact gradients is deterministic; rand-k and MARINA's coin are not.

Bounds (Euclidean step-size conditions; the LMO analyses of EF21-Muon carry the same factors, and
the core paper's own bounds are not public), the number of rounds being ∝ 1/γ_max:

* EF21 (Richtárik, Sokolov, Fatkhullin 2021, Thm 1): ``γ ≤ 1/(L + L̃·√(β/θ))`` with
  θ = 1 − √(1−α), β = (1−α)/θ, so rounds ∝ ``1 + √(1−α)/(1 − √(1−α))`` ≈ 2/α for small α,
  independent of n;
* MARINA (Gorbunov et al. 2021, Thm 2.1): ``γ ≤ 1/(L(1 + √((1−p)ω/(p n))))``; with p = 1/(ω+1),
  rounds ∝ ``1 + ω/√n``.

``predicted_rounds`` scales the factor to the measured rounds at the least compressed ratio.
"""

from __future__ import annotations

import math
import multiprocessing as mp
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from compressors import make_compressor
from fedgluon.algorithms import make_algorithm
from fedgluon.clients.objective import SupervisedObjective
from fedgluon.sim.driver import run_plain

from .fit import slope
from .problem import digits, grad_dual_norm, make_geometry, make_model

TARGET = 0.3
COMPRESSOR = {"gluon-ef21-sarah": "topk", "gluon-marina": "randk"}
RATIOS = (0.5, 0.2, 0.05)
CLIENTS = (1, 10)
T_START = 0.01
STEP = 2 ** 0.5  # the radius grid's ratio
PATIENCE = 200  # a run stops when its full loss has not improved by 0.1% for this many rounds


class _Reached(Exception):
    pass


def factor(method: str, ratio: float, shapes) -> float:
    """1/α (top-k) or ω (rand-k) of the layer-wise compressor at ``ratio`` (worst layer)."""
    comp = make_compressor({"name": COMPRESSOR[method], "ratio": ratio}).structure
    if method == "gluon-ef21-sarah":
        return 1.0 / min(comp.alpha(s) for s in shapes)
    return max(comp.omega(s) for s in shapes)


def bound(method: str, x: float, clients: int) -> float:
    """The bounds' round factor (module docstring) at 1/α = x (EF21) or ω = x (MARINA)."""
    if method == "gluon-ef21-sarah":
        r = math.sqrt(max(0.0, 1 - 1 / x))
        return 1 + r / (1 - r)
    return 1 + x / math.sqrt(clients)


def rounds_to_target(method: str, clients: int, ratio: float, radius: float, seed: int, cap: int,
                     target: float = TARGET) -> int | None:
    """Rounds until ‖∇f‖_* ≤ ``target`` (None if not within ``cap`` rounds)."""
    torch.set_num_threads(1)
    x, y = digits()
    model = make_model(0)
    geometry = make_geometry(model)
    parts = np.array_split(np.random.default_rng(0).permutation(len(x)), clients)
    objectives = [SupervisedObjective(model, x[torch.from_numpy(p)], y[torch.from_numpy(p)], batch_size=len(p))
                  for p in parts]
    shapes = [p.shape for p in geometry]
    opts: dict[str, Any] = {"lr": radius, "schedule": "constant",
                            "compressor": {"name": COMPRESSOR[method], "ratio": ratio}}
    if method == "gluon-marina":
        opts["refresh_prob"] = 1.0 / (1.0 + factor(method, ratio, shapes))
    else:
        opts["refresh_prob"] = 0.0
    algorithm = make_algorithm(method, geometry, **opts)
    X0 = {n: p.detach().clone() for n, p in model.named_parameters()}

    best = [math.inf, 0]  # the lowest full loss so far and the round it was reached

    def evaluate(params, k: int) -> dict[str, float]:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(params[n])
        loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        value = grad_dual_norm(geometry, {n: g for (n, _), g in zip(model.named_parameters(), grads)})
        if not math.isfinite(value) or value <= target:
            raise _Reached(k + 1 if math.isfinite(value) else -1)
        if float(loss.detach()) < (1 - 1e-3) * best[0]:
            best[:] = [float(loss.detach()), k]
        elif k - best[1] > PATIENCE:
            raise _Reached(-1)
        return {"grad_dual_norm": value}

    try:
        run_plain(algorithm, objectives, X0, cap, seed=seed, evaluate=evaluate, eval_every=1)
    except _Reached as hit:
        r = hit.args[0]
        return r if r > 0 else None
    return None


def _task(args: tuple) -> dict[str, Any]:
    """Radius search for one (method, clients, ratio) on a grid of ratio STEP: from T_START downwards
    until a radius reaches the target, then upwards while the rounds fall. Every run is capped at the
    best rounds so far, so a radius that cannot beat it stops early."""
    method, clients, ratio, cap, quick, target = args
    shapes = [p.shape for p in make_geometry(make_model(0))]
    rows, best, tried = [], math.inf, {}

    def attempt(radius: float) -> float:
        limit = int(min(cap, best))
        got = rounds_to_target(method, clients, ratio, radius, 0, limit, target)
        rounds = float(got) if got is not None else math.inf
        rows.append({"method": method, "clients": clients, "ratio": ratio, "factor": factor(method, ratio, shapes),
                     "radius": round(radius, 6), "rounds": rounds, "cap": limit})
        tried[radius] = rounds
        return rounds

    radius = T_START
    for _ in range(1 if quick else 4):  # downwards until the target is reached
        best = min(best, attempt(radius))
        if math.isfinite(best):
            break
        radius /= STEP ** 2
    radius = max(r for r, v in tried.items() if v == best) if math.isfinite(best) else radius
    for _ in range(1 if quick else 8):  # upwards while the rounds fall
        radius *= STEP
        rounds = attempt(radius)
        if rounds >= best:
            break
        best = rounds
    return {"rows": rows}


def effective_alpha(ratio: float, steps: int = 200, radius: float = 0.02) -> float:
    """``1 − mean_k ‖C(v_k) − v_k‖² / ‖v_k‖²`` for fedgluon's top-k ``C`` at ``ratio`` on the gradient
    differences ``v_k = ∇f(X^{k+1}) − ∇f(X^k)`` (what EF21 compresses with exact gradients) along a
    full-gradient LMO trajectory of ``steps`` steps at a constant ``radius`` (the layers' errors and
    norms summed). The bound's α = k/d is the worst case over all vectors."""
    from compressors.operators import Context

    x, y = digits()
    model = make_model(0)
    geometry = make_geometry(model)
    comp = make_compressor({"name": "topk", "ratio": ratio})
    g_old, ratios = None, []
    for _ in range(steps):
        grads = {n: t for n, t in zip([n for n, _ in model.named_parameters()], torch.autograd.grad(
            F.cross_entropy(model(x), y), list(model.parameters())))}
        if g_old is not None:
            err = norm = 0.0
            for n, g in grads.items():
                v = g - g_old[n]
                payload, _ = comp.compress(v, Context(0))
                err += float((comp.decompress(payload, shape=tuple(v.shape)) - v).square().sum())
                norm += float(v.square().sum())
            ratios.append(err / norm)
        g_old = grads
        direction = geometry.lmo(grads)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.add_(radius * direction[n])
    return 1.0 - float(np.mean(ratios))


def run(out: Path, quick: bool = False, jobs: int = 2) -> pd.DataFrame:
    """The sweep; writes compression.csv, compression_fit.csv and compression.png, returns the fit."""
    ratios = RATIOS[:2] if quick else RATIOS
    clients = (1, 2) if quick else CLIENTS
    cap, target = (10, 0.95) if quick else (1500, TARGET)
    tasks = [(m, n, r, cap, quick, target) for n in clients for m in COMPRESSOR for r in ratios]
    path = out / "compression.csv"
    path.unlink(missing_ok=True)
    rows: list[dict[str, Any]] = []
    with mp.get_context("spawn").Pool(jobs) if jobs > 1 else _Serial() as pool:
        for res in pool.imap(_task, tasks):  # one client first (cheap), each result written at once
            pd.DataFrame(res["rows"]).to_csv(path, mode="a", header=not rows, index=False)
            rows += res["rows"]
    return summarise(out, pd.DataFrame(rows), quick)


class _Serial:
    """``Pool.imap`` in this process (``jobs = 1``)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap(self, fn, tasks):
        return map(fn, tasks)


def summarise(out: Path, frame: pd.DataFrame, quick: bool = False) -> pd.DataFrame:
    """compression_best.csv, compression_fit.csv and compression.png from the search rows."""
    frame = frame.sort_values(["method", "clients", "ratio", "radius"], ascending=[True, True, False, False],
                              ignore_index=True)
    frame.to_csv(out / "compression.csv", index=False)
    best = frame.loc[frame.groupby(["method", "clients", "ratio"])["rounds"].idxmin()].copy()
    best = best.sort_values(["method", "clients", "factor"])
    preds = []
    for (m, n), sub in best.groupby(["method", "clients"]):
        base = sub.iloc[0]
        for row in sub.itertuples():
            preds.append(base.rounds * bound(m, row.factor, n) / bound(m, base.factor, n))
    best["predicted_rounds"] = preds
    best["alpha_eff"] = [effective_alpha(r, steps=10 if quick else 200) if m == "gluon-ef21-sarah" else math.nan
                         for m, r in zip(best["method"], best["ratio"])]
    summary = []
    for (m, n), sub in best.groupby(["method", "clients"]):
        ok = np.isfinite(sub["rounds"].to_numpy())
        fx, r, p = sub["factor"].to_numpy()[ok], sub["rounds"].to_numpy()[ok], sub["predicted_rounds"].to_numpy()[ok]
        summary.append({"method": m, "clients": n, "ratios": len(sub), "reached": int(ok.sum()),
                        "measured_slope": slope(fx, r) if ok.sum() >= 2 else math.nan,
                        "bound_slope": slope(fx, p) if ok.sum() >= 2 else math.nan})
    best.to_csv(out / "compression_best.csv", index=False)
    table = pd.DataFrame(summary)
    table.to_csv(out / "compression_fit.csv", index=False)
    from .plots import plot_compression

    plot_compression(best, out / "compression.png")
    return table
