"""Sweeps: a grid over config keys and seeds, run member by member (a run directory each), summarised into
``members.csv``, ``table.csv``, ``pareto.png`` and ``curves.png``; the README ("Experiments: configs, runs,
sweeps", "Ray cluster") gives the syntax, the files and how an interrupted sweep continues. Members run one
after another on the configured engine (Flower's Ray engine starts and stops Ray for every simulation, so it is
never nested inside Ray tasks), or, with ``parallel=N``, as Ray tasks on the plain engine (:func:`_run_parallel`).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from fedgluon.config import schema as configs
from fedgluon.config.run_dir import MARKER, prepare_dir
from fedgluon.config.sections import differences, differing_keys, dotted, listed
from fedgluon.exp.cluster import with_absolute_data_paths
from fedgluon.exp.experiment import SUMMARY_METRICS, is_complete, run
from fedgluon.exp.resume import CHECKPOINT
from fedgluon.runtime.ray_session import sigterm_restored


def parse_grid(args: Sequence[str]) -> tuple[list[str], dict[str, list[Any]]]:
    """Split CLI arguments into plain overrides (``k=v``) and grid axes (``k=[a,b,c]``)."""
    overrides, grid = [], {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep:
            raise configs.ConfigError(f"sweep arguments must look like key=value or key=[a,b], got {arg!r}")
        if value.startswith("[") and value.endswith("]"):
            parsed = OmegaConf.create({"v": OmegaConf.from_dotlist([f"v={value}"]).v})["v"]
            # [a,b] parses to a list
            values = list(OmegaConf.to_container(parsed)) if parsed is not None else []  # type: ignore[arg-type]
            if not values:
                raise configs.ConfigError(f"sweep axis {key!r} has no values")
            grid[key] = values
        else:
            overrides.append(arg)
    return overrides, grid


def members(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def _same_name(key: str, v: Any, grid: Mapping[str, list[Any]] | None) -> list[dict[str, Any]]:
    """The values of axis ``key`` that are mappings of ``v``'s ``name`` (``v`` itself included)."""
    return [o for o in (grid or {}).get(key, []) if isinstance(o, dict) and o.get("name") == v.get("name")]


def _hashed(v: dict[str, Any]) -> str:
    return f"{v.get('name')}-{hashlib.sha1(json.dumps(v, sort_keys=True).encode()).hexdigest()[:6]}"


def value_label(key: str, v: Any, grid: Mapping[str, list[Any]] | None = None) -> str:
    """A grid value as tables and legends show it: a mapping (a whole section) by its ``name``, and where
    another value of the axis has that name, with the options that tell them apart, e.g.
    ``gluon-ef21 (compressor.name=svd, compressor.rank=1)`` (its name and a short hash of its content where
    more than three options differ)."""
    if not isinstance(v, dict):
        return str(v)
    same = _same_name(key, v, grid)
    if len(same) < 2:
        return str(v.get("name", v))
    keys = differing_keys([dotted(o) for o in same])
    if len(keys) > 3:
        return _hashed(v)
    mine = dotted(v)
    shown = ", ".join(f"{k}={mine[k]}" for k in keys if k in mine)
    return f"{v.get('name')} ({shown})" if shown else str(v.get("name"))


def member_name(values: dict[str, Any], grid: dict[str, list[Any]] | None = None) -> str:
    """``key=value,...`` with the last part of each dotted key: the member's directory name. A whole section
    shows its ``name``, plus a short hash of its content where another value of the axis has that name."""
    def part(k: str, v: Any) -> str:
        return _hashed(v) if isinstance(v, dict) and len(_same_name(k, v, grid)) > 1 else value_label(k, v, grid)

    return ",".join(f"{k.split('.')[-1]}={part(k, v)}" for k, v in values.items()).replace("/", "_") or "base"


def sweep(config_path: str | Path | None, args: Sequence[str], *, name: str | None = None, progress: bool = True,
          parallel: int = 0, target: float | None = None) -> Path:
    """Run every grid member (skipping complete ones) and write the sweep summary; returns the sweep dir.
    ``target``: the test accuracy ``bits_to_target`` counts up to, kept in ``sweep.json`` for later summaries
    (:func:`summarise`); None keeps the one given before, if any."""
    if target is not None and not (isinstance(target, (int, float)) and 0 < target <= 1):
        raise configs.ConfigError(f"--target is a test accuracy in (0, 1], got {target!r}")
    overrides, grid = parse_grid(args)
    base = configs.load(config_path, overrides)
    if base.engine.address and (parallel or base.engine.name == "ray"):
        from fedgluon.exp.cluster import reachable

        reachable(base.engine.address)  # before the sweep directory: a wrong address is one line, not minutes
    if parallel and progress and base.engine.num_gpus:  # asked for, and not given: say so
        print(f"note: --parallel runs every member on the plain engine ({parallel} Ray tasks at a time, "
              f"engine.client_device for the gradients): engine.num_gpus={base.engine.num_gpus:g} is not used")
    sweep_dir = Path(base.output.dir) / (name or f"sweep-{configs.run_name(base)}")
    about = {"config": str(config_path) if config_path else None,  # what the results depend on
             "overrides": [o for o in overrides if not o.startswith(("engine.", "output."))]}
    _same_base(sweep_dir, about)
    todo = []  # every member's config is validated before the sweep directory is made
    for values in members(grid):
        mname = member_name(values, grid)
        sections = {k: v for k, v in values.items() if k in configs.SECTIONS}
        dotted = [f"{k}={_fmt(v)}" for k, v in values.items() if k not in configs.SECTIONS]
        cfg = configs.load(config_path, [*overrides, *dotted], replace=sections)
        cfg.output.name = mname
        cfg.output.dir = str(sweep_dir)
        if is_complete(sweep_dir / mname):
            if changes := changes_from(sweep_dir / mname, cfg):  # a re-run never reports old results as new
                raise configs.ConfigError(f"sweep member {sweep_dir / mname} is complete but ran another config "
                                          f"({listed(changes)}); give this sweep another --name")
            continue
        # an incomplete member directory is a leftover of an interrupted sweep: continued from its checkpoint
        # where that run may resume (the sequential path), else started again
        resumes = not parallel and _resumable(sweep_dir / mname, cfg)
        cfg.output.overwrite = not resumes
        todo.append((mname, cfg))
    created = not sweep_dir.exists()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if target is None and (sweep_dir / "sweep.json").is_file():  # the target a rerun without --target keeps
        target = json.loads((sweep_dir / "sweep.json").read_text()).get("target")
    record = {**about, "grid": grid, **({"target": target} if target is not None else {})}
    (sweep_dir / "sweep.json").write_text(json.dumps(record, indent=2))
    try:
        if parallel and todo:
            _run_parallel(todo, parallel, base.engine.address, sweep_dir, progress)
        else:
            for i, (mname, cfg) in enumerate(todo):
                if progress:
                    print(f"[{i + 1}/{len(todo)}] {mname}" + ("" if cfg.output.overwrite else " (resumed)"))
                _run_member_here(cfg, sweep_dir / mname, progress)
    except configs.ConfigError:  # refused before any member ran (a share the cluster lacks, say): the
        with contextlib.suppress(OSError):  # the refusal is what the user needs, whatever the cleanup meets
            if created and [p.name for p in sweep_dir.iterdir()] == ["sweep.json"]:  # a corrected rerun starts clean
                (sweep_dir / "sweep.json").unlink()
                sweep_dir.rmdir()  # only what this call made
        raise
    summarise(sweep_dir, echo=print if progress else None)
    return sweep_dir


def _same_base(sweep_dir: Path, about: Mapping[str, Any]) -> None:
    """A ConfigError unless ``sweep_dir`` is new or holds a sweep of the same config file and overrides (the
    ``engine.*`` and ``output.*`` ones aside; its grid may grow: complete members are kept): another sweep's
    summary is never replaced."""
    meta = sweep_dir / "sweep.json"
    if not meta.is_file():
        return
    try:
        old = json.loads(meta.read_text())
        old = {k: old[k] for k in about}
    except (ValueError, KeyError, TypeError):
        raise configs.ConfigError(f"{meta} is not a sweep's record; give the sweep another --name") from None
    if old != dict(about):
        raise configs.ConfigError(f"{sweep_dir} holds another sweep (config {old['config']}, overrides "
                                  f"{old['overrides']}); give this one another --name")


def changes_from(member_dir: Path, cfg: DictConfig) -> list[str]:
    """What the complete run in ``member_dir`` ran with that ``cfg`` would not, as ``"key: saved -> wanted"``
    (its ``config.yaml``, the engine and output sections aside: engines give the same results); empty when
    ``cfg`` would run it again. A ConfigError when that record cannot be read."""
    def comparable(c: Any) -> dict[str, Any]:
        out = OmegaConf.to_container(with_absolute_data_paths(OmegaConf.create(c)), resolve=True)
        assert isinstance(out, dict)
        return {k: v for k, v in dotted(out).items() if not k.startswith(("output.", "engine."))}

    try:
        saved = comparable(OmegaConf.load(member_dir / "config.yaml"))
    except Exception as err:  # noqa: BLE001 - any unreadable record is the same refusal
        raise configs.ConfigError(f"{member_dir}/config.yaml cannot be read ({type(err).__name__}); give the "
                                  f"sweep another --name") from None
    return differences(saved, comparable(cfg))


def _fmt(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (dict, list)) else str(v)


@sigterm_restored()  # Ray's own handler ends with Ray
def _run_parallel(todo, workers: int, address: str | None, sweep_dir: Path, progress: bool = False) -> None:
    """The members as Ray tasks on the plain engine, at most ``workers`` at a time, on a private local Ray
    (``workers`` × the largest ``threads`` CPUs) or the cluster at ``address``. Each task runs its member in
    a scratch directory of its node and returns the files (:func:`run_member`); this process writes every
    member's directory (:func:`write_member`), so nothing depends on a shared filesystem or on the nodes'
    working directories. Members that fail are written as far as they got and reported together at the end."""
    import ray

    from fedgluon.exp.cluster import connect

    todo = [(mname, with_absolute_data_paths(cfg)) for mname, cfg in todo]  # members run in scratch directories
    threads = max(int(cfg.threads) for _, cfg in todo)  # a member's task holds one CPU per torch thread

    connect(address, num_cpus=workers * threads, task_share={"threads": threads},  # a node must hold one member
            log_to_driver=False)  # members' logs: error, summary, clients.csv

    @ray.remote(num_cpus=1)
    def one(cfg_yaml: str) -> dict[str, Any]:
        from fedgluon.runtime import prepare_process

        cfg = OmegaConf.create(cfg_yaml)
        prepare_process(threads=int(cfg.threads))  # a Ray worker that runs sweep members (fedgluon/runtime/process.py)
        cfg.engine.name = "plain"
        return run_member(cfg)

    failures = []
    try:
        queue, running = list(todo), {}
        while queue or running:
            while queue and len(running) < workers:
                mname, cfg = queue.pop(0)
                running[one.options(num_cpus=int(cfg.threads)).remote(OmegaConf.to_yaml(cfg))] = mname
            (ref,), _ = ray.wait(list(running), num_returns=1)
            mname = running.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as err:  # the task's worker or node died
                result = {"files": {}, "error": f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[-1]}"}
            try:
                error = write_member(sweep_dir / mname, result["files"], result.get("scratch"), result["error"])
            except (ValueError, OSError) as err:  # a refused file name, a full disk
                error = str(err)
            if error:
                failures.append(f"{mname}: {error}")
            if progress:
                print(f"[{len(todo) - len(queue) - len(running)}/{len(todo)}] {mname}" + (" failed" if error else ""))
    finally:
        ray.shutdown()
    if failures:
        summarise(sweep_dir)
        raise configs.ConfigError(f"{len(failures)} sweep member(s) failed (their directories hold what they "
                                  f"wrote; rerun the sweep to retry them): {'; '.join(failures)}")


def _run_member_here(cfg: DictConfig, member_dir: Path, progress: bool) -> None:
    """Run a member in this process: resumed from its checkpoint when :func:`_resumable` said so, and started
    again if the resume is refused all the same (a checkpoint whose rows do not fit the task)."""
    if not cfg.output.overwrite:
        try:
            run(cfg, progress=progress, resume=True, out_dir=member_dir)
            return
        except configs.ConfigError as err:
            print(f"note: {member_dir.name} cannot resume ({err}); starting it again")
            cfg.output.overwrite = True
    run(cfg, progress=progress, out_dir=member_dir)


def _resumable(member_dir: Path, cfg: DictConfig) -> bool:
    """Whether ``member_dir`` holds a checkpoint of a run of this very config (engine and output aside), as a
    complete member must have; the run's own checks of the checkpoint (fedgluon.exp.resume.to_resume) come
    when it resumes, and a refusal there starts it again (:func:`_run_member_here`)."""
    if not (member_dir / CHECKPOINT).is_file():
        return False
    try:
        return not changes_from(member_dir, cfg)
    except configs.ConfigError:
        return False


def run_member(cfg: Any) -> dict[str, Any]:
    """Run one member in a scratch directory of this node and return its run directory as
    ``{"files": {name: bytes}, "error": None | "one line", "scratch": its path}`` (the scratch directory
    is removed)."""
    import shutil
    import tempfile

    scratch = Path(tempfile.mkdtemp(prefix="fedgluon-member-"))
    out, error = scratch / str(cfg.output.name), None
    try:
        try:
            run(cfg, progress=False, out_dir=out)  # cfg keeps the driver's output.dir: its config.yaml is as sequential
        except Exception as err:  # noqa: BLE001 - reported by the driver, with the other members' failures
            text = str(err).strip()
            error = f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"
        files = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
                 if p.is_file() and p.name != MARKER} if out.is_dir() else {}
    finally:  # also when the task is cancelled
        shutil.rmtree(scratch, ignore_errors=True)
    return {"files": files, "error": error, "scratch": str(out)}


def write_member(out: Path, files: dict[str, bytes], scratch: str | None = None,
                 error: str | None = None) -> str | None:
    """Write a member's run directory from :func:`run_member`'s files: created (or an old one replaced) as
    any run directory (fedgluon.config.run_dir.prepare_dir), ``summary.json`` last, so the member is complete
    only once everything else is on disk. Names that would leave the directory are refused. The node's
    ``scratch`` path becomes ``out`` in the summary (a stopped run's reason and resume command) and in
    ``error``, which is returned."""
    if scratch and "summary.json" in files:
        files = {**files, "summary.json": files["summary.json"].replace(json.dumps(scratch)[1:-1].encode(),
                                                                        json.dumps(str(out))[1:-1].encode())}
    bad = [n for n in files if not _member_file(n)]
    if bad:
        raise ValueError(f"a sweep member returned files named {bad}")
    with prepare_dir(out, overwrite=True):
        for name in sorted(files, key=lambda n: n == "summary.json"):
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(files[name])
    return error.replace(scratch, str(out)) if error and scratch else error


def _member_file(name: str) -> bool:
    """Whether a member may return a file of this name: a relative path inside its directory, not the marker."""
    parts = PurePosixPath(name).parts
    return bool(parts) and not PurePosixPath(name).is_absolute() and ".." not in parts and parts[0] != MARKER \
        and name == str(PurePosixPath(*parts))


def load_members(sweep_dir: str | Path) -> pd.DataFrame:
    """One row per complete member: its grid values, summary and the full config's key fields."""
    sweep_dir = Path(sweep_dir)
    meta = json.loads((sweep_dir / "sweep.json").read_text())
    rows = []
    for values in members(meta["grid"]):
        d = sweep_dir / member_name(values, meta["grid"])
        if not is_complete(d):
            continue
        summary = json.loads((d / "summary.json").read_text())
        config = ",".join(value_label(k, v, meta["grid"]) for k, v in values.items() if k != "seed") or "base"
        scalars = {k: v for k, v in summary.items() if not isinstance(v, (list, dict))}
        where = ";".join(str(n.get("hostname") or n.get("node_id")) for n in summary.get("nodes", []))
        rows.append({"member": d.name, **{k: _fmt(v) for k, v in values.items()}, **scalars, "nodes": where,
                     "config": config})
    return pd.DataFrame(rows)


TABLE_METRICS = (*SUMMARY_METRICS[:-1], "bits_to_target", "sim_time")  # the sweep's own column before sim_time
"""The fields a sweep table aggregates over seeds (those the runs measured), in table.csv's column order."""


def summarise(sweep_dir: str | Path, target: float | None = None, target_fraction: float = 0.95,
              echo: Callable[[str], None] | None = None) -> pd.DataFrame:
    """``members.csv``, ``table.csv``, ``pareto.png`` and ``curves.png`` (README "Experiments: configs, runs,
    sweeps"); ``echo`` receives the notes on members not started or incomplete, or why ``curves.png`` could not
    be drawn. The target is ``target``, else the one ``sweep.json`` keeps, else ``target_fraction`` × the best
    member's final accuracy; ``bits_to_target`` is the cumulative uplink bits per client at the first evaluation
    reaching it (NaN if never reached)."""
    from fedgluon.exp.plots import PlotError, compare, plot_pareto

    sweep_dir = Path(sweep_dir)
    try:
        _, notes = compare([sweep_dir], sweep_dir / "curves.png")
    except PlotError as err:  # members of different tasks, no evaluations yet
        notes = [f"curves.png not drawn: {err}"]
    for note in notes if echo is not None else ():
        echo(f"note: {note}")
    frame = load_members(sweep_dir)
    frame.to_csv(sweep_dir / "members.csv", index=False)
    if frame.empty:
        return frame
    if target is None:
        target = json.loads((sweep_dir / "sweep.json").read_text()).get("target")
    if target is None and frame["final_test_accuracy"].notna().any():
        target = target_fraction * float(frame["final_test_accuracy"].max())
    frame["bits_to_target"] = [_bits_to_target(sweep_dir / m, target) for m in frame["member"]]
    metrics = [m for m in TABLE_METRICS if m in frame and frame[m].notna().any()]
    table = frame.groupby("config")[metrics].agg(["mean", "std", "count"])
    table.columns = [f"{a}_{b}" for a, b in table.columns]
    table = table.reset_index()
    table["target_accuracy"] = target
    table.to_csv(sweep_dir / "table.csv", index=False)
    convention = str(frame["bit_convention"].iloc[0]) if "bit_convention" in frame else "int32"
    plot_pareto(table, sweep_dir / "pareto.png", title=f"{sweep_dir.name}: final accuracy vs uplink bits per client",
                xlabel=f"uplink bits per client, whole run ({convention} convention; mean over seeds)")
    return table


def _bits_to_target(run_dir: Path, target: float | None) -> float:
    if target is None:
        return float("nan")
    m = pd.read_csv(run_dir / "metrics.csv")
    if "test_accuracy" not in m:
        return float("nan")
    hit = m[m["test_accuracy"] >= target]
    return float(hit["up_bits_per_client_cum"].iloc[0]) if len(hit) else float("nan")


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """A run directory as ``{"metrics", "clients", "partition"}`` DataFrames plus ``summary`` and ``config``."""
    d = Path(run_dir)
    out: dict[str, Any] = {"summary": json.loads((d / "summary.json").read_text()) if (d / "summary.json").exists()
                           else {"complete": False},
                           "config": OmegaConf.to_container(OmegaConf.load(d / "config.yaml"))}
    for name in ("metrics", "clients", "partition"):
        path = d / f"{name}.csv"
        out[name] = pd.read_csv(path) if path.exists() and path.stat().st_size > 1 else pd.DataFrame()
    return out


__all__ = ["load_members", "load_run", "parse_grid", "summarise", "sweep"]  # fedgluon tune: fedgluon/exp/tuning.py

