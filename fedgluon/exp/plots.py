"""Plots of runs and sweeps (matplotlib, Agg backend): a run's ``plots.png`` (:func:`plot_run`), a sweep's
``pareto.png`` (:func:`plot_pareto`), and :func:`compare` (``fedgluon plot``, a sweep's ``curves.png``; README
"Experiments: configs, runs, sweeps") from :func:`collect`, :func:`group` and :func:`aggregate`. Axes name the
bit convention; log axes carry at most a handful of labelled ticks (:func:`log_axis`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib import ticker  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from fedgluon.config.sections import differing_keys, dotted  # noqa: E402
from fedgluon.core.text import first_line  # noqa: E402

BITS = "up_bits_per_client_cum"
X_AXES = (BITS, "round", "sim_time")
"""The x columns of :func:`compare`'s panels: cumulative uplink bits per client (log), round, simulated seconds."""
METRICS = ("test_loss", "test_accuracy")
NOT_CONFIG = ("seed", "output", "engine", "threads", "round_timeout", "node_timeout", "max_failed_rounds")
"""Config keys that do not make a different configuration: the seed, and where and how a run ran."""


class PlotError(ValueError):
    """Directories that cannot be drawn together; the message is one line."""


def log_axis(ax: Any, axis: str = "x", max_ticks: int = 5) -> None:
    """A log scale on ``axis`` with readable ticks: at most ``max_ticks`` labelled ticks, at 1·10^k, or at
    1, 2, 5·10^k (and denser) when the data span under a few decades, with engineering labels (200k, 1M, 3G)
    and unlabelled minor ticks; a span too narrow to hold two such ticks gets evenly spaced ones. An axis
    whose data have no positive value (no bits: no client was ever accepted) stays linear."""
    if not math.isfinite(ax.dataLim.minposx if axis == "x" else ax.dataLim.minposy):
        return
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
    lo, hi = ax.get_xlim() if axis == "x" else ax.get_ylim()
    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_formatter(ticker.EngFormatter(sep="\N{THIN SPACE}"))
    target.set_minor_formatter(ticker.NullFormatter())
    target.set_minor_locator(ticker.LogLocator(base=10, subs="auto", numticks=12))
    if not (lo > 0 and hi > lo):
        return
    first, last = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    for subs in ((1, 2, 3, 4, 5, 6, 7, 8, 9), (1, 2, 3, 5), (1, 2, 5), (1, 3), (1,)):
        ticks = [s * 10.0**e for e in range(first, last + 1) for s in subs if lo <= s * 10.0**e <= hi]
        if len(ticks) <= max_ticks:
            break
    if len(ticks) > max_ticks:  # many decades: every n-th power of ten
        target.set_major_locator(ticker.LogLocator(base=10, numticks=max_ticks + 1))
    elif len(ticks) >= 2:
        target.set_major_locator(ticker.FixedLocator(ticks))
    else:
        target.set_major_locator(ticker.MaxNLocator(nbins=max_ticks - 1))


def plot_run(frame: pd.DataFrame, path: str | Path, title: str = "",
             bits_label: str = "uplink bits per client") -> None:
    """2×2: test loss and accuracy against rounds and against cumulative uplink bits per client."""
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    ev = frame.dropna(subset=["test_loss"]) if "test_loss" in frame else frame
    for row, metric in enumerate(METRICS):
        if metric not in ev:
            continue
        axes[row][0].plot(ev["round"] + 1, ev[metric])  # the 0-based round index: rounds completed
        axes[row][0].set_xlabel("rounds completed")
        axes[row][0].xaxis.set_major_locator(ticker.MaxNLocator(nbins=8, integer=True))
        axes[row][1].plot(ev[BITS], ev[metric])
        axes[row][1].set_xlabel(f"cumulative {bits_label}")
        log_axis(axes[row][1])
        for ax in axes[row]:
            ax.set_ylabel(metric.replace("_", " "))
            ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_pareto(table: pd.DataFrame, path: str | Path, title: str, xlabel: str) -> None:
    """One point per configuration of a sweep's ``table`` (mean over seeds, error bars = std) and the Pareto
    front (fewest bits for at least that accuracy)."""
    x, y = "uplink_bits_per_client_mean", "final_test_accuracy_mean"
    fig, ax = plt.subplots(figsize=(7, 5))
    t = table.dropna(subset=[x, y]).sort_values(x)
    xerr, yerr = (t.get(c.replace("_mean", "_std")) for c in (x, y))
    ax.errorbar(t[x], t[y], xerr=xerr, yerr=yerr, fmt="o", capsize=3)
    for _, r in t.iterrows():
        ax.annotate(str(r["config"]), (r[x], r[y]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = t[t[y] > t[y].cummax().shift(fill_value=-math.inf)]  # above every cheaper configuration
    if len(front):
        ax.step(front[x], front[y], where="post", color="tab:red", alpha=0.6, label="Pareto front")
        ax.legend()
    log_axis(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(y.replace("_", " "))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- comparing runs and sweeps -------------------------------------------------------------------------------


@dataclass
class Run:
    """One run directory's evaluated rounds and what identifies its configuration."""

    path: Path
    source: Path  # the directory it was given as (the run itself, or its sweep)
    label: str  # its configuration's name, without the seed
    key: str  # the config without :data:`NOT_CONFIG`: runs with the same key are seeds of one configuration
    config: dict[str, Any]
    seed: int
    complete: bool
    rounds: int  # rounds the config asks for
    frame: pd.DataFrame  # the rounds with a test evaluation
    stopped: str = ""  # why an incomplete run stopped, from its summary (empty: no summary, or still running)

    @property
    def task(self) -> str:
        return str(self.config.get("task", {}).get("name"))

    @property
    def convention(self) -> str:
        return str(self.config.get("network", {}).get("bits", "int32"))

    def status(self) -> str:
        """How far an incomplete run got, e.g. ``seed 1 has 12 of 30 rounds (stopped: ...) (runs/x)``."""
        done = int(self.frame["round"].max()) + 1 if len(self.frame) else 0
        why = f"stopped: {self.stopped}" if self.stopped else "no complete summary: stopped, or still running"
        return f"seed {self.seed} has {done} of {self.rounds} rounds ({why}) ({self.path})"


@dataclass
class Curve:
    """One configuration: its runs and, per evaluated round, the mean x values and the mean, min and max
    of each metric over the seeds that reached that round (``seeds``: how many)."""

    label: str
    runs: list[Run]
    frame: pd.DataFrame
    notes: list[str] = field(default_factory=list)

    @property
    def incomplete(self) -> list[Run]:
        return [r for r in self.runs if not r.complete]

    def legend(self) -> str:
        n = len(self.runs)
        text = f"{self.label} — {n} seed{'s' if n != 1 else ''}"
        if self.incomplete:
            text += f", {len(self.incomplete)} incomplete"
        return text


def collect(dirs: Sequence[str | Path]) -> tuple[list[Run], list[str]]:
    """The runs in ``dirs`` (run directories, or sweep or tune directories whose members or trials with metrics
    are taken, complete or not) and notes on those that have not started. A directory that is none of these
    is a :class:`PlotError`."""
    runs: list[Run] = []
    notes: list[str] = []
    seen: set[Path] = set()
    several = len(dirs) > 1
    for given in dirs:
        d = Path(given)
        prefix = f"{d.name}: " if several else ""
        if (d / "sweep.json").is_file():
            found, missing = _sweep_runs(d, prefix)
            what = "member(s) without metrics yet"
        elif (d / "tuned.csv").is_file():
            found, missing = _tune_runs(d, prefix)
            what = "trial(s) without metrics"
        elif (d / "metrics.csv").is_file():
            found, missing, what = [_load_run(d, d, label=None)], [], ""
        else:
            raise PlotError(f"{d} is neither a run (metrics.csv), a sweep (sweep.json) nor a tune (tuned.csv)")
        if missing:
            notes.append(f"{d}: {len(missing)} {what}: {', '.join(missing)}")
        for run in found:
            if run.path.resolve() not in seen:
                seen.add(run.path.resolve())
                runs.append(run)
    return runs, notes


def _sweep_runs(sweep_dir: Path, prefix: str = "") -> tuple[list[Run], list[str]]:
    """A sweep's members that have metrics (labelled as in its table.csv) and the names of those without."""
    from fedgluon.exp.sweep import member_name, members, value_label

    try:
        grid = json.loads((sweep_dir / "sweep.json").read_text())["grid"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise PlotError(f"{sweep_dir / 'sweep.json'} cannot be read: {err}") from None
    runs, missing = [], []
    for values in members(grid):
        d = sweep_dir / member_name(values, grid)
        if _read_metrics(d / "metrics.csv") is None or not (d / "config.yaml").is_file():
            missing.append(d.name)
            continue
        label = ",".join(value_label(k, v, grid) for k, v in values.items() if k != "seed") or "base"
        runs.append(_load_run(d, sweep_dir, label=prefix + label))
    return runs, missing


def _read_metrics(path: Path) -> pd.DataFrame | None:
    """A metrics.csv with at least one row, or None (absent, or nothing written yet)."""
    try:
        frame = pd.read_csv(path)
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return None
    except (OSError, ValueError) as err:  # pandas' ParserError is a ValueError
        raise PlotError(f"{path} cannot be read: {str(err).strip().splitlines()[0]}") from None
    if "round" not in frame:
        raise PlotError(f"{path} has no round column: not a fedgluon metrics.csv")
    return frame if len(frame) else None


def _tune_runs(tune_dir: Path, prefix: str = "") -> tuple[list[Run], list[str]]:
    """A tune's trials that have metrics (``tuned.csv``'s ``run_dir``), labelled ``<algorithm> <config>``,
    and the run directories of those without."""
    try:
        trials = pd.read_csv(tune_dir / "tuned.csv")[["algorithm", "config", "run_dir"]]
    except (pd.errors.EmptyDataError, pd.errors.ParserError, KeyError, UnicodeDecodeError) as err:
        raise PlotError(f"{tune_dir / 'tuned.csv'} is not a tune's table: {first_line(err)}") from None
    runs, missing = [], []
    for row in trials.itertuples():
        d = tune_dir / str(row.run_dir)
        if (d / "metrics.csv").is_file():
            runs.append(_load_run(d, tune_dir, label=f"{prefix}{row.algorithm} {row.config}"))
        else:
            missing.append(str(row.run_dir))
    return runs, missing


def _load_run(d: Path, source: Path, label: str | None) -> Run:
    from omegaconf import OmegaConf

    from fedgluon.config.run_dir import is_complete

    if not (d / "config.yaml").is_file():
        raise PlotError(f"{d} has metrics.csv but no config.yaml: not a fedgluon run directory")
    try:
        config = OmegaConf.to_container(OmegaConf.load(d / "config.yaml"))
    except Exception as err:  # noqa: BLE001 - YAML and OmegaConf errors: the one line says which file
        raise PlotError(f"{d / 'config.yaml'} cannot be read: {str(err).strip().splitlines()[0]}") from None
    if not isinstance(config, dict):
        raise PlotError(f"{d / 'config.yaml'} is not a run's config (not a mapping)")
    frame = _read_metrics(d / "metrics.csv")
    if frame is None:
        frame = pd.DataFrame({"round": []})
    evaluated = [m for m in METRICS if m in frame]
    if evaluated:
        frame = frame.dropna(subset=evaluated, how="all")
    seed = int(config.get("seed", 0))
    if label is None:  # a run directory's default name is <algorithm>-<task>-s<seed>; a member's has seed=<seed>
        label = ",".join(p for p in re.sub(rf"-s{seed}$", "", d.name).split(",") if p != f"seed={seed}") or d.name
    key = json.dumps({k: v for k, v in config.items() if k not in NOT_CONFIG}, sort_keys=True, default=str)
    complete = is_complete(d)
    return Run(path=d, source=source, label=label, key=key, config=config, seed=seed, complete=complete,
               rounds=int(config.get("rounds", 0)), frame=frame.reset_index(drop=True),
               stopped="" if complete else _stop_reason(d))


def _stop_reason(d: Path) -> str:
    """The first line of a stopped run's reason (summary.json ``stopped``), at most 100 characters."""
    try:
        summary = json.loads((d / "summary.json").read_text())
    except (OSError, ValueError):
        return ""
    text = str(summary.get("stopped") or "").strip() if isinstance(summary, dict) else ""
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= 100 else line[:99] + "…"


def bit_convention(run_dir: str | Path) -> str:
    """The bit convention (``network.bits``) a run directory's cumulative bits count in."""
    return _load_run(Path(run_dir), Path(run_dir), label="").convention


def check_comparable(runs: Sequence[Run]) -> None:
    """A :class:`PlotError` naming the directories when the runs are of different tasks or count bits
    under different conventions (curves on one bits axis must count the same way)."""
    if not runs:
        raise PlotError("no run with metrics in the given directories")
    for what, of in (("tasks", lambda r: r.task), ("bit conventions (network.bits)", lambda r: r.convention)):
        where: dict[str, list[str]] = {}
        for r in runs:
            names = where.setdefault(of(r), [])
            if str(r.source) not in names:
                names.append(str(r.source))
        if len(where) > 1:
            parts = "; ".join(f"{value} in {', '.join(names)}" for value, names in sorted(where.items()))
            raise PlotError(f"cannot compare runs of different {what}: {parts}")


def aggregate(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Per round that any of ``frames`` (the seeds of one configuration) evaluated: the mean of each x column
    (:data:`X_AXES`), the mean, min and max of each metric (``<metric>_mean/_min/_max``) over the seeds with
    that round, and ``seeds``, how many those are. A seed that stopped early counts up to its last round."""
    parts = [f.assign(_seed=i) for i, f in enumerate(frames) if len(f)]
    if not parts:
        return pd.DataFrame({"round": [], "seeds": []})
    both = pd.concat(parts, ignore_index=True)
    by = both.groupby("round", sort=True)
    out = pd.DataFrame({"seeds": by["_seed"].nunique()})
    for col in X_AXES:
        if col != "round" and col in both:
            out[col] = by[col].mean()
    for metric in METRICS:
        if metric in both:
            out[f"{metric}_mean"] = by[metric].mean()
            out[f"{metric}_min"] = by[metric].min()
            out[f"{metric}_max"] = by[metric].max()
    return out.reset_index()


def group(runs: Sequence[Run]) -> list[Curve]:
    """One :class:`Curve` per configuration (runs whose configs differ only in :data:`NOT_CONFIG`), in the
    order they first appear; a seed found twice (the same run given twice, or a copy) counts once, from the
    first directory given. Labels that two configurations share get the config keys that tell them apart."""
    by_key: dict[str, list[Run]] = {}
    for r in runs:
        by_key.setdefault(r.key, []).append(r)
    curves = []
    for same in by_key.values():
        kept: dict[int, Run] = {}
        notes = []
        for r in same:
            if r.seed in kept:
                first = kept[r.seed]
                notes.append(f"{first.label}: seed {r.seed} is in {first.path} and {r.path}; drawn from the first")
            else:
                kept[r.seed] = r
        runs = sorted(kept.values(), key=lambda r: r.seed)
        curve = Curve(label=runs[0].label, runs=runs, frame=aggregate([r.frame for r in runs]), notes=notes)
        curve.notes += [f"{curve.label}: incomplete, drawn as far as it got: {r.status()}" for r in curve.incomplete]
        curves.append(curve)
    _disambiguate(curves)
    return curves


def _disambiguate(curves: list[Curve]) -> None:
    """Append ``key=value`` (the config keys whose values differ) to labels that several curves share."""
    by_label: dict[str, list[Curve]] = {}
    for c in curves:
        by_label.setdefault(c.label, []).append(c)
    for same in (v for v in by_label.values() if len(v) > 1):
        flat = [dotted({k: v for k, v in c.runs[0].config.items() if k not in NOT_CONFIG}) for c in same]
        keys = differing_keys(flat)
        for c, f in zip(same, flat):
            c.label += " [" + ", ".join(f"{k}={f.get(k)}" for k in keys[:3]) + ("…" if len(keys) > 3 else "") + "]"


def _network_label(runs: Sequence[Run]) -> str:
    nets = {json.dumps({k: v for k, v in r.config.get("network", {}).items() if k != "bits"}, sort_keys=True)
            for r in runs}
    if len(nets) != 1:
        return "simulated time (s; network.* differs between runs)"
    n = json.loads(nets.pop())
    return (f"simulated time (s; {n.get('uplink_mbps')} Mb/s up, {n.get('downlink_mbps')} Mb/s down, "
            f"{n.get('latency_ms')} ms latency)")


def draw_curves(curves: Sequence[Curve], *, convention: str = "int32", title: str = "",
                time_label: str = "simulated time (s)") -> Figure:
    """Rows: test loss, test accuracy (those any curve has); columns: cumulative uplink bits per client (log,
    the bit convention named), round, simulated time (those the metrics have). Each curve is its mean over
    seeds with the min–max band where two or more seeds reached a round (a single run: no band); a legend
    below names every curve with its number of seeds and incomplete runs."""
    metrics = [m for m in METRICS if any(f"{m}_mean" in c.frame for c in curves)]
    xs = [x for x in X_AXES if any(x in c.frame for c in curves)]
    if not metrics or not xs:
        raise PlotError("the runs have no test evaluations to draw")
    xlabels = {BITS: f"cumulative uplink bits per client ({convention} convention)", "round": "rounds completed",
               "sim_time": time_label}
    fig, axes = plt.subplots(len(metrics), len(xs), figsize=(4.6 * len(xs), 3.4 * len(metrics)), squeeze=False)
    colours = plt.get_cmap("tab10" if len(curves) <= 10 else "tab20")
    handles, labels = [], []
    for i, c in enumerate(curves):
        colour, style = colours(i % colours.N), ("-", "--", ":", "-.")[i // colours.N % 4]
        f, named = c.frame, False
        band = f["seeds"] >= 2
        for row, m in enumerate(metrics):
            if f"{m}_mean" not in f:
                continue
            for col, x in enumerate(xs):
                if x not in f:
                    continue
                ax = axes[row][col]
                xv = f[x] + 1 if x == "round" else f[x]  # the metrics' 0-based round index: rounds completed
                (line,) = ax.plot(xv, f[f"{m}_mean"], color=colour, linestyle=style, lw=1.4)
                if not named:  # the curve's first line names it in the legend
                    handles.append(line)
                    labels.append(c.legend())
                    named = True
                if band.any():
                    ax.fill_between(xv, f[f"{m}_min"], f[f"{m}_max"], where=band, color=colour, alpha=0.18, lw=0)
    for row, m in enumerate(metrics):
        for col, x in enumerate(xs):
            ax = axes[row][col]
            if x == BITS:
                log_axis(ax)
            elif x == "round":
                ax.xaxis.set_major_locator(ticker.MaxNLocator(nbins=6, integer=True))
            ax.set_xlabel(xlabels[x], fontsize=8 if x != "round" else None)
            ax.set_ylabel(m.replace("_", " "))
            ax.grid(alpha=0.3)
    widest = max((len(t) for t in labels), default=1) + 6  # characters, with the line handle
    ncol = max(1, min(4, len(labels), int(fig.get_figwidth() * 13) // widest))  # about 13 characters an inch
    nrows = math.ceil(len(labels) / ncol)
    fig.suptitle(title, fontsize=10)
    fig.text(0.5, 0.005, "lines: mean over seeds; bands: min–max over seeds", ha="center", fontsize=7, alpha=0.7)
    legend = 0.2 * nrows + 0.3  # inches of legend rows and the footnote, added below the axes' own height
    fig.set_figheight(3.4 * len(metrics) + legend)
    bottom = legend / fig.get_figheight()
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 0.02))
    fig.tight_layout(rect=(0, bottom, 1, 0.97 if title else 1))
    return fig


def compare(dirs: Sequence[str | Path], path: str | Path, title: str | None = None) -> tuple[list[Curve], list[str]]:
    """Draw the runs and sweeps in ``dirs`` as :func:`draw_curves` at ``path``; returns the curves and notes
    (members not started, incomplete runs, repeated seeds). Directories of different tasks or bit conventions,
    or neither a run nor a sweep, are a :class:`PlotError`."""
    runs, notes = collect(dirs)
    check_comparable(runs)
    curves = group(runs)
    if title is None:
        names = [Path(d).name for d in dirs]
        shown = ", ".join(names) if len(names) <= 3 else f"{', '.join(names[:2])} and {len(names) - 2} more"
        title = f"{shown}: task {runs[0].task}"
    fig = draw_curves(curves, convention=runs[0].convention, title=title, time_label=_network_label(runs))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return curves, notes + [n for c in curves for n in c.notes]
