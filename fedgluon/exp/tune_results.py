"""What a tune (fedgluon/exp/tuning.py) makes of its trials: the metrics a trial reports round by round
(:class:`RunningSummary`), one progress line per finished trial (:class:`TrialProgress`), and the
best config of each algorithm in ``tuned.csv``, ``best.json`` and ``<algorithm>/best.yaml``."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf
from ray.tune import Callback

from fedgluon.config import schema as configs
from fedgluon.exp.experiment import SUMMARY_METRICS
from fedgluon.exp.sweep import value_label
from fedgluon.tasks.registry import EVAL_METRICS

METRICS = ("final_test_loss", *(m for m in SUMMARY_METRICS if m != "final_test_loss"))  # the default first
"""Summary fields (fedgluon/exp/experiment.py) a trial reports every round and ``metric`` may name."""


class RunningSummary:
    """The :data:`METRICS` of a run so far, round by round at a constant cost per round: what its
    ``summary.json`` would hold if it stopped after the last row added (fedgluon.exp.experiment.summarise
    and add_derived_columns, without rebuilding the whole table every round)."""

    def __init__(self, cfg: Any):
        self.net, self.values = cfg.network, {}
        self.rounds = self.client_rounds = 0

    def add(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """Take one round's metrics row; returns the report for the rounds so far."""
        self.rounds += 1
        self.client_rounds += int(row.get("participants", 0))
        c, net = self.net.bits, self.net
        per_client_down = row[f"down_{c}_total"] / max(row["receivers"], 1)
        trips = row.get("phases", 1)  # rounds of several client phases (Dion) make several trips
        sim_round = (2 * net.latency_ms / 1e3 * trips + row[f"up_{c}_max"] / (net.uplink_mbps * 1e6)
                     + per_client_down / (net.downlink_mbps * 1e6))
        self.values["uplink_bits_per_client"] = self.values.get("uplink_bits_per_client", 0) + row[f"up_{c}_mean"]
        self.values["sim_time"] = self.values.get("sim_time", 0) + sim_round
        for col, best in (*EVAL_METRICS.items(), ("grad_dual_norm", None)):
            v = row.get(col)
            if v is None or math.isnan(v):
                continue
            self.values[f"final_{col}"] = float(v)
            if best is not None:
                self.values[f"best_{col}"] = best(self.values.get(f"best_{col}", v), float(v))
        return self.report(self.values)

    def report(self, summary: Mapping[str, Any]) -> dict[str, Any]:
        """``summary``'s :data:`METRICS` (NaN where not measured), with ``round`` and ``client_rounds``."""
        return {"round": self.rounds, "client_rounds": self.client_rounds,
                **{m: math.nan if summary.get(m) is None else float(summary[m]) for m in METRICS}}


def trial_id_of(path: str | None) -> str:
    """The trial id in the name of a Ray Tune trial directory (``<trainable>_<id>_<index>_...``)."""
    import re

    found = re.search(r"_([0-9a-f]{5}_[0-9]{5})_", Path(path or "").name)
    return found.group(1) if found else ""


def best_configs(table: pd.DataFrame, metric: str, mode: str) -> pd.DataFrame:
    """``table`` with ``best`` set on the trials of each algorithm's best config: the best mean ``metric``
    over the config's seeds, among the trials that ran every round (none of an algorithm's: no best)."""
    table = table.copy()
    table["best"] = False
    for _, trials in table.groupby("algorithm", sort=False):
        done = trials[trials["complete"].astype(bool) & trials[metric].notna()]
        if done.empty:
            continue
        means = done.groupby("config", sort=False)[metric].mean()
        pick = means.idxmin() if mode == "min" else means.idxmax()
        table.loc[done.index[done["config"] == pick], "best"] = True
    return table


def write_best(tune_dir: Path, request: Mapping[str, Any], table: pd.DataFrame) -> pd.DataFrame:
    """``best`` in ``tuned.csv``, ``best.json`` and each algorithm's ``best.yaml``."""
    metric, mode = request["metric"], request["mode"]
    table = best_configs(table, metric, mode)
    table.to_csv(tune_dir / "tuned.csv", index=False)
    base = configs.load(request["config"], request["overrides"])
    best: dict[str, Any] = {"metric": metric, "mode": mode, "algorithms": {}}
    for label, trials in table[table["best"]].groupby("algorithm", sort=False):
        first = trials.iloc[0]
        cfg = OmegaConf.load(tune_dir / first["run_dir"] / "config.yaml")
        cfg.output = OmegaConf.merge(cfg.output, {"dir": base.output.dir, "name": None})
        OmegaConf.save(cfg, tune_dir / label / "best.yaml")
        best["algorithms"][label] = {"config": first["config"], metric: float(trials[metric].mean()),
                                     "trials": list(trials["trial_id"]), "run_dirs": list(trials["run_dir"]),
                                     "best_yaml": f"{label}/best.yaml"}
    (tune_dir / "best.json").write_text(json.dumps(best, indent=2))
    return table


class TrialProgress(Callback):
    """Ray Tune callback: one line per finished trial (``[i/n] <algorithm> <config>: rounds, metric``), in
    place of Ray Tune's progress tables."""

    def __init__(self, label: str, total: int, metric: str, enabled: bool, done: int = 0):
        self.label, self.total, self.metric, self.enabled, self.done = label, total, metric, enabled, done

    def _line(self, trial: Any, what: str) -> None:
        self.done += 1
        if self.enabled:
            values = (trial.config or {}).get("values", {})
            name = ",".join(f"{k.split('.')[-1]}={value_label(k, v)}" for k, v in values.items()) or "base"
            print(f"[{self.done}/{self.total}] {self.label} {name}: {what}", flush=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        self._line(trial, f"{last.get('round', 0)} rounds, {self.metric}={last.get(self.metric, math.nan):.6g}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(trial, "failed")
