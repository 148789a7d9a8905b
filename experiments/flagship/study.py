"""Phase 2: every method at its chosen value, three seeds, both tasks, as one ``fedgluon sweep`` per task.

Each task's sweep is ``<out>/<task>/`` with one member per (method, seed) (fedgluon/exp/sweep.py): the
members run as Ray tasks on the plain engine, ``parallel`` at a time, one torch thread each, and a member
whose run directory is complete is skipped, so an interrupted study continues where it stopped. The report
(experiments/flagship/report.py) follows. ``quick`` adds :data:`QUICK` (a few rounds; the command line
also takes one seed only): a smoke test of the whole pipeline, not a result.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from experiments.flagship.plan import SEEDS, TASKS, Chosen, Method, PlanError, chosen_value
from fedgluon.config import schema as configs
from fedgluon.config.run_dir import MARKER, is_complete, prepare_dir
from fedgluon.config.sections import listed
from fedgluon.exp.sweep import changes_from, member_name, sweep
from fedgluon.sim.faults import DEFAULTS as FAULT_DEFAULTS

QUICK = ["rounds=3", "eval_every=3"]
TUNE = "tune"  # phase 1's directory under the study's output directory (experiments/flagship/tune.py)


def grid_of(task: str, methods: Sequence[Method], seeds: Sequence[int], chosen: Chosen) -> dict[str, list[Any]]:
    """The sweep's grid: the seeds, and every method's algorithm section at its chosen value. Seeds first: the
    sweep runs every method's seed 0, then every method's seed 1…, so an interrupted study has whole seeds."""
    return {"seed": list(seeds), "algorithm": [m.algorithm_at(chosen_value(chosen, task, m)) for m in methods]}


def member_labels(methods: Sequence[Method], grid: dict[str, list[Any]]) -> dict[str, tuple[str, int]]:
    """Sweep member directory name → (method label, seed), for ``grid`` (:func:`grid_of` of ``methods``)."""
    return {member_name({"seed": s, "algorithm": alg}, grid): (m.label, s)
            for m, alg in zip(methods, grid["algorithm"], strict=True) for s in grid["seed"]}


def changes_of(quick: bool, overrides: Sequence[str]) -> list[str]:
    """The config changes every member of a study runs with: ``--quick``'s (:data:`QUICK`), then ``--set``'s."""
    return [*(QUICK if quick else []), *overrides]


def run_study(tasks: Sequence[str], methods: Sequence[Method], chosen: Chosen, out: Path, *,
              seeds: Sequence[int] = SEEDS, quick: bool = False, parallel: int = 2, overrides: Sequence[str] = (),
              progress: bool = True) -> dict[str, Path]:
    """Run (or continue) each task's sweep; returns task → sweep directory. Writes ``<out>/timing.json``."""
    if not methods:
        raise PlanError("no methods selected")
    dirs, timing = {}, {}
    for task in tasks:
        grid = grid_of(task, methods, seeds, chosen)
        changes = changes_of(quick, overrides)
        args = [*changes, f"output.dir={out}", f"seed={json.dumps(grid['seed'])}",
                f"algorithm={json.dumps(grid['algorithm'])}"]
        check_members(task, grid, changes, out / task)
        reused = reuse_trials(task, grid, changes, out / task, out / TUNE / task)
        if reused and progress:
            print(f"{task}: {reused} seed-0 member(s) copied from phase 1's trials at the chosen values")
        start = time.perf_counter()
        dirs[task] = sweep(TASKS[task], args, name=task, progress=progress, parallel=parallel)
        timing[task] = round(time.perf_counter() - start, 1)
    path = out / "timing.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**old, **{f"{t}_seconds": s for t, s in timing.items()}}, indent=2))
    return dirs


def member_config(task: str, overrides: Sequence[str], algorithm: Any, seed: int) -> Any:
    """The run config of the member (``algorithm``, ``seed``) of ``task``'s sweep, as the sweep builds it."""
    return configs.load(TASKS[task], [*overrides, f"seed={seed}"], replace={"algorithm": algorithm})


def check_members(task: str, grid: dict[str, list[Any]], overrides: Sequence[str], sweep_dir: Path) -> None:
    """Refuse a complete member directory that holds another run than the member's (another method under
    the same name, a value changed in chosen.yaml since, a smoke run's rounds), by the sweep's own rule
    (:func:`fedgluon.exp.sweep.changes_from`): the report would count it as the member."""
    for seed in grid["seed"]:
        for alg in grid["algorithm"]:
            d = sweep_dir / member_name({"seed": seed, "algorithm": alg}, grid)
            if is_complete(d) and (changes := changes_from(d, member_config(task, overrides, alg, seed))):
                raise PlanError(f"{d} holds another run than {alg['name']} at seed {seed} ({listed(changes)}): "
                                f"use another --out, or remove that directory")


def reuse_trials(task: str, grid: dict[str, list[Any]], overrides: Sequence[str], sweep_dir: Path,
                 tune_dir: Path) -> int:
    """Copy phase 1's trial of a method at its chosen value into the sweep as that method's member, where the
    trial ran the member's exact run spec to completion (seed 0, the same rounds and evaluations): every
    random draw is seeded by (seed, purpose, client, round), so rerunning it would write the same files. The
    copy's config.yaml is the member's own (naming the sweep as its output; a trial's config written by an
    older fedgluon may lack a newer option's default). Returns how many members were copied."""
    if not tune_dir.is_dir():
        return 0
    trials: dict[str, Path] = {}
    for summary in tune_dir.glob("*/*/runs/*/summary.json"):
        if is_complete(summary.parent):
            trials.setdefault(_spec_key(OmegaConf.load(summary.parent / "config.yaml")), summary.parent)
    copied = 0
    for alg in grid["algorithm"]:
        for seed in grid["seed"]:
            member = sweep_dir / member_name({"seed": seed, "algorithm": alg}, grid)
            cfg = member_config(task, overrides, alg, seed)
            trial = trials.get(_spec_key(cfg))
            if trial is None or is_complete(member):
                continue
            with prepare_dir(member, overwrite=True):
                for f in trial.iterdir():
                    if f.is_file() and f.name not in (MARKER, "summary.json", "config.yaml"):
                        shutil.copy2(f, member / f.name)
                saved = OmegaConf.to_container(cfg, resolve=True)  # the member's config, as the sweep writes it
                assert isinstance(saved, dict)
                saved["output"] = {**saved["output"], "dir": str(sweep_dir), "name": member.name}
                saved["output"].pop("overwrite", None)
                OmegaConf.save(OmegaConf.create(saved), member / "config.yaml")
                shutil.copy2(trial / "summary.json", member / "summary.json")  # last: complete once all is there
            copied += 1
    return copied


def _spec_key(cfg: Any) -> str:
    """A run spec as text, without what does not change the run's files (threads, timeouts), with the fault
    options' defaults filled in (a config written before ``faults.phase`` existed has none)."""
    spec = {k: v for k, v in configs.spec_of(cfg).items() if k not in ("threads", "round_timeout", "node_timeout")}
    spec["faults"] = {**FAULT_DEFAULTS, **spec.get("faults", {})}
    return json.dumps(spec, sort_keys=True, default=str)
