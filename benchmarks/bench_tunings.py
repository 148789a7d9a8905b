"""Does each process tuning still pay? Each one against the code without it, interleaved.

An A/A pair first (the tuned variant twice: the noise), then ``--pairs`` pairs of (tuned, untuned), the
order alternating within pairs; prints every ratio untuned / tuned and their median (above 1: the
tuning pays). The machine line and the load (``/proc/loadavg``) are printed with each figure.

* ``topk``    — top-k's timed ``_plan`` against either fixed rule (rows always sampled where they may be,
  or never), for one block of rows of lengths that are planned (d < ``MIN_SAMPLED_D``);
* ``freeze``  — ``run_plain`` with ``gc.freeze`` over the run (removed in issue 30) against without, in a
  process that has imported torch, Flower and Ray (as the command line has), and the collector's time;
* ``malloc``  — the ``mallopt`` settings (process-wide and permanent, so each run is a fresh process,
  alternating ``FEDGLUON_KEEP_FREED_MEMORY=1/0``): the plain driver's steady round.

(``derive_seeds``' vectorised SeedSequence, removed in issue 30, was measured by this script's ``seeds``
at commit 4306784.) Round times are the mean ``wall_time`` of the rounds after the first two.

Run: ``python -m benchmarks.bench_tunings {topk,freeze,malloc} [--pairs 5] [--clients N] [--hidden H]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from functools import partial

import numpy as np
import torch

from benchmarks.common import best_time, machine, per_round, spec_for


def load() -> str:
    with open("/proc/loadavg") as f:
        return "load " + " ".join(f.read().split()[:3])


def round_time(n: int, rounds: int, hidden: int) -> float:
    """Mean wall time of the plain driver's rounds after the first two."""
    from fedgluon.config import spec as specs
    from fedgluon.sim.driver import run_plain

    s = specs.normalise(spec_for(n, rounds, max(1, n // 2), hidden))
    task, algo = specs.build_cached(s)
    history = run_plain(algo, task.objectives, task.initial_params(), rounds, seed=0,
                        block_size=int(s["block_size"])).history
    return per_round(history, skip=2)


def compare(label: str, tuned: Callable[[], float], untuned: Callable[[], float], pairs: int) -> float:
    """Print the A/A ratio and ``pairs`` interleaved ratios untuned / tuned; returns their median."""
    first, second = tuned(), tuned()
    aa = first / second
    print(f"  A/A: {first:.4g}, {second:.4g} ({load()})", flush=True)
    ratios = []
    for i in range(pairs):
        if i % 2:
            b, a = untuned(), tuned()
        else:
            a, b = tuned(), untuned()
        ratios.append(b / a)
        print(f"  pair {i + 1}: tuned {a:.4g}, untuned {b:.4g}, ratio {b / a:.3f} ({load()})", flush=True)
    med = statistics.median(ratios)
    print(f"{label}: A/A {aa:.3f}; untuned/tuned {', '.join(f'{r:.3f}' for r in ratios)}; median {med:.3f} "
          f"({load()})", flush=True)
    return med


def topk(args: argparse.Namespace) -> None:
    from compressors import selection as sel

    rng = np.random.default_rng(0)
    for d in (3840 * 4, 46080, 61440):
        k = max(1, d // 20)
        X = rng.standard_normal((args.clients // 2 if d < 40000 else 64, d)).astype(np.float32)
        out = np.empty((X.shape[0], k), dtype=np.int64)
        plan, fixed = sel._plan(d, k, X.dtype), sel._sample_size(d, k)
        print(f"d={d} k={k} rows={X.shape[0]}: _plan -> {plan}, fixed rule -> {fixed}")
        def select(s: int | None, X=X, k=k, out=out) -> Callable[[], float]:
            return partial(best_time, lambda: sel._select_rows(X, k, out, s), 20, 0)

        compare(f"topk d={d}, exact against _plan", select(plan), select(None), args.pairs)
        compare(f"topk d={d}, sampled against _plan", select(plan), select(fixed), args.pairs)
    t = time.perf_counter()
    sel._plan.cache_clear()
    sel._plan(15360, 768, np.dtype(np.float32))
    print(f"_plan's own cost for one shape: {1e3 * (time.perf_counter() - t):.1f} ms", flush=True)


def freeze(args: argparse.Namespace) -> None:
    import flwr  # noqa: F401 - the command line's process has them
    import ray  # noqa: F401

    import fedgluon.exp.experiment  # noqa: F401

    @contextmanager
    def frozen():  # what fedgluon.runtime.gc_pause.gc_frozen did around every run until issue 30
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()

    def variant(ctx):
        def run() -> float:
            with ctx():
                return round_time(args.clients, args.rounds, args.hidden)
        return run

    print(f"objects tracked by the collector: {len(gc.get_objects())}")
    spent = {"s": 0.0, "full": 0, "start": 0.0}

    def timing(phase: str, info: dict) -> None:
        if phase == "start":
            spent["start"] = time.perf_counter()
        else:
            spent["s"] += time.perf_counter() - spent["start"]
            spent["full"] += info["generation"] == 2

    round_time(args.clients, 2, args.hidden)  # the task is built (and cached) outside the timed runs
    gc.callbacks.append(timing)
    for label, ctx in (("frozen", frozen), ("not frozen", nullcontext)):
        spent.update(s=0.0, full=0)
        t = variant(ctx)()
        print(f"collector time, {label}: {1e3 * spent['s'] / args.rounds:.2f} ms per round, {spent['full']} full "
              f"collections in {args.rounds} rounds; round {t:.3f} s ({load()})", flush=True)
    compare(f"plain round, {args.clients} clients, hidden {args.hidden}, gc.freeze", variant(frozen),
            variant(nullcontext), args.pairs)


CHILD = """
import json, resource, sys
from fedgluon.runtime.allocator import keep_freed_memory
keep_freed_memory()
from benchmarks.bench_tunings import round_time
before = resource.getrusage(resource.RUSAGE_SELF)
t = round_time(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
after = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps([t, after.ru_minflt - before.ru_minflt, after.ru_stime - before.ru_stime]))
"""


def malloc(args: argparse.Namespace) -> None:
    def variant(keep: str) -> Callable[[], float]:
        def run() -> float:
            out = subprocess.run([sys.executable, "-c", CHILD, str(args.clients), str(args.rounds), str(args.hidden)],
                                 capture_output=True, text=True, check=True,
                                 env={**os.environ, "FEDGLUON_KEEP_FREED_MEMORY": keep})
            t, faults, system = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"    FEDGLUON_KEEP_FREED_MEMORY={keep}: round {t:.3f} s; whole run {faults} minor faults, "
                  f"{system:.1f} s system time", flush=True)
            return float(t)
        return run

    compare(f"plain round, {args.clients} clients, hidden {args.hidden}, mallopt", variant("1"), variant("0"),
            args.pairs)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tuning", choices=["topk", "freeze", "malloc"])
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--hidden", type=int, default=64, help="MLP hidden width (1536: ≈107k parameters)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.tuning != "malloc":
        from fedgluon.runtime.allocator import keep_freed_memory

        keep_freed_memory()  # as the command line does
    print(f"machine: {machine()}; {args.tuning}; {load()}", flush=True)
    {"topk": topk, "freeze": freeze, "malloc": malloc}[args.tuning](args)


if __name__ == "__main__":
    main()
