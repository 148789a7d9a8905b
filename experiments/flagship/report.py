"""The study's answer per task: bits to a target, the metric at a common uplink budget, and the curves.

For each method (the seeds of its sweep members) and each seed:

* **bits to target**: the cumulative uplink and downlink bits per client (int32 convention: 32-bit values,
  32-bit indices; a seeded rand-k sends its seed instead of indices) at the first evaluation whose metric
  reaches the target. The target is what dense Gluon reaches halfway through its run (the mean over its
  seeds of the last evaluation in the first half of the rounds) unless given: a level most methods reach
  within the run, so a method's cheaper or dearer rounds show. The table gives mean ± std over the seeds
  that reached it, and how many did;
* **at the budget**: the metric at the last evaluation whose cumulative uplink per client is within a
  common budget, the median over methods of the whole run's uplink (a method whose whole run costs less is
  taken at its end; "over budget": its first evaluation already costs more);
* the final metric, mean ± std over seeds.

Writes ``<results>/<task>.csv``, ``<task>.md`` (the Markdown table) and ``<task>.png`` (every method's mean
curve with its min–max band over seeds, against uplink bits, rounds and simulated time).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from experiments.flagship.plan import METRIC, SEEDS, Chosen, Method, tuned_by  # noqa: E402
from experiments.flagship.study import check_members, grid_of, member_config, member_labels  # noqa: E402
from fedgluon.exp.plots import collect, draw_curves, group  # noqa: E402

TARGETS = {"shakespeare": ("test_loss", "min"), "fmnist": ("test_accuracy", "max")}
"""The metric each task's target and budget columns use, and whether smaller is better."""
BASELINE = "gluon"


@dataclass
class SeedRun:
    label: str
    seed: int
    metrics: pd.DataFrame  # the evaluated rounds, with up/down bits per client so far


def load(sweep_dir: Path, labels: dict[str, tuple[str, int]]) -> dict[str, list[SeedRun]]:
    """method label → its complete seeds' evaluated rounds."""
    out: dict[str, list[SeedRun]] = {}
    for member, (label, seed) in labels.items():
        d = sweep_dir / member
        summary = d / "summary.json"
        if not summary.is_file() or not json.loads(summary.read_text()).get("complete"):
            continue
        m = pd.read_csv(d / "metrics.csv")
        m["down_bits_per_client_cum"] = (m["down_int32_total"] / m["receivers"].clip(lower=1)).cumsum()
        m["up_bits_per_client_cum"] = m["up_int32_mean"].cumsum()
        out.setdefault(label, []).append(SeedRun(label, seed, m.dropna(subset=["test_loss"]).reset_index(drop=True)))
    return out


def reaches(m: pd.DataFrame, metric: str, mode: str, target: float) -> pd.DataFrame:
    return m[m[metric] <= target] if mode == "min" else m[m[metric] >= target]


def halfway(m: pd.DataFrame, metric: str) -> float:
    """The metric at the last evaluation in the first half of a run's rounds (the first evaluation when none
    is in the first half, as in a run of a few rounds)."""
    rounds = int(m["round"].max()) + 1
    first_half = m[m["round"] < rounds / 2]
    return float((first_half if len(first_half) else m)[metric].iloc[-1 if len(first_half) else 0])


def at_budget(m: pd.DataFrame, metric: str, budget: float) -> float:
    within = m[m["up_bits_per_client_cum"] <= budget * (1 + 1e-9)]
    return float(within[metric].iloc[-1]) if len(within) else math.nan


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    s = pd.Series([x for x in xs if x == x], dtype=float)
    return (float(s.mean()) if len(s) else math.nan, float(s.std(ddof=1)) if len(s) > 1 else math.nan)


def table(runs: dict[str, list[SeedRun]], task: str, methods: Sequence[Method], chosen: Chosen,
          target: float | None = None) -> tuple[pd.DataFrame, float, float]:
    """The per-method table, the target and the budget (module docstring)."""
    metric, mode = TARGETS[task]
    if not runs:
        raise ValueError("no complete member of the study in its sweep directory: run `python -m experiments.flagship "
                         "study` first (with the same --task, --set, --seeds and --quick)")
    if target is None:
        if BASELINE not in runs:
            raise ValueError(f"no complete {BASELINE!r} run in the sweep: its halfway value is the target, so "
                             f"select it too (--method {BASELINE})")
        target = mean_std([halfway(r.metrics, metric) for r in runs[BASELINE]])[0]
    totals = {label: mean_std([float(r.metrics["up_bits_per_client_cum"].iloc[-1]) for r in rs])[0]
              for label, rs in runs.items()}
    budget = float(pd.Series(totals).median())
    rows = []
    for m in methods:
        rs = runs.get(m.label, [])
        hits = [reaches(r.metrics, metric, mode, target) for r in rs]
        up = [float(h["up_bits_per_client_cum"].iloc[0]) for h in hits if len(h)]
        down = [float(h["down_bits_per_client_cum"].iloc[0]) for h in hits if len(h)]
        final = mean_std([float(r.metrics[metric].iloc[-1]) for r in rs])
        within = [at_budget(r.metrics, metric, budget) for r in rs]
        budgeted = mean_std(within)
        rows.append({"method": m.label, "value": chosen.get(task, {}).get(m.label, {}).get("value"),
                     "tuned": m.key, "seeds": len(rs), "reached": len(up),
                     "up_to_target_mean": mean_std(up)[0], "up_to_target_std": mean_std(up)[1],
                     "down_to_target_mean": mean_std(down)[0], "down_to_target_std": mean_std(down)[1],
                     f"final_{metric}_mean": final[0], f"final_{metric}_std": final[1],
                     f"{metric}_at_budget_mean": budgeted[0], f"{metric}_at_budget_std": budgeted[1],
                     "within_budget": sum(x == x for x in within),
                     "up_total_mean": totals.get(m.label, math.nan)})
    frame = pd.DataFrame(rows)
    base = frame.set_index("method")["up_to_target_mean"].get(BASELINE, math.nan)
    frame["up_saving_vs_gluon"] = base / frame["up_to_target_mean"]
    return frame, target, budget


def _pm(mean: float, std: float, scale: float = 1.0, digits: int = 3, over: str = "—") -> str:
    """``mean ± std`` (scaled); ``over`` when there is no mean."""
    if mean != mean:
        return over
    text = f"{mean / scale:.{digits}g}"
    return text + (f" ± {std / scale:.2g}" if std == std else "")


def markdown(frame: pd.DataFrame, task: str, target: float, budget: float, every: int, tuned_metric: str = METRIC,
             seeds: Sequence[int] = SEEDS) -> str:
    """The table as Markdown, with what its figures can and cannot say (``every``: rounds between evaluations;
    ``tuned_metric``: the metric phase 1 chose by; ``seeds``: the study's)."""
    metric, mode = TARGETS[task]
    name = metric.replace("_", " ")
    on_test = tuned_metric == METRIC
    how = ("by its final test loss, on the same test data as this table (not on a validation split)" if on_test else
           "by its final loss on a validation split the clients held back from training (not on the test data)")
    seed0 = ("; none of the seeds here was tuned on" if 0 not in seeds else
             ", and seed 0's run is that trial" if on_test else ", and seed 0 is the seed it was tuned on")
    lines = [f"Target: {name} {'≤' if mode == 'min' else '≥'} {target:.4g} (what dense Gluon reaches halfway, "
             "mean of its seeds);",
             f"budget: {budget / 1e6:.3g} Mbit uplink per client (the median method's whole run).",
             "Bits per client, int32 convention, mean ± std over the seeds that reached the target, counted up to "
             f"the first evaluation at the target: with an evaluation every {every} round(s) they move in steps of "
             f"{every} round(s)' bits. Each value was tuned on seed 0 {how}{seed0}.", "",
             "| method | tuned value | reached | uplink to target (Mbit) | downlink to target (Mbit) "
             f"| uplink saving vs gluon | {name} at budget | final {name} |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in frame.to_dict("records"):
        saving, seeds = r["up_saving_vs_gluon"], r["seeds"]
        some = {n: "*" if 0 < n < seeds else "" for n in (r["reached"], r["within_budget"])}
        lines.append(
            f"| {r['method']} | {r['tuned']} {r['value']:g} | {r['reached']}/{seeds} | "
            f"{_pm(r['up_to_target_mean'], r['up_to_target_std'], 1e6)} | "
            f"{_pm(r['down_to_target_mean'], r['down_to_target_std'], 1e6)} | "
            f"{'—' if saving != saving else f'{saving:.2g}×' + some[r['reached']]} | "
            f"{_pm(r[f'{metric}_at_budget_mean'], r[f'{metric}_at_budget_std'], over='over budget' if seeds else '—')}"
            f"{some[r['within_budget']]} | {_pm(r[f'final_{metric}_mean'], r[f'final_{metric}_std'])} |")
    lines += ["", "—: the target was not reached (or no seed ran). Over budget: the method's first evaluation already "
              "cost more uplink than the budget. *: over the seeds that reached the target (saving), or that had an "
              "evaluation within the budget (at budget), only."]
    return "\n".join(lines) + "\n"


def figure(sweep_dir: Path, labels: dict[str, tuple[str, int]], path: Path, title: str) -> None:
    """Every method's curves (fedgluon.exp.plots), labelled by method; complete members only, as in the table
    (an interrupted study's last members would otherwise draw shorter curves than the table counts)."""
    runs, _ = collect([sweep_dir])
    runs = [r for r in runs if r.path.name in labels and r.complete]  # as the table: complete members only
    if not runs:
        return
    for r in runs:
        r.label = labels[r.path.name][0]
    fig = draw_curves(group(runs), convention=runs[0].convention, title=title)
    fig.savefig(path, dpi=72)
    plt.close(fig)


def report(task: str, sweep_dir: Path, methods: Sequence[Method], chosen: Chosen, seeds: Sequence[int],
           results: Path, target: float | None = None, overrides: Sequence[str] = ()) -> str:
    """Write the task's table, Markdown and figure under ``results``; returns the Markdown. ``overrides``: the
    study's (a member that ran another config is refused)."""
    grid = grid_of(task, methods, seeds, chosen)
    check_members(task, grid, overrides, sweep_dir)
    labels = member_labels(methods, grid)
    runs = load(sweep_dir, labels)
    frame, target, budget = table(runs, task, methods, chosen, target)
    results.mkdir(parents=True, exist_ok=True)
    frame.to_csv(results / f"{task}.csv", index=False)
    every = int(member_config(task, overrides, grid["algorithm"][0], grid["seed"][0]).eval_every)
    text = markdown(frame, task, target, budget, every, tuned_by(chosen.get(task, {}).values()), seeds)
    (results / f"{task}.md").write_text(text)
    figure(sweep_dir, labels, results / f"{task}.png", title=f"flagship study: {task} ({len(seeds)} seeds)")
    return text


def chosen_table(methods: Sequence[Method], chosen: Chosen, tasks: Sequence[str]) -> str:
    """Phase 1's choices as a Markdown table: per method and task the value, its place in the searched grid
    (the one-step extension included) and a flag where it still lies on the grid's edge."""
    lines = ["| method | tuned | " + " | ".join(tasks) + " |", "| --- | --- |" + " --- |" * len(tasks)]
    for m in methods:
        cells = []
        for task in tasks:
            c = chosen.get(task, {}).get(m.label, {})
            if c.get("value") is None:
                cells.append("— (no trial ran every round)" if c else "—")
                continue
            grid = ", ".join(f"**{v:g}**" if v == c["value"] else f"{v:g}" for v in c["grid"])
            edge = "" if c.get("edge", "none") == "none" else f" ⚠ {c['edge']} edge"
            cells.append(f"{grid}{edge}")
        lines.append(f"| {m.label} | {m.key} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
