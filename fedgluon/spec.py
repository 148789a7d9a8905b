"""A run specification: one plain mapping that every engine (plain driver, in-process Flower grid,
Flower on Ray, ``flwr run``) turns into the same task and algorithm.

    {"task": {"name": "synthetic", "num_clients": 10},
     "geometry": {"preset": "scion"},
     "algorithm": {"name": "gluon-ef21-sarah", "lr": 0.05, "compressor": {"name": "topk", "ratio": 0.05}},
     "rounds": 20, "seed": 0, "participation": 1.0, "weights": "uniform", "eval_every": 1,
     "threads": 1, "round_timeout": 120.0, "faults": {"raise_prob": 0.1}}

``faults`` (optional) injects client failures (fedgluon/faults.py); ``block_size`` virtual clients
are simulated per Flower node (fedgluon/blocks.py); ``client_device`` (``"cpu"``, the default, ``"auto"``,
``"cuda"``, ``"cuda:N"``) is where client blocks compute their vmapped gradients (fedgluon/vectorised.py);
``max_failed_rounds`` consecutive rounds without an accepted client stop the run (0: never;
fedgluon/federation.py).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

from .algorithms import Algorithm, make_algorithm
from .devices import resolve_device
from .faults import FaultPlan
from .geometry import Geometry
from .tasks import Task, make_task

DEFAULTS: dict[str, Any] = {
    "task": {"name": "synthetic"}, "geometry": {"preset": "scion"}, "algorithm": {"name": "gluon"},
    "rounds": 10, "seed": 0, "participation": 1.0, "weights": "uniform", "eval_every": 1, "threads": 1,
    "round_timeout": 120.0, "node_timeout": 60.0, "faults": {},
    "block_size": 1, "client_device": "cpu", "max_failed_rounds": 10,
}


def normalise(spec: Mapping[str, Any] | None) -> dict[str, Any]:
    """Fill defaults and check the top-level keys; nested sections are checked when built."""
    spec = dict(spec or {})
    unknown = set(spec) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown run spec key(s) {sorted(unknown)}; allowed: {sorted(DEFAULTS)}")
    out = copy.deepcopy(DEFAULTS)
    out.update(copy.deepcopy(spec))
    if not isinstance(out["rounds"], int) or out["rounds"] < 0:
        raise ValueError(f"rounds must be a non-negative integer, got {out['rounds']!r}")
    FaultPlan.from_spec(out["faults"])  # names a bad fault option
    if not isinstance(out["block_size"], int) or out["block_size"] < 1:
        raise ValueError(f"block_size must be an integer >= 1, got {out['block_size']!r}")
    resolve_device("client_device", out["client_device"])
    if isinstance(out["max_failed_rounds"], bool) or not isinstance(out["max_failed_rounds"], int) \
            or out["max_failed_rounds"] < 0:
        raise ValueError(f"max_failed_rounds must be an integer >= 0 (0: never stop), got {out['max_failed_rounds']!r}")
    return out


def key(spec: Mapping[str, Any]) -> str:
    """A stable string identifying a spec (for per-process caches)."""
    return json.dumps(spec, sort_keys=True, default=str)


_CACHE: dict[str, tuple[Task, Algorithm]] = {}


def build_cached(spec: Mapping[str, Any]) -> tuple[Task, Algorithm]:
    """:func:`build`, memoised for the last spec in this process (validation, the runner, the server and
    in-process clients share one task instead of loading the data again). Tasks and algorithms hold
    no per-run mutable state: server and client state live outside them."""
    k = key(spec)
    if k not in _CACHE:
        _CACHE.clear()
        _CACHE[k] = build(spec)
    return _CACHE[k]


def build(spec: Mapping[str, Any]) -> tuple[Task, Algorithm]:
    """The task and the algorithm of a (normalised) spec; the task seed defaults to the run seed."""
    task_spec = {"seed": spec["seed"], **spec["task"]}
    task = make_task(task_spec)
    geometry = Geometry.from_model(task.model, **spec["geometry"])
    alg = dict(spec["algorithm"])
    name = alg.pop("name", None)
    algorithm = make_algorithm(name, geometry, **alg)
    algorithm.client_device = resolve_device("client_device", spec.get("client_device", "cpu"))
    return task, algorithm
