"""Run one experiment config and write ``runs/<name>/``: ``config.yaml``, ``partition.csv``, ``metrics.csv``
(:data:`METRIC_COLUMNS`), ``clients.csv``, ``summary.json`` (``"complete": true`` written last), ``model.pt``,
``plots.png``, the marker ``.fedgluon-run`` (:data:`MARKER`, also the run's lock) and, while the run is unfinished,
``checkpoint.pt`` with its rows journal (fedgluon/sim/checkpoint.py). The README ("Experiments: configs, runs,
sweeps") describes each file and when a directory may be replaced (fedgluon/config/run_dir.py) or resumed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from fedgluon.config import spec as specs
from fedgluon.config.run_dir import MARKER, RunDirLock, is_complete, prepare_dir  # noqa: F401 (MARKER, RunDirLock: re-exported)
from fedgluon.config.schema import ConfigError, run_name, spec_of
from fedgluon.core.memory import client_state_bytes
from fedgluon.core.text import shown
from fedgluon.exp import cluster
from fedgluon.exp.resume import CHECKPOINT, ENVIRONMENT, check_table, resumable, run_key, to_resume  # noqa: F401 (re-exported)
from fedgluon.runtime.ray_session import sigterm_restored
from fedgluon.runtime.threads import torch_threads
from fedgluon.sim.checkpoint import Checkpointer, RunInterrupted, RunStopped
from fedgluon.sim.checkpoint import load as load_checkpoint
from fedgluon.sim.checkpoint import remove as remove_checkpoint
from fedgluon.sim.faults import FaultPlan
from fedgluon.tasks.registry import EVAL_SPLITS

log = logging.getLogger(__name__)

METRIC_COLUMNS = {
    "round": "round index k (0-based)",
    "participants / accepted / rejected / failed": "sampled clients and what became of their replies",
    "receivers": "clients that received the broadcast (all n with a compressed downlink)",
    "train_loss": "mean minibatch loss reported by accepted clients",
    "grad_evals / samples": "gradient evaluations and samples processed by accepted clients",
    "refresh": "1 on SARAH/PAGE/MARINA large-batch refresh rounds",
    "up_<conv>_{total,mean,max}": "uplink bits under each convention (values, log2d, int32, coo64, bitmask)",
    "down_<conv>_total": "downlink bits to all receivers",
    "test_loss / test_accuracy [/ test_perplexity]": "central evaluation on held-out data (every eval_every rounds)",
    "val_loss / val_accuracy [/ val_perplexity]": "the same on the validation split the clients held back "
                                                  "(task.validation_fraction > 0)",
    "grad_dual_norm": "Σ_i ‖∇_i f(X)‖_(i)* of the full-batch gradient (every grad_norm_every rounds)",
    "up_bits_cum / up_bits_per_client_cum / down_bits_cum": "cumulative bits under network.bits; per client: the "
                                                             "sum of each round's mean over its accepted clients "
                                                             "(a client that took part in every round)",
    "sim_round_time / sim_time": "simulated seconds: 2·latency + max uplink / up bw + per-client downlink / down bw",
    "wall_time": "seconds the round took here",
    "server_time": "seconds of it in the server step (validation, aggregation, LMO step)",
}


def _grad_dual_norm(task, geometry, params: Mapping[str, torch.Tensor], weights: Mapping[int, float]) -> float:
    """``Σ_i ‖∇_i f(X)‖_(i)*`` of the weighted full-batch gradient; NaN where the gradient holds a NaN/Inf
    or its dual norm cannot be computed (an SVD that fails), which stops the run (fedgluon/sim/federation.py)."""
    total: dict[str, torch.Tensor] = {}
    for j, obj in enumerate(task.objectives):
        _, g = obj.gradient(params, obj.full_batch())
        for n, t in g.items():
            total[n] = total[n] + weights[j] * t if n in total else weights[j] * t
    if not all(bool(torch.isfinite(t).all()) for t in total.values()):
        return math.nan
    try:
        return float(sum(float(v) for v in geometry.dual_norms(total).values()))
    except torch.linalg.LinAlgError:
        return math.nan


def add_derived_columns(frame: pd.DataFrame, cfg: DictConfig) -> pd.DataFrame:
    """Cumulative bits and the simulated time of the bandwidth/latency model."""
    c, net = cfg.network.bits, cfg.network
    f = frame.copy()
    f["up_bits_cum"] = f[f"up_{c}_total"].cumsum()
    f["up_bits_per_client_cum"] = f[f"up_{c}_mean"].cumsum()
    f["down_bits_cum"] = f[f"down_{c}_total"].cumsum()
    per_client_down = f[f"down_{c}_total"] / f["receivers"].clip(lower=1)
    trips = f["phases"] if "phases" in f else 1  # rounds of several client phases (Dion) make several trips
    f["sim_round_time"] = (2 * net.latency_ms / 1e3 * trips + f[f"up_{c}_max"] / (net.uplink_mbps * 1e6)
                           + per_client_down / (net.downlink_mbps * 1e6))
    f["sim_time"] = f["sim_round_time"].cumsum()
    return f


@sigterm_restored()  # Ray's own handler ends with Ray
def run(cfg: DictConfig, *, progress: bool = True, out_dir: str | Path | None = None,
        on_round: Callable[[dict[str, Any]], None] | None = None, resume: bool = False, grid: Any = None) -> Path:
    """Run ``cfg`` on its engine and write the run directory (module docstring); returns its path.
    ``grid``: a Flower deployment's Grid (the ServerApp of ``flwr run``, fedgluon/flower/deployment.py), which is
    then the engine instead of ``engine.name``. The directory is created with its :data:`MARKER` (or, with
    ``output.overwrite``, emptied: :func:`prepare_dir`) and stays locked until the run ends. Checkpoints and stops
    are the README's ("Interrupted runs, faults and stops"): a stop raises
    :class:`~fedgluon.sim.checkpoint.RunStopped` after writing the metrics so far; ``resume=True`` continues the
    run in ``out_dir`` from its checkpoint. The run computes with ``cfg.threads`` torch threads, the caller's
    count restored after (fedgluon/runtime/threads.py)."""
    out = Path(out_dir) if out_dir is not None else Path(cfg.output.dir) / run_name(cfg)
    if resume and cfg.output.overwrite:
        raise ConfigError("--resume continues a run and --overwrite replaces it: pass one of them")
    if resume and not (out / MARKER).is_file():  # never make a run directory of a folder fedgluon did not create
        raise ConfigError(f"{out} is not a fedgluon run directory: nothing to resume")
    nodes = cluster.for_run(cfg) if grid is None else None  # a deployment's clients are its SuperNodes, not Ray's
    if nodes is not None:  # Ray's client actors run in their own directories, perhaps on other nodes
        cfg = cluster.with_absolute_data_paths(cfg)
    try:
        with RunDirLock(out) if resume else prepare_dir(out, cfg.output.overwrite), torch_threads(int(cfg.threads)):
            return _run_locked(cfg, out, progress, on_round, resume, nodes, grid)
    finally:
        if nodes is not None:
            import ray

            ray.shutdown()  # Flower's engine shuts Ray down when it ends; this covers the runs it never started


def _run_locked(cfg: DictConfig, out: Path, progress: bool, on_round: Callable[[dict[str, Any]], None] | None,
                resume: bool, nodes: list[dict[str, Any]] | None = None, grid: Any = None) -> Path:
    """:func:`run` in its locked run directory ``out``."""
    t0 = time.perf_counter()  # summary.json's wall_time: building the task included
    spec = spec_of(cfg)
    snapshot = to_resume(out, spec) if resume else None
    _save_config(cfg, out / "config.yaml")
    task, algorithm = specs.build_cached(spec)
    if snapshot is not None:
        check_table(out / CHECKPOINT, snapshot, task, algorithm, spec["seed"])
    task.partition_summary.to_csv(out / "partition.csv", index=False)
    from fedgluon.sim.driver import client_weights

    weights, grad_every = client_weights(task.objectives, spec["weights"]), int(cfg.grad_norm_every)

    def evaluate(params: Mapping[str, torch.Tensor], k: int) -> dict[str, float]:
        """Central evaluation plus, every ``grad_norm_every`` rounds and after the last, the true gradient's
        dual norm."""
        row = task.evaluate(params)
        if grad_every and ((k + 1) % grad_every == 0 or k + 1 == spec["rounds"]):
            row["grad_dual_norm"] = _grad_dual_norm(task, algorithm.geometry, params, weights)
        return row

    checkpointer = Checkpointer(out / CHECKPOINT, int(cfg.output.checkpoint_every), run_key(spec), resumed=snapshot)
    start = snapshot.next_round if snapshot is not None else 0

    def write(history, clients, final, wall: float, **summary: Any) -> None:
        _write_results(out, cfg, history, clients, final, wall, resumed_from=start, deployed=grid is not None,
                       options=_resolved_options(algorithm), **summary)

    def write_stopped(checkpoint: Path, reason: str, can_resume: bool) -> None:
        """The files of a run stopped by ``reason``, from the rounds its ``checkpoint`` holds (metrics, client
        log, summary with ``"complete": false``); an unreadable checkpoint or an OS error (the full disk that
        stopped a save, say) leaves them unwritten, logged: the checkpoint itself is never touched."""
        wall = time.perf_counter() - t0
        try:
            snap = load_checkpoint(checkpoint)
            write(snap.history, snap.client_log, None, wall, stopped=reason, resumable=can_resume)
        except Exception as err:  # noqa: BLE001 - the stop's own error, re-raised by the caller, is what matters
            log.warning("could not write the results of the stopped run to %s: %s", out, err)

    try:
        with checkpointer.signals(), _progress(progress, spec["rounds"], run_name(cfg), start) as tick:
            def round_done(row: dict[str, Any]) -> None:
                tick(row)
                if on_round is not None:
                    on_round(row)

            res, state_bytes, placed = _run_engine(cfg, spec, task, algorithm, evaluate, round_done, checkpointer,
                                                   snapshot, nodes, grid)
    except RunStopped as err:
        if err.checkpoint is not None:
            write_stopped(err.checkpoint, str(err), resumable(err))
        raise
    except Exception as err:  # the engine failed mid-run (a SuperLink gone, Ray lost): as far as the last save
        if (out / CHECKPOINT).is_file():
            write_stopped(out / CHECKPOINT, f"{type(err).__name__}: {shown(err, 1000, as_repr=False)}", True)
        raise
    with checkpointer.signals():  # a Ctrl-C after the last round lets the results be written (a second one aborts)
        write(res.history, res.client_log, res.server_state["X"], time.perf_counter() - t0, state_bytes=state_bytes,
              placement=placed)
        remove_checkpoint(out / CHECKPOINT)
    if checkpointer.stop_requested:  # then the caller (a sweep's next member, say) stops all the same
        raise RunInterrupted(f"{checkpointer.reason} while the results were written: {out} is complete",
                             int(spec["rounds"]))
    return out


def _save_config(cfg: DictConfig, path: Path) -> None:
    """The resolved config, without ``output.overwrite``: that is a request of the command that started
    the run, never part of a config (fedgluon.config.schema.load refuses it in a file)."""
    saved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(saved, dict)
    saved["output"].pop("overwrite", None)
    OmegaConf.save(OmegaConf.create(saved), path)


def _run_engine(cfg, spec, task, algorithm, evaluate, round_done, checkpointer, snapshot, nodes=None, grid=None):
    """The run on its engine (``grid``: a Flower deployment's): its result (``history``, ``server_state``,
    ``client_log``), the bytes of its client states and :func:`fedgluon.exp.cluster.placement`."""
    engine = "deployment" if grid is not None else cfg.engine.name
    if engine == "plain":
        from fedgluon.sim.driver import run_plain

        res = run_plain(algorithm, task.objectives, task.initial_params(), spec["rounds"], seed=spec["seed"],
                        participation=spec["participation"], weights=spec["weights"], evaluate=evaluate,
                        eval_every=spec["eval_every"], on_round=round_done, faults=FaultPlan.from_spec(spec["faults"]),
                        checkpointer=checkpointer, resume=snapshot, block_size=spec["block_size"],
                        workers=cfg.engine.workers, max_failed_rounds=spec["max_failed_rounds"])
        return res, client_state_bytes(res.table), cluster.placement(algorithm)
    from fedgluon.flower.engines import run_inprocess, run_ray

    if engine == "deployment":  # flwr run: this ServerApp's grid (fedgluon/flower/deployment.py)
        from strategies.server_app import serve

        strategy = serve(grid, spec, round_done, evaluate, checkpointer, snapshot)
    elif engine == "inprocess":
        strategy = run_inprocess(spec, round_done, evaluate, checkpointer, snapshot)
    else:
        strategy = run_ray(spec, num_cpus=cfg.engine.num_cpus, num_gpus=cfg.engine.num_gpus, address=cfg.engine.address,
                           on_round=round_done, evaluate=evaluate, checkpointer=checkpointer, resume=snapshot,
                           fast_dispatch=bool(cfg.engine.fast_dispatch))
    return (strategy, client_state_bytes(strategy.federation.table),
            cluster.placement(algorithm, strategy, nodes) if engine == "ray" else cluster.placement(algorithm))


def _write_results(out: Path, cfg: DictConfig, history, clients, final, wall: float, *, stopped: str | None = None,
                   resumed_from: int = 0, state_bytes: Mapping[str, float] | None = None,
                   resumable: bool = True, placement: Mapping[str, Any] | None = None, deployed: bool = False,
                   options: Mapping[str, Any] | None = None) -> None:
    """metrics.csv, clients.csv, model.pt, plots.png and summary.json (``"complete": true`` only when the
    run finished; a stopped run's summary says why and where it stopped, and how to resume it where a
    resume can help; ``algorithm_options``: every option of the algorithm as the run used it, its defaults
    included, and the ``versions`` of the packages that computed it)."""
    frame = add_derived_columns(pd.DataFrame(history), cfg) if history else pd.DataFrame()
    frame.to_csv(out / "metrics.csv", index=False)
    pd.DataFrame(clients).to_csv(out / "clients.csv", index=False)
    if final is not None and cfg.output.save_model:
        torch.save({n: t.detach().cpu() for n, t in final.items()}, out / "model.pt")
    if len(frame):
        from fedgluon.exp.plots import plot_run

        plot_run(frame, out / "plots.png", title=run_name(cfg),
                 bits_label=f"uplink bits per client ({cfg.network.bits} convention)")
    summary = summarise(frame, cfg, wall)
    summary["resumed_from_round"] = resumed_from
    if options is not None:
        summary["algorithm_options"] = json.loads(json.dumps(dict(options), default=str))
    summary["versions"] = {p: _version(p) for p in cluster.VERSIONED}  # the packages a cluster's nodes must share
    if deployed:
        summary["engine"] = "flower-deployment"
    if state_bytes is not None:  # what the simulator holds per client at the end (fedgluon.core.memory)
        summary.update({f"client_state_bytes_{k}": v for k, v in state_bytes.items()})
    if placement is not None:
        summary.update(placement)
    if stopped is not None:
        summary.update({"complete": False, "stopped": stopped})
        if resumable:
            summary["resume"] = "flwr run ... --run-config resume=true (same config)" if deployed else \
                f"fedgluon run --resume {out}"
    (out / "summary.json").write_text(json.dumps(summary, indent=2))


def _resolved_options(algorithm: Any) -> dict[str, Any]:
    """The algorithm's options as the run uses them, its compressors' settings included (their defaults too)."""
    out = dict(algorithm.opt)
    for key, compressor in (("compressor", algorithm.compressor), ("downlink", algorithm.downlink)):
        if compressor is not None and out.get(key) is not None:
            out[key] = compressor.options()
    return out


def _version(package: str) -> str | None:
    """The installed version of ``package`` (None where it is not installed), without importing it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


SUMMARY_METRICS = (*(f"{when}_{split}_{m}" for split in EVAL_SPLITS for when in ("final", "best")
                     for m in ("accuracy", "loss")), "final_grad_dual_norm", "uplink_bits_per_client", "sim_time")
"""The measured fields of :func:`summarise`'s summary, which sweep tables aggregate and tunes rank by."""


def summarise(frame: pd.DataFrame, cfg: DictConfig, wall: float) -> dict[str, Any]:
    def last(col: str, of: Callable[[pd.Series], Any] = lambda s: s.iloc[-1]) -> float | None:
        """``of`` the column's measured values (by default the last); None where there are none."""
        values = frame[col].dropna() if col in frame else None
        return None if values is None or values.empty else float(of(values))

    def scores(split: str) -> dict[str, float | None]:
        loss, acc = f"{split}_loss", f"{split}_accuracy"
        return {f"final_{loss}": last(loss), f"final_{acc}": last(acc), f"best_{acc}": last(acc, max),
                f"best_{loss}": last(loss, min)}

    out = {
        "name": run_name(cfg), "algorithm": cfg.algorithm["name"], "task": cfg.task["name"], "seed": int(cfg.seed),
        "rounds": len(frame), "engine": cfg.engine.name,
        **{k: v for split in EVAL_SPLITS for k, v in scores(split).items()},
        "final_grad_dual_norm": last("grad_dual_norm"),
        "uplink_bits_total": last("up_bits_cum"), "uplink_bits_per_client": last("up_bits_per_client_cum"),
        "downlink_bits_total": last("down_bits_cum"), "sim_time": last("sim_time"),
        "rejected": int(frame["rejected"].sum()) if "rejected" in frame else 0,
        "failed": int(frame["failed"].sum()) if "failed" in frame else 0,
        "bit_convention": cfg.network.bits, "wall_time": wall, "complete": True,
    }
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}


@contextlib.contextmanager
def _progress(enabled: bool, total: int, label: str, start: int = 0) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A rich progress bar over rounds on a terminal, a plain line every tenth of the run elsewhere (a no-op
    when disabled)."""
    def info(row: dict[str, Any]) -> list[str]:
        return [f"{k}={row[k]:.4g}" for k in ("test_loss", "test_accuracy") if k in row]

    if not enabled:
        yield lambda row: None
    elif not sys.stdout.isatty():  # a pipe or a file: plain lines, about ten a run (rich cuts a bar to 80 columns)
        every = max(1, total // 10)

        def line(row: dict[str, Any]) -> None:
            done = int(row["round"]) + 1
            if done % every == 0 or done == total:
                print(" ".join([f"{label}: round {done}/{total}", *info(row)]), flush=True)
        yield line
    else:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      TextColumn("{task.fields[info]}")) as bar:
            task = bar.add_task(label, total=total, completed=start, info="")
            yield lambda row: bar.update(task, advance=1, info=" ".join(info(row)))
