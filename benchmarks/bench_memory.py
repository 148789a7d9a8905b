"""Memory per client: the bytes each algorithm keeps per simulated client, and a real many-client run.

Part 1 — for a ~1.07M-parameter MLP (784→1024→256→10) and each stateful configuration below, two
clients run two rounds of the plain driver; from the client-state table (``fedgluon.core.memory.
client_state_bytes``) we print the bytes one client's committed state holds alone (its row of the table
and the broadcast models the table keeps for ``X_prev``), bytes per parameter, the marginal bytes of one
more client (its row: the kept models are shared by every client pointing at them), and the projection
``alone + (N−1)·marginal`` for N = 1,000 clients.

Part 2 — ``--clients N`` clients (1,000 by default, 50 with ``--quick``) of that model really run
two rounds of ``--algorithm`` (gluon-ef21-sarah, top-1%, by default) in this process; we print the
measured state bytes and the process's peak resident memory (``getrusage``), against the issue's
budget of 24 GiB for 1,000 clients × 1M parameters.

Run: ``python -m benchmarks.bench_memory [--quick] [--clients N] [--tracker fixed16]``.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import torch

from benchmarks.common import machine
from fedgluon.algorithms import make_algorithm
from fedgluon.clients.objective import SupervisedObjective
from fedgluon.core.memory import client_state_bytes
from fedgluon.lmo.geometry import Geometry
from fedgluon.sim.driver import run_plain
from fedgluon.tasks.models import MLP

TOPK = {"name": "topk", "ratio": 0.01}
CONFIGS = [
    ("gluon (client momentum)", "gluon", {}),
    ("gluon-ef21, top-1%", "gluon-ef21", {"compressor": TOPK}),
    ("gluon-ef21, top-1%, fixed16 tracker", "gluon-ef21", {"compressor": TOPK, "tracker": "fixed16"}),
    ("gluon-ef21-sarah, top-1%", "gluon-ef21-sarah", {"compressor": TOPK}),
    ("gluon-ef21-sarah, top-1%, fixed16", "gluon-ef21-sarah", {"compressor": TOPK, "tracker": "fixed16"}),
    ("gluon-ef21-sarah, fixed16 + fp16 estimator", "gluon-ef21-sarah",
     {"compressor": TOPK, "tracker": "fixed16", "state_dtype": "float16"}),
    ("gluon-ef21-mvr, top-1%", "gluon-ef21-mvr", {"compressor": TOPK}),
    ("gluon-marina, rand-1% seeded", "gluon-marina", {"compressor": {"name": "randk_seeded", "ratio": 0.01}}),
    ("gluon-dasha-mvr, rand-1% seeded", "gluon-dasha-mvr", {"compressor": {"name": "randk_seeded", "ratio": 0.01}}),
    ("sgd, PowerSGD r=4, EF14", "sgd", {"compressor": {"name": "powersgd", "rank": 4}, "error_feedback": "ef14"}),
]


def problem(num_clients: int, samples: int = 32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = MLP(784, (1024, 256), 10)
    objectives = [SupervisedObjective(model, torch.randn(samples, 784, generator=gen),
                                      torch.randint(0, 10, (samples,), generator=gen), batch_size=samples)
                  for _ in range(num_clients)]
    X0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    return model, objectives, X0


def per_client_table(model, objectives, X0, clients: int) -> None:
    P = sum(t.numel() for t in X0.values())
    print(f"model: MLP 784-1024-256-10, {P:,} parameters ({4 * P / 2**20:.1f} MiB in fp32)")
    print(f"{'configuration':44s} {'bytes/client':>13s} {'B/param':>8s} {'marginal B/param':>17s} "
          f"{'GiB @ ' + format(clients, ','):>12s}")
    for label, name, options in CONFIGS:
        algo = make_algorithm(name, Geometry.from_model(model), lr=0.01, **options)
        res = run_plain(algo, objectives[:2], X0, 2, seed=0, evaluate=lambda X, k: {})
        alone, marginal = alone_and_marginal(res.table)
        projected = alone + (clients - 1) * marginal
        print(f"{label:44s} {alone:13,.0f} {alone / P:8.2f} {marginal / P:17.2f} "
              f"{projected / 2**30:12.2f}")


def alone_and_marginal(table) -> tuple[float, float]:
    """Bytes of one client's state alone (its row and the table's shared part: the models kept for
    ``X_prev``) and the bytes one more client adds (its row), from a table of any number of clients."""
    sizes = client_state_bytes(table)
    shared = sizes["total"] - table.num_clients * sizes["mean"]
    return sizes["mean"] + shared, sizes["mean"]


def many_clients(model, objectives, X0, algorithm: str, tracker: str, state_dtype: str | None = None) -> None:
    P = sum(t.numel() for t in X0.values())
    n = len(objectives)
    algo = make_algorithm(algorithm, Geometry.from_model(model), lr=0.01, compressor=TOPK, tracker=tracker,
                          state_dtype=state_dtype)
    t = time.perf_counter()
    res = run_plain(algo, objectives, X0, 2, seed=0, evaluate=lambda X, k: {})
    wall = time.perf_counter() - t
    sizes = client_state_bytes(res.table)
    alone, marginal = alone_and_marginal(res.table)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    print(f"\n{n:,} clients x {P:,} parameters, {algorithm} (top-1%, {tracker} tracker, estimator state "
          f"{state_dtype or 'fp32'}), 2 rounds in {wall:.1f} s:")
    print(f"  client states: {sizes['total'] / 2**30:.2f} GiB in all, {alone / P:.2f} bytes/param for one "
          f"client alone, {marginal / P:.2f} marginal")
    print(f"  peak resident memory of this process: {peak / 2**30:.2f} GiB (the issue's budget for 1,000 clients "
          f"x 1M parameters: 24 GiB; this machine has {memory / 2**30:.1f} GiB)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="50 clients in part 2")
    ap.add_argument("--clients", type=int, default=None, help="clients in part 2 (default 1000, quick 50)")
    ap.add_argument("--algorithm", default="gluon-ef21-sarah")
    ap.add_argument("--tracker", default="full", choices=["full", "fixed16"])
    ap.add_argument("--state-dtype", default=None, choices=["float16", "bfloat16"],
                    help="store the client estimator's state in this dtype (part 2)")
    args = ap.parse_args(argv)
    clients = args.clients or (50 if args.quick else 1000)
    print(machine())
    model, objectives, X0 = problem(clients)
    per_client_table(model, objectives, X0, 1000)
    many_clients(model, objectives, X0, args.algorithm, args.tracker, args.state_dtype)


if __name__ == "__main__":
    main()
