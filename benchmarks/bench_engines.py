"""Per-client-task cost of the engines against the plain driver doing the same client work.

For n ∈ {10, 50, 200} clients of the synthetic task (MLP 60→64→10, batch 32, gluon-ef21 with
top-5%), run R rounds with full participation on (1) the plain driver, (2) the Flower strategy +
ClientApp on fedgluon's in-process Grid, (3) Flower's simulation engine on Ray (1 CPU per client,
a private local Ray). Prints seconds per round, per client task, and the ratio to the plain driver;
Ray's start-up (and shut-down) is reported separately from the per-round cost.

Run: ``python -m benchmarks.bench_engines [--quick] [--no-ray]``.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import machine
from fedgluon import spec as specs
from fedgluon.driver import run_plain
from fedgluon.engines import run_inprocess, run_ray


def spec_for(n: int, rounds: int) -> dict:
    return {"task": {"name": "synthetic", "num_clients": n, "hidden": [64], "mean_samples": 60},
            "algorithm": {"name": "gluon-ef21", "lr": 0.05, "compressor": {"name": "topk", "ratio": 0.05}},
            "rounds": rounds, "seed": 0, "eval_every": 10 ** 6, "node_timeout": 300.0, "round_timeout": 600.0}


def per_round(history: list[dict], skip: int = 1) -> float:
    rows = history[skip:] or history
    return sum(r["wall_time"] for r in rows) / len(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10 and 50 clients, 3 rounds")
    ap.add_argument("--no-ray", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    sizes, rounds = ((10, 50), 3) if args.quick else ((10, 50, 200), 4)
    print(f"machine: {machine()}")
    print(f"{'clients':>7s} {'engine':>22s} {'s/round':>9s} {'ms/client task':>15s} {'x plain':>8s} {'start-up s':>11s}")
    for n in sizes:
        s = specs.normalise(spec_for(n, rounds))
        task, algo = specs.build(s)
        res = run_plain(algo, task.objectives, task.initial_params(), rounds, seed=0)
        plain = per_round(res.history)
        print(f"{n:7d} {'plain driver':>22s} {plain:9.3f} {1e3 * plain / n:15.2f} {1.0:8.2f} {'-':>11s}")
        t = time.perf_counter()
        strat = run_inprocess(s)
        total = time.perf_counter() - t
        inproc = per_round(strat.history)
        print(f"{n:7d} {'flower in-process grid':>22s} {inproc:9.3f} {1e3 * inproc / n:15.2f} {inproc / plain:8.2f} "
              f"{total - sum(r['wall_time'] for r in strat.history):11.1f}")
        if not args.no_ray:
            t = time.perf_counter()
            strat = run_ray(s, num_cpus=1)
            total = time.perf_counter() - t
            ray_round = per_round(strat.history)
            print(f"{n:7d} {'flower on ray':>22s} {ray_round:9.3f} {1e3 * ray_round / n:15.2f} {ray_round / plain:8.2f} "
                  f"{total - sum(r['wall_time'] for r in strat.history):11.1f}")


if __name__ == "__main__":
    main()
