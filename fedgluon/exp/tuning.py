"""``fedgluon tune``: hyper-parameter search on Ray Tune, one :class:`ray.tune.Tuner` per algorithm.

The README ("Tuning (Ray Tune)") describes the options, ASHA, the tune directory and ``--resume``. Each trial
reports after every round the summary fields a run would write if it stopped there (:data:`METRICS`, ``round``,
``client_rounds``), the last round once its run directory is complete; a run that stops itself (a NaN/Inf) ends
its trial incomplete, with the reason in ``stopped``, and any other exception fails the trial.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from fedgluon.config import schema as configs
from fedgluon.exp.sweep import _fmt, member_name, members, parse_grid
from fedgluon.exp.tune_results import (  # noqa: F401
    METRICS,
    RunningSummary,
    TrialProgress,
    best_configs,
    trial_id_of,
    write_best,
)
from fedgluon.runtime.ray_session import sigterm_restored

SEARCHES = ("grid", "random")
SCHEDULERS = ("asha", "fifo")
REQUEST = "tune.json"
OPTIONS: dict[str, tuple[Any, str, Callable[[Any, int], bool]]] = {
    # option: (default, what ``--option`` must be, its check given the config's rounds); in tune.json's order
    "metric": ("final_test_loss", f"one of {list(METRICS)}", lambda v, _: v in METRICS),
    "mode": ("min", "one of ['min', 'max']", lambda v, _: v in ("min", "max")),
    "search": ("grid", f"one of {list(SEARCHES)}", lambda v, _: v in SEARCHES),
    "samples": (None, "a positive integer", lambda v, _: v is None or (isinstance(v, int) and v >= 1)),
    "scheduler": ("asha", f"one of {list(SCHEDULERS)}", lambda v, _: v in SCHEDULERS),
    "grace_period": (None, "in [1, rounds={rounds}]", lambda v, rounds: v is None or 1 <= v <= rounds),
    "reduction_factor": (3.0, "> 1", lambda v, _: v > 1),
    "cpus_per_trial": (1.0, "> 0", lambda v, _: v > 0),
    "gpus_per_trial": (0.0, ">= 0", lambda v, _: v >= 0),
    "parallel": (0, ">= 0", lambda v, _: v >= 0),
    "storage_path": (None, "", lambda v, _: True),
}


class TuneIncomplete(RuntimeError):
    """Some trials of a tune did not finish (interrupted, or failed); :func:`resume` continues it."""

    def __init__(self, message: str, tune_dir: Path):
        super().__init__(message)
        self.tune_dir = tune_dir


@sigterm_restored()  # Ray's own handler ends with Ray
def tune(config_path: str | Path | None, args: Sequence[str], algorithms: Sequence[str | dict[str, Any]] = (), *,
         name: str = "tune", progress: bool = True, verbose: bool = False, **options: Any) -> Path:
    """Tune every algorithm (a name keeping the config's other algorithm options, or a whole ``algorithm``
    mapping; none: the config's own) over the grid in ``args`` and write the tune directory (README,
    "Tuning (Ray Tune)"); returns its path. ``options`` are those of :data:`OPTIONS` (``parallel`` caps the trials
    running at once; 0: as many as the resources allow). Invalid options are a one-line :class:`ConfigError`,
    raised before Ray starts or any directory is made; :class:`TuneIncomplete` when trials did not finish."""
    if unknown := sorted(set(options) - set(OPTIONS)):
        raise TypeError(f"tune() got unexpected keyword arguments {unknown}")
    options = {k: options.get(k, default) for k, (default, _, _) in OPTIONS.items()}
    if options["storage_path"] and "://" not in str(options["storage_path"]):  # a local path: made absolute
        options["storage_path"] = str(Path(str(options["storage_path"])).resolve())
    overrides, grid = parse_grid(args)
    base = configs.load(config_path, overrides)
    labels = algorithm_labels(algorithms, base)
    request = {"config": str(Path(config_path).resolve()) if config_path else None, "overrides": list(overrides),
               "grid": grid, "algorithms": [a for a in algorithms] or [None], "labels": labels, **options}
    check_request(request, base)
    tune_dir = (Path(base.output.dir) / name).resolve()
    if tune_dir.exists():
        raise configs.ConfigError(f"{tune_dir} exists; continue it with: fedgluon tune --resume {tune_dir}, "
                                  f"or choose another --name")
    with _ray(base.engine.address, request, verbose):
        tune_dir.mkdir(parents=True)
        (tune_dir / REQUEST).write_text(json.dumps(request, indent=2))
        _tune_all(tune_dir, request, progress, verbose, resume=False)
    return tune_dir


@sigterm_restored()
def resume(tune_dir: str | Path, *, progress: bool = True, verbose: bool = False) -> Path:
    """Continue the tune in ``tune_dir`` (README, "Tuning (Ray Tune)": ``--resume``); returns its path."""
    tune_dir = Path(tune_dir).resolve()
    if not (tune_dir / REQUEST).is_file():
        raise configs.ConfigError(f"{tune_dir} is not a tune directory (no {REQUEST})")
    request = json.loads((tune_dir / REQUEST).read_text())
    base = configs.load(request["config"], request["overrides"])
    check_request(request, base)
    with _ray(base.engine.address, request, verbose):
        _tune_all(tune_dir, request, progress, verbose, resume=True)
    return tune_dir


def algorithm_labels(algorithms: Sequence[str | dict[str, Any]], base: Any) -> list[str]:
    """A label per algorithm: its name, or ``<name>-1``, ``<name>-2``… for a name listed several times."""
    names = [str(a.get("name")) if isinstance(a, dict) else str(a) for a in algorithms] or [str(base.algorithm.name)]
    return [n if names.count(n) == 1 else f"{n}-{names[:i].count(n) + 1}" for i, n in enumerate(names)]


def check_request(request: Mapping[str, Any], base: Any) -> None:
    """One-line :class:`ConfigError` for an option out of range, and for an algorithm or grid point whose
    config is invalid (each is loaded once, as a trial would) or that has no validation split to give a
    ``--metric`` of one (``final_val_loss``: every trial would report NaN)."""
    rounds = int(base.rounds)
    for key, (_, words, ok) in OPTIONS.items():
        if not ok(request[key], rounds):
            value = request[key]
            got = repr(value) if isinstance(value, str) else str(value)  # a NumPy float prints as 0.5
            raise configs.ConfigError(f"--{key.replace('_', '-')} must be {words.format(rounds=rounds)}, got {got}")
    if request["search"] == "grid" and request["samples"] not in (None, 1):
        raise configs.ConfigError("--samples is for --search random (grid search runs every grid point once)")
    grid = request["grid"]
    first = {k: v[0] for k, v in grid.items()}
    for alg in request["algorithms"]:  # every value of every axis, the other axes at their first value
        for key, values in grid.items() or [(None, [None])]:
            for value in values:
                cfg = trial_config(request, alg, {**first, **({key: value} if key else {})}, Path("."))
                if "_val_" in request["metric"] and not cfg.task.get("validation_fraction"):
                    raise configs.ConfigError(f"--metric {request['metric']} needs a validation split: set "
                                              "task.validation_fraction (0 < f < 1)")


def trial_config(request: Mapping[str, Any], algorithm: str | dict[str, Any] | None, values: Mapping[str, Any],
                 runs_dir: Path, trial_id: str = "") -> Any:
    """The config a trial runs: the request's config and overrides, the algorithm, then the trial's grid
    ``values``; on the plain engine, written to ``runs_dir/<member name>`` (``-<trial id>`` appended in a
    random search, which may draw a point twice)."""
    extra = [] if algorithm is None else (
        [f"algorithm.name={algorithm}"] if not isinstance(algorithm, dict) else [])
    replace = {"algorithm": algorithm} if isinstance(algorithm, dict) else {}
    replace.update({k: v for k, v in values.items() if k in configs.SECTIONS})
    dotted = [f"{k}={_fmt(v)}" for k, v in values.items() if k not in configs.SECTIONS]
    cfg = configs.load(request["config"], [*request["overrides"], *extra, *dotted], replace=replace)
    cfg.engine.name = "plain"
    cfg.output.dir = str(runs_dir)
    cfg.output.name = member_name(dict(values), request["grid"])
    if request["search"] == "random":
        cfg.output.name += f"-{trial_id}"
    return cfg


class _TuneNotices(logging.Filter):
    """Drops two Ray Tune warnings that contradict or repeat fedgluon's own lines: the ``Tuner.restore(...)``
    instruction after an interrupt (fedgluon prints ``fedgluon tune --resume DIR``, which restores every
    method's tune), and "Could not fetch metrics" for trials that had not started when it stopped."""

    LOGGERS = ("ray.tune.tune", "ray.tune.analysis.experiment_analysis")

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return "Resume experiment with" not in text and "Could not fetch metrics" not in text


@contextlib.contextmanager
def _ray(address: str | None, request: Mapping[str, Any], verbose: bool) -> Iterator[None]:
    """Ray started (a private local instance; never a cluster that happens to be running here) or joined
    (``address``: ``engine.address``) for the tune, and shut down after it if this call started it; Ray Tune's
    own progress output off unless ``verbose``. A one-line ConfigError when the cluster cannot hold
    one trial's resources."""
    import ray

    from fedgluon.exp.cluster import connect

    started = not ray.is_initialized()
    if started:  # as `fedgluon run` and `sweep` do: a private local Ray unless an address is given
        connect(address, log_to_driver=verbose)
    saved = os.environ.get("RAY_AIR_NEW_OUTPUT")
    quiet = _TuneNotices()
    if not verbose:
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # the legacy reporter, which verbose=0 silences
        for name in _TuneNotices.LOGGERS:
            logging.getLogger(name).addFilter(quiet)
    try:
        have = ray.cluster_resources()
        for key, flag in (("CPU", "cpus_per_trial"), ("GPU", "gpus_per_trial")):
            want = float(request[flag])
            if want > float(have.get(key, 0)):
                raise configs.ConfigError(f"--{flag.replace('_', '-')} {want:g} cannot be met: the Ray cluster "
                                          f"has {float(have.get(key, 0)):g} {key}s")
        yield
    finally:
        for name in _TuneNotices.LOGGERS:
            logging.getLogger(name).removeFilter(quiet)
        if saved is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = saved
        if started:
            ray.shutdown()


def _tune_all(tune_dir: Path, request: Mapping[str, Any], progress: bool, verbose: bool,
              resume: bool) -> pd.DataFrame:
    """Every algorithm's Tuner in turn (the finished ones of a resumed tune are kept), then the tables."""
    frames = []
    failures = []
    for label, alg in zip(request["labels"], request["algorithms"]):
        done = tune_dir / label / "trials.csv"
        if resume and done.exists():
            frames.append(pd.read_csv(done))
            continue
        frame, failed, interrupted = _tune_one(tune_dir, request, label, alg, progress, verbose, resume)
        frames.append(frame)
        if failed:
            failures.append(f"{label}: {failed}")
            if interrupted:  # Ctrl-C: the next algorithms wait for --resume too
                break
            continue
        frame.to_csv(done, index=False)
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    table.to_csv(tune_dir / "tuned.csv", index=False)
    if failures:
        raise TuneIncomplete("; ".join(failures), tune_dir)
    return write_best(tune_dir, request, table)


def _tune_one(tune_dir: Path, request: Mapping[str, Any], label: str, alg: str | dict[str, Any] | None,
              progress: bool, verbose: bool, resume: bool) -> tuple[pd.DataFrame, str | None, bool]:
    """Run (or restore and continue) one algorithm's Tuner; returns its trial rows, what did not finish,
    and whether the Tuner was interrupted (trials left unfinished, by Ctrl-C)."""
    from ray import tune

    runs_dir = tune_dir / label / "runs"
    trainable = tune.with_resources(
        tune.with_parameters(_trial, request=dict(request), algorithm=alg, runs_dir=str(runs_dir)),
        {"cpu": float(request["cpus_per_trial"]), "gpu": float(request["gpus_per_trial"])})
    storage = request["storage_path"] or str(tune_dir)
    experiment = f"{storage.rstrip('/')}/{label}"
    total = _trial_count(request)
    reporter = TrialProgress(label, total, request["metric"], progress)
    if resume and tune.Tuner.can_restore(experiment):
        tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True,
                                   param_space=_param_space(request))
        reporter.done = sum(1 for t in tune.ExperimentAnalysis(experiment).trials if t.status == "TERMINATED")
        tuner._local_tuner.get_run_config().callbacks = [reporter]  # Tuner.restore takes no RunConfig
    else:
        run_config = tune.RunConfig(name=label, storage_path=storage, verbose=2 if verbose else 0,
                                    callbacks=[reporter], checkpoint_config=tune.CheckpointConfig(num_to_keep=1))
        tuner = tune.Tuner(trainable, param_space=_param_space(request), tune_config=_tune_config(request),
                           run_config=run_config)
    results = tuner.fit()
    rows, failed, unfinished = [], [], 0
    for result in results:
        rows.append(_row(request, label, alg, result, tune_dir))
        if result.error is not None:
            failed.append(f"trial {rows[-1]['trial_id']} ({rows[-1]['config']}) failed: {_first_line(result.error)}")
        elif not (result.metrics or {}).get("done"):
            rows[-1]["status"] = "UNFINISHED"
            unfinished += 1
    if unfinished or len(rows) < total:
        failed.append(f"{unfinished + total - len(rows)} of {total} trials unfinished")
    frame = pd.DataFrame(rows).sort_values("trial_id", kind="stable").reset_index(drop=True) if rows else \
        pd.DataFrame()
    return frame, "; ".join(failed) or None, unfinished + total - len(rows) > 0


def _trial_count(request: Mapping[str, Any]) -> int:
    if request["search"] == "random":
        return int(request["samples"] or 10)
    return len(members(dict(request["grid"])))


def _param_space(request: Mapping[str, Any]) -> dict[str, Any]:
    from ray import tune

    pick = tune.grid_search if request["search"] == "grid" else tune.choice
    return {"values": {k: pick(list(v)) for k, v in request["grid"].items()}}


def _tune_config(request: Mapping[str, Any]) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    base = configs.load(request["config"], request["overrides"])
    rounds = int(base.rounds)
    if request["scheduler"] == "asha":
        grace = request["grace_period"] or min(rounds, max(1, int(base.eval_every)))
        scheduler = ASHAScheduler(time_attr="round", max_t=rounds, grace_period=grace,
                                  reduction_factor=float(request["reduction_factor"]))
    else:
        scheduler = FIFOScheduler()
    return tune.TuneConfig(metric=request["metric"], mode=request["mode"], scheduler=scheduler,
                           num_samples=_trial_count(request) if request["search"] == "random" else 1,
                           search_alg=BasicVariantGenerator(random_state=int(base.seed),
                                                            max_concurrent=int(request["parallel"])),
                           reuse_actors=False)


def _trial(params: dict[str, Any], *, request: dict[str, Any], algorithm: Any, runs_dir: str) -> None:
    """One trial: run its config on the plain engine, reporting :data:`METRICS` after every round (the
    last once the run directory is complete)."""
    import torch
    from ray import tune

    from fedgluon.exp.experiment import run
    from fedgluon.sim.checkpoint import RunStopped

    values = dict(params.get("values", {}))
    cfg = trial_config(request, algorithm, values, Path(runs_dir), tune.get_context().get_trial_id())
    cfg.output.overwrite = True  # a leftover of an interrupted trial: its directory holds fedgluon's marker
    torch.set_num_threads(int(cfg.threads))
    so_far = RunningSummary(cfg)

    def report_row(row: dict[str, Any]) -> None:
        metrics = so_far.add(row)
        if so_far.rounds < int(cfg.rounds):
            tune.report(metrics)

    try:
        out = run(cfg, progress=False, on_round=report_row)
    except RunStopped as err:  # a radius that diverges (NaN/Inf), clients that never reply: ends incomplete
        path = Path(runs_dir) / str(cfg.output.name) / "summary.json"
        summary = json.loads(path.read_text()) if path.exists() else {}
        tune.report({**so_far.report(summary), "stopped": str(err).splitlines()[0][:300]})
        return
    tune.report(so_far.report(json.loads((out / "summary.json").read_text())))


def _row(request: Mapping[str, Any], label: str, alg: Any, result: Any, tune_dir: Path) -> dict[str, Any]:
    """A trial's row of ``tuned.csv``."""
    values = dict((result.config or {}).get("values", {}))
    grid = request["grid"]
    metrics = result.metrics or {}
    trial_id = metrics.get("trial_id") or trial_id_of(result.path)
    cfg = trial_config(request, alg, values, tune_dir / label / "runs", trial_id)
    run_dir = Path(cfg.output.dir) / cfg.output.name
    config = member_name({k: v for k, v in values.items() if k != "seed"}, grid)
    rounds = int(metrics.get("round", 0) or 0)
    return {"algorithm": label, "trial_id": trial_id,
            "config": config, **{k: _fmt(v) for k, v in values.items()}, "seed": int(cfg.seed),
            "rounds": rounds, "complete": rounds == int(cfg.rounds) and result.error is None,
            "client_rounds": int(metrics.get("client_rounds", 0) or 0),
            **{m: metrics.get(m, math.nan) for m in METRICS},
            "status": "ERROR" if result.error is not None else "TERMINATED", "stopped": metrics.get("stopped", ""),
            "best": False,
            "run_dir": str(run_dir.relative_to(tune_dir))}


def _first_line(err: BaseException) -> str:
    lines = [ln for ln in str(err).splitlines() if ln.strip()]
    hits = [ln for ln in lines if "Error" in ln and not ln.startswith(" ")]
    return (hits[-1] if hits else lines[-1] if lines else repr(err)).strip()[:300]
