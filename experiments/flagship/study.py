"""Phase 2: every method at its chosen value, three seeds, both tasks, as one ``fedgluon sweep`` per task.

Each task's sweep is ``<out>/<task>/`` with one member per (method, seed) (fedgluon/exp/sweep.py): the
members run as Ray tasks on the plain engine, ``parallel`` at a time, one torch thread each, and a member
whose run directory is complete is skipped, so an interrupted study continues where it stopped. The report
(experiments/flagship/report.py) follows. ``quick`` runs one seed for a few rounds: a smoke test of the
whole pipeline, not a result.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments.flagship.plan import SEEDS, TASKS, Chosen, Method, PlanError, chosen_value
from fedgluon.exp.sweep import member_name, sweep

QUICK = ["rounds=3", "eval_every=3"]


def grid_of(task: str, methods: Sequence[Method], seeds: Sequence[int], chosen: Chosen) -> dict[str, list[Any]]:
    """The sweep's grid: every method's algorithm section at its chosen value, and the seeds."""
    return {"algorithm": [m.algorithm_at(chosen_value(chosen, task, m)) for m in methods], "seed": list(seeds)}


def member_labels(task: str, methods: Sequence[Method], seeds: Sequence[int],
                  chosen: Chosen) -> dict[str, tuple[str, int]]:
    """Sweep member directory name → (method label, seed)."""
    grid = grid_of(task, methods, seeds, chosen)
    return {member_name({"algorithm": alg, "seed": s}, grid): (m.label, s)
            for m, alg in zip(methods, grid["algorithm"]) for s in seeds}


def run_study(tasks: Sequence[str], methods: Sequence[Method], chosen: Chosen, out: Path, *,
              seeds: Sequence[int] = SEEDS, quick: bool = False, parallel: int = 2, overrides: Sequence[str] = (),
              progress: bool = True) -> dict[str, Path]:
    """Run (or continue) each task's sweep; returns task → sweep directory. Writes ``<out>/timing.json``."""
    if not methods:
        raise PlanError("no methods selected")
    dirs, timing = {}, {}
    for task in tasks:
        grid = grid_of(task, methods, seeds, chosen)
        args = [*(QUICK if quick else []), *overrides, f"output.dir={out}",
                f"algorithm={json.dumps(grid['algorithm'])}", f"seed={json.dumps(grid['seed'])}"]
        start = time.perf_counter()
        dirs[task] = sweep(TASKS[task], args, name=task, progress=progress, parallel=parallel)
        timing[task] = round(time.perf_counter() - start, 1)
    path = out / "timing.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**old, **{f"{t}_seconds": s for t, s in timing.items()}}, indent=2))
    return dirs
