"""Per-client-task cost of the engines, with and without client blocks, against the plain driver.

For n ∈ {10, 50, 200, 1000} clients of the synthetic task (MLP 60→64→10 ≈ 4.6k parameters, batch
32, gluon-ef21 with top-5%), full participation, R rounds, 1 torch thread. Rows:

* ``plain loop``            — the reference driver, one ``client_step`` per client (a block of one), the baseline 1.00
* ``plain, blocks of B``    — the same driver computing each block's gradients in one vmapped call
* ``..., W workers``        — (``--workers W``) the same with W blocks stepped at once in threads, the
  torch threads split among them (``run_plain(workers=W)``; the same results)
* ``in-process, 1/node``    — Flower strategy + ClientApp on fedgluon's in-process Grid, one client per node
* ``in-process, blocks``    — the same with B virtual clients per node (n/B nodes)
* ``ray, 1/node``           — Flower's simulation engine on a private local Ray, one client per node
* ``ray, blocks``           — the same with B = n/2 virtual clients per node (2 nodes, one per core)
* ``stock Flower FedAvg``   — Flower's built-in ``FedAvg`` strategy and a plain ClientApp doing the same
  gradient work (one minibatch gradient of the same model per client task; ``benchmarks.flower_fedavg``),
  on the same Ray simulation engine, one client per node

Prints seconds per round (mean over rounds after the first, and "steady": the median of the second
half of the rounds, once the allocator reuses the memory of earlier rounds' client states instead of
faulting in new pages), the server step's share of it (the metrics' ``server_time``: validation,
aggregation, LMO step), milliseconds per client task (from the mean) and the ratio to the plain
loop; Ray's start-up and shut-down are reported apart; then, per size, stock Flower's per-client cost
divided by that of Ray with client blocks (the issue's "≥25×" target), and the Flower paths with
blocks divided by the best plain driver with blocks (the "≤1.5×" target), each from the means (the
targets' measure) and from the steady medians. Ray with one client per
node and stock Flower are skipped above 200 clients (minutes per run here).

With ``--repeats R`` every row of a size runs R times, interleaved, and each target ratio is taken
within a repeat (side by side) and summarised by its median over the repeats: on a machine whose speed
drifts by tens of percent within an hour, one run's ratio is one draw.

The best plain row with blocks (workers included) is the "vmapped loop" the Flower paths are divided by.

With ``--client-device cuda`` the plain and in-process rows with blocks compute their gradients on the GPU
(states, estimators and compression stay on the CPU); the loops and the Ray rows stay on the CPU.

Run: ``python -m benchmarks.bench_engines [--quick] [--no-ray] [--sizes N ...] [--rounds R] [--repeats K]
[--threads T] [--workers W] [--client-device D]``; the issue's 1,000 clients of a 100k-parameter model:
``--sizes 1000 --hidden 1536 --plain-only --threads 2 --workers 2``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import NamedTuple

from benchmarks.common import machine, per_round, spec_for
from benchmarks.flower_fedavg import run_stock_fedavg
from fedgluon.config import spec as specs
from fedgluon.core.devices import resolve_device
from fedgluon.flower.engines import run_inprocess, run_ray
from fedgluon.runtime import prepare_process
from fedgluon.sim.driver import run_plain


def steady(history: list[dict]) -> float:
    """Median wall time of the second half of the rounds."""
    return statistics.median(r["wall_time"] for r in history[len(history) // 2:])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10 and 50 clients, 3 rounds")
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--sizes", type=int, nargs="*", help="client counts (default 10 50 200 1000)")
    ap.add_argument("--hidden", type=int, default=64, help="hidden width of the MLP (1536: ≈107k parameters)")
    ap.add_argument("--plain-only", action="store_true", help="only the plain driver rows")
    ap.add_argument("--rounds", type=int, help="rounds per run (default 4; 3 with --quick)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--workers", type=int, default=1,
                    help="also run the plain driver's block rows with this many blocks at once in threads")
    ap.add_argument("--client-device", default="cpu",
                    help="where the plain and in-process rows with blocks compute their vmapped gradients (cpu, auto, "
                         "cuda, cuda:N; the spec's client_device); Ray rows and the loops stay on the CPU")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs of every row per size, interleaved (the machine's drift hits each engine alike); "
                         "the target ratios are then taken per repeat, side by side, and summarised by their median")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.workers < 1:
        ap.error(f"--workers must be at least 1, got {args.workers}")
    try:
        resolve_device("--client-device", args.client_device)
    except ValueError as e:
        ap.error(str(e))
    prepare_process(threads=args.threads)  # as the fedgluon command line does; the machine line says
    sizes, rounds = ((10, 50), 3) if args.quick else ((10, 50, 200, 1000), 4)
    rounds = args.rounds or rounds
    sizes = tuple(args.sizes) if args.sizes else sizes
    print(f"machine: {machine()}")
    print("targets: ray blocks / vmapped <= 1.5 and stock Flower / ray blocks >= 25 at 200 clients; in-process "
          "blocks / vmapped <= 1.2 at 1000 clients of --hidden 1536 (other sizes: for reference only)")
    print(f"{'clients':>7s} {'engine':>32s} {'s/round':>9s} {'steady':>8s} {'server s':>9s} {'ms/client task':>15s} "
          f"{'x plain':>8s} {'start-up s':>11s}")
    for n in sizes:
        ratios: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            for key, value in run_size(n, rounds, args).items():
                ratios.setdefault(key, []).append(value)
        if args.repeats > 1:
            for key, values in ratios.items():
                print(f"{n:7d} {key:>32s} median {statistics.median(values):6.2f}x over {len(values)} repeats "
                      f"(each: {', '.join(f'{v:.2f}' for v in values)})", flush=True)


class Cost(NamedTuple):
    """Seconds per round of one engine's run: the mean after the first round, and the steady median."""

    mean: float
    steady: float


def show(n: int, label: str, history: list[dict], base: Cost, startup: str = "-") -> Cost:
    """Print one engine's row; returns its cost."""
    cost = Cost(per_round(history), steady(history))
    server = f"{per_round(history, key='server_time'):9.3f}" if "server_time" in history[0] else f"{'-':>9s}"
    print(f"{n:7d} {label:>32s} {cost.mean:9.3f} {cost.steady:8.3f} {server} {1e3 * cost.mean / n:15.3f} "
          f"{cost.mean / base.mean:8.2f} {startup:>11s}", flush=True)
    return cost


def run_size(n: int, rounds: int, args: argparse.Namespace) -> dict[str, float]:
    """Every row of one client count, once; returns the ratios it printed (the targets' among them)."""
    block = max(1, n // 2)
    ratios: dict[str, float] = {}

    def ratio(key: str, num: Cost, den: Cost, target: str = "") -> None:
        """The ratio of two rows' means (the target's measure) and of their steady medians."""
        ratios[key], ratios[f"{key}, steady"] = num.mean / den.mean, num.steady / den.steady
        print(f"{n:7d} {key:>32s} {num.mean / den.mean:9.2f}x per client task{target}; steady "
              f"{num.steady / den.steady:.2f}x", flush=True)

    s = specs.normalise(spec_for(n, rounds, hidden=args.hidden, client_device=args.client_device))
    task, algo = specs.build_cached(s)
    history = run_plain(algo, task.objectives, task.initial_params(), rounds, seed=0).history
    plain = Cost(per_round(history), steady(history))
    show(n, "plain loop", history, plain)
    vmapped = Cost(math.inf, math.inf)  # the plain driver with blocks (the "vmapped loop"), its best block size
    for b in sorted({min(n, 64), block}):
        for w in sorted({1, args.workers}):
            res = run_plain(algo, task.objectives, task.initial_params(), rounds, seed=0, block_size=b, workers=w)
            got = show(n, f"plain, blocks of {b}" + (f", {w} workers" if w > 1 else ""), res.history, plain)
            vmapped = Cost(min(vmapped.mean, got.mean), min(vmapped.steady, got.steady))
    if args.plain_only:
        return ratios

    def startup(total: float, history: list[dict]) -> str:
        return f"{total - sum(r['wall_time'] for r in history):.1f}"

    for label, b in (("in-process, 1/node", 1), (f"in-process, blocks of {block}", block)):
        t = time.perf_counter()
        strat = run_inprocess(specs.normalise(spec_for(n, rounds, b, args.hidden, args.client_device)))
        sec = show(n, label, strat.history, plain, startup(time.perf_counter() - t, strat.history))
    ratio("in-process blocks / vmapped", sec, vmapped)
    if args.no_ray:
        return ratios
    blocked = Cost(math.nan, math.nan)
    for label, b in (("ray, 1/node", 1), (f"ray, blocks of {block}", block)):
        if b == 1 and n > 200:
            continue
        t = time.perf_counter()
        strat = run_ray(specs.normalise(spec_for(n, rounds, b, args.hidden)), num_cpus=1)
        blocked = show(n, label, strat.history, plain, startup(time.perf_counter() - t, strat.history))
    ratio("ray blocks / vmapped", blocked, vmapped, " (target <= 1.5)")
    if n <= 200:
        t = time.perf_counter()
        times = run_stock_fedavg(spec_for(n, rounds, hidden=args.hidden))
        stock = show(n, "stock Flower FedAvg, ray", [{"wall_time": x} for x in times], plain,
                     f"{time.perf_counter() - t - sum(times):.1f}")
        ratio("stock Flower / ray blocks", stock, blocked, " (target >= 25)")
    return ratios


if __name__ == "__main__":
    main()
