"""Phase 1: tune each method's radius or learning rate on seed 0 with ``fedgluon tune`` (Ray Tune, ASHA),
then write ``chosen.yaml``.

Methods that tune the same key over the same grid share one tune directory per task,
``<out>/<task>/<key>-<grid>/`` (one Ray Tune ``Tuner`` per method inside it, fedgluon/exp/tuning.py). A
directory that exists is continued (``fedgluon tune --resume``) or, once complete, read: the phase is
resumable by running the same command again. ASHA (grace period: two evaluations, reduction factor 3) stops
poor trials early; a trial stopped early never competes (only trials that ran every round do), and the
metric is the final test loss, or with ``metric="final_val_loss"`` (``--metric``) the final loss on a
validation split the clients hold back (given by ``--set task.validation_fraction=F``), so that the test data
choose nothing.

A method whose best value lies on its grid's edge gets one more trial one grid step beyond it
(``<out>/<task>/extend/``); the better of the two is chosen. ``chosen.yaml`` records, per task and method,
the value, its grid (with the extension), its index there and ``edge`` (``low``/``high``: still on the edge
after the extension; the value may lie outside the searched range), the metric and the trials it compared.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from experiments.flagship.plan import CHOSEN_FILE, METRIC, TASKS, Chosen, Method, edge_of, extend, tuned_by
from fedgluon.config import schema as configs
from fedgluon.exp.sweep import parse_grid
from fedgluon.exp.tuning import resume, tune


def run_tunes(task: str, methods: Sequence[Method], out: Path, *, overrides: Sequence[str] = (), parallel: int = 2,
              progress: bool = True, metric: str = METRIC) -> None:
    """Tune every method of ``methods`` on ``task`` over its grid, the methods sharing a (key, grid) in one
    ``fedgluon tune``: a tune that holds a method already is continued or, complete, left as it is."""
    groups: dict[tuple[str, str], list[Method]] = {}
    for m in methods:
        groups.setdefault((m.key, m.grid_name), []).append(m)
    for (key, grid_name), group in groups.items():
        axis = f"algorithm.{key}=[{','.join(repr(v) for v in group[0].grid)}]"
        ensure(out / task, task, [*overrides, axis], [m.algorithm for m in group], f"{key}-{grid_name}", parallel,
               progress, metric)


def requests(task_dir: Path) -> dict[Path, dict[str, Any]]:
    """Every tune directory under ``task_dir`` → its request (tune.json)."""
    return {p.parent: json.loads(p.read_text()) for p in sorted(task_dir.glob("*/tune.json"))}


def ensure(task_dir: Path, task: str, args: Sequence[str], algorithms: list[dict[str, Any]], name: str,
           parallel: int, progress: bool, metric: str = METRIC) -> None:
    """Every algorithm of ``algorithms`` tuned over the grid in ``args``: the tunes that hold some of them are
    continued if unfinished, and the others are tuned in a new directory (``name``, or ``name-<hash>`` when a
    tune of other algorithms has that name)."""
    overrides, grid = parse_grid(args)
    missing = list(algorithms)
    for d, request in requests(task_dir).items():
        held = [a for a in request["algorithms"] if a in missing]
        if not held or request["grid"] != grid or not _made_with(request, overrides, task_dir, metric):
            continue
        if not _finished(d, request):
            resume(d, progress=progress)
        missing = [a for a in missing if a not in held]
    if not missing:
        return
    if (task_dir / name).exists():
        name += "-" + hashlib.sha1(json.dumps(missing, sort_keys=True).encode()).hexdigest()[:6]
    base = configs.load(TASKS[task], overrides)
    tune(TASKS[task], [*args, f"output.dir={task_dir}"], missing, metric=metric, mode="min", name=name,
         scheduler="asha", grace_period=min(int(base.rounds), 2 * int(base.eval_every)), reduction_factor=3.0,
         parallel=parallel, progress=progress)


def _finished(d: Path, request: dict[str, Any]) -> bool:
    return (d / "best.json").is_file() and all((d / label / "trials.csv").is_file() for label in request["labels"])


def trials_of(task_dir: Path, method: Method, overrides: Sequence[str] = (), metric: str = METRIC
              ) -> dict[float, float]:
    """value → ``metric`` of ``method``'s trials that ran every round, in every tune under ``task_dir`` made
    with these ``overrides`` and ranked by this ``metric`` (a smoke tune with ``--set rounds=2`` never mixes
    with the real one)."""
    found: dict[float, float] = {}
    mine = json.dumps(method.algorithm, sort_keys=True)
    for d, request in requests(task_dir).items():
        if not (d / "tuned.csv").is_file() or not _made_with(request, overrides, task_dir, metric):
            continue
        table = pd.read_csv(d / "tuned.csv")
        for label, alg in zip(request["labels"], request["algorithms"]):
            fixed = {k: v for k, v in alg.items() if k != method.key}
            if json.dumps(fixed, sort_keys=True) != mine:
                continue
            trials = table[table["algorithm"] == label]
            column = f"algorithm.{method.key}"
            if column not in trials or trials[column].isna().all():  # an extension: the value is in the section
                trials = trials.assign(**{column: alg[method.key]})
            found.update(scores(trials, method.key, metric))
    return found


def _made_with(request: dict[str, Any], overrides: Sequence[str], task_dir: Path, metric: str) -> bool:
    """Whether a tune's request was made with these ``overrides`` and ranked by ``metric`` (another metric
    decided its early stops)."""
    return (request.get("overrides") == [*overrides, f"output.dir={task_dir}"]
            and request.get("metric", METRIC) == metric)


def scores(trials: pd.DataFrame, key: str, metric: str = METRIC) -> dict[float, float]:
    """value → ``metric`` of the trials that ran every round (stopped early or diverged: absent)."""
    done = trials[trials["complete"].astype(bool) & trials[metric].notna()]
    return {float(v): float(x) for v, x in zip(done[f"algorithm.{key}"], done[metric])}


def choose(task: str, methods: Sequence[Method], out: Path, *, overrides: Sequence[str] = (), extend_edges: bool = True,
           parallel: int = 2, progress: bool = True, metric: str = METRIC) -> dict[str, dict[str, Any]]:
    """The chosen value per method (tuning one step beyond a grid edge first where that is where the best lies);
    each entry holds the ``metric`` of the chosen value under the metric's name."""
    found = {m.label: trials_of(out / task, m, overrides, metric) for m in methods}
    edges = [m for m in methods if found[m.label] and edge_of(m.grid, _best(found[m.label])) in ("low", "high")]
    if extend_edges and edges:
        algorithms = [m.algorithm_at(extend(m.grid, edge_of(m.grid, _best(found[m.label])))) for m in edges]
        ensure(out / task, task, list(overrides), algorithms, "extend", parallel, progress, metric)
        found = {m.label: trials_of(out / task, m, overrides, metric) for m in methods}
    chosen = {}
    for m in methods:
        grid = sorted({*m.grid, *found[m.label]})
        if not found[m.label]:
            chosen[m.label] = {"value": None, "grid": grid,
                               "note": "no trial ran every round (all diverged or stopped)"}
            continue
        best = _best(found[m.label])
        chosen[m.label] = {"value": best, "grid": grid, "index": grid.index(best),
                           "edge": edge_of(tuple(grid), best) or "none",
                           metric: found[m.label][best],
                           "trials": {str(v): round(x, 5) for v, x in sorted(found[m.label].items())}}
    return chosen


def _best(scored: dict[float, float]) -> float:
    return min(scored, key=lambda v: (scored[v], v))


def write_chosen(chosen: Chosen, path: Path = CHOSEN_FILE, *, header: str = "") -> None:
    """Merge ``chosen`` (task → method → entry) into ``path``: other tasks' and methods' entries are kept."""
    old = OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else {}
    merged = dict(old) if isinstance(old, dict) else {}
    for task, entries in chosen.items():
        merged[task] = {**merged.get(task, {}), **entries}
    text = OmegaConf.to_yaml(OmegaConf.create(merged))
    path.write_text(header + text)


def summary_lines(chosen: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for label, c in chosen.items():
        if c["value"] is None:
            lines.append(f"  {label}: no value ({c['note']})")
        else:
            flag = "" if c["edge"] == "none" else f"  [on the grid's {c['edge']} edge]"
            lines.append(f"  {label}: {c['value']:g} (index {c['index']} of {len(c['grid'])}; "
                         f"{(m := tuned_by([c]))} {c[m]:.4f}){flag}")
    return lines
