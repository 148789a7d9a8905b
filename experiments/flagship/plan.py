"""The flagship study's plan: its tasks, its methods (``methods.yaml``) and the values phase 1 chose
(``chosen.yaml``), as plain data the tune, study and report steps share.

A method is one configuration of the study: an ``algorithm`` section without its tuned key, the key
(``lr`` or ``local_lr``) and the grid phase 1 searches. :func:`algorithm_at` puts a value back in.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

HERE = Path(__file__).resolve().parent
TASKS = {"shakespeare": HERE / "shakespeare.yaml", "fmnist": HERE / "fmnist.yaml"}
"""The study's tasks: name → base config."""
METHODS_FILE = HERE / "methods.yaml"
CHOSEN_FILE = HERE / "chosen.yaml"
SEEDS = (0, 1, 2)
METRIC = "final_test_loss"
METRICS = (METRIC, "final_val_loss")
"""What phase 1 may rank by: the final test loss (the committed values), or the loss on a validation split the
clients hold back (``--set task.validation_fraction=F``)."""


class PlanError(ValueError):
    """A methods.yaml or chosen.yaml that does not describe the study (one line, naming the entry)."""


@dataclass(frozen=True)
class Method:
    label: str
    algorithm: dict[str, Any]  # the algorithm section without the tuned key
    key: str  # the tuned option
    grid_name: str
    grid: tuple[float, ...]

    @property
    def name(self) -> str:
        return str(self.algorithm["name"])

    def algorithm_at(self, value: float) -> dict[str, Any]:
        """The whole algorithm section with the tuned key at ``value``."""
        return {**copy.deepcopy(self.algorithm), self.key: value}


def load_methods(path: Path = METHODS_FILE) -> list[Method]:
    """The methods of ``methods.yaml``, in its order (labels unique, grids named and increasing)."""
    raw = OmegaConf.to_container(OmegaConf.load(path))
    if not isinstance(raw, dict) or not isinstance(raw.get("methods"), list) or not isinstance(raw.get("grids"), dict):
        raise PlanError(f"{path} must hold a 'grids' mapping and a 'methods' list")
    grids = raw["grids"]
    out, seen = [], set()
    for i, entry in enumerate(raw["methods"]):
        where = f"{path.name}: methods[{i}]"
        if not isinstance(entry, dict) or set(entry) != {"label", "algorithm", "tune"}:
            raise PlanError(f"{where} must have exactly the keys label, algorithm, tune")
        label, alg, tune = entry["label"], entry["algorithm"], entry["tune"]
        if label in seen:
            raise PlanError(f"{where}: label {label!r} is used twice")
        seen.add(label)
        if not isinstance(alg, dict) or "name" not in alg:
            raise PlanError(f"{where} ({label}): algorithm must be a mapping with a name")
        if not isinstance(tune, dict) or set(tune) != {"key", "grid"} or tune["grid"] not in grids:
            raise PlanError(f"{where} ({label}): tune must be {{key, grid}} with grid one of {sorted(grids)}")
        if tune["key"] in alg:
            raise PlanError(f"{where} ({label}): the tuned key {tune['key']!r} must not be set in algorithm")
        grid = tuple(float(v) for v in grids[tune["grid"]])
        if len(grid) < 2 or list(grid) != sorted(set(grid)):
            raise PlanError(f"{path.name}: grid {tune['grid']!r} must be at least two increasing values")
        out.append(Method(str(label), alg, str(tune["key"]), str(tune["grid"]), grid))
    return out


Chosen = dict[str, dict[str, dict[str, Any]]]
"""chosen.yaml: task → method label → ``{value, grid, index, edge, ...}``."""


def load_chosen(path: Path = CHOSEN_FILE) -> Chosen:
    """``chosen.yaml``: task → method label → ``{value, grid, index, edge, <metric>: its value, ...}``."""
    if not path.is_file():
        raise PlanError(f"{path} does not exist: run phase 1 first (python -m experiments.flagship tune)")
    raw = OmegaConf.to_container(OmegaConf.load(path))
    if not isinstance(raw, dict):
        raise PlanError(f"{path} must map task → method label → chosen value")
    return raw  # type: ignore[return-value]  # checked per entry by chosen_value


def tuned_by(entries: Iterable[dict[str, Any]]) -> str:
    """The metric chosen.yaml entries (a task's) were chosen by: the one of :data:`METRICS` they record (entries
    without a value record none); a :class:`PlanError` where they name two."""
    found = {m for entry in entries for m in METRICS if m in entry}
    if len(found) > 1:
        raise PlanError(f"chosen values of one task were ranked by different metrics: {sorted(found)}")
    return found.pop() if found else METRIC


def study_seeds(sweep_dir: Path) -> list[int] | None:
    """The seeds a task's phase 2 ran, from its sweep's ``sweep.json`` (None before it ran)."""
    path = sweep_dir / "sweep.json"
    return json.loads(path.read_text())["grid"].get("seed") if path.is_file() else None


def chosen_value(chosen: Chosen, task: str, method: Method) -> float:
    """The value phase 1 chose for ``method`` on ``task``."""
    try:
        return float(chosen[task][method.label]["value"])
    except (KeyError, TypeError, ValueError):
        raise PlanError(f"the chosen values have no value for {method.label!r} on task {task!r}: run phase 1 for "
                        f"it (python -m experiments.flagship tune --task {task})") from None


def edge_of(grid: tuple[float, ...], value: float) -> str:
    """``low`` or ``high`` when ``value`` is the grid's first or last point (a tuned value there may lie
    outside the grid), ``beyond`` when it is outside the grid, else empty."""
    if value < grid[0] or value > grid[-1]:
        return "beyond"
    if value == grid[0]:
        return "low"
    if value == grid[-1]:
        return "high"
    return ""


def extend(grid: tuple[float, ...], edge: str) -> float:
    """The next point beyond ``edge`` of a geometric grid (the ratio of its two outermost points there)."""
    if edge == "low":
        return grid[0] * grid[0] / grid[1]
    return grid[-1] * grid[-1] / grid[-2]
