"""A run specification: one plain mapping that every engine (plain driver, in-process Flower grid, Flower on
Ray, ``flwr run``) turns into the same task and algorithm; :data:`DEFAULTS` holds every key. ``faults``:
fedgluon/sim/faults.py; ``block_size``: virtual clients per Flower node (fedgluon/clients/blocks.py), whose
vmapped gradients are computed on ``client_device`` (fedgluon/clients/vectorised.py); ``max_failed_rounds``
consecutive rounds without an accepted client stop the run (0: never; fedgluon/sim/federation.py).
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import typing
from collections.abc import Mapping
from typing import Any

from compressors.registry import KINDS, is_number
from fedgluon.algorithms import Algorithm, make_algorithm
from fedgluon.core.devices import resolve_device
from fedgluon.core.text import prefixed
from fedgluon.lmo.geometry import Geometry
from fedgluon.sim.faults import FaultPlan
from fedgluon.tasks.registry import Task, make_task, task_builders

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
    stop = out["max_failed_rounds"]
    if isinstance(stop, bool) or not isinstance(stop, int) or stop < 0:
        raise ValueError(f"max_failed_rounds must be an integer >= 0 (0: never stop), got {stop!r}")
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


GEOMETRY_OPTIONS = frozenset(n for n, p in inspect.signature(Geometry.from_shapes).parameters.items()
                             if p.kind is p.KEYWORD_ONLY)  # the geometry section's options


def build(spec: Mapping[str, Any]) -> tuple[Task, Algorithm]:
    """The task and the algorithm of a (normalised) spec; the task seed defaults to the run seed. A
    builder's ValueError that begins with one of its section's options (``beta must be in [0, 1)``) gets
    the section's name in front (``algorithm.beta must be ...``)."""
    task_spec = {"seed": spec["seed"], **spec["task"]}
    if unknown := sorted(set(spec["geometry"]) - GEOMETRY_OPTIONS):  # before the task's data are loaded
        raise ValueError(f"geometry got unknown option(s) {unknown}; allowed: {sorted(GEOMETRY_OPTIONS)}")
    check_option_types(task_spec, spec["algorithm"], spec["geometry"])
    with prefixed("task", {*task_spec, *_annotated_kinds(*task_builders(task_spec.get("name")))}):
        task = make_task(task_spec)
    with prefixed("geometry", spec["geometry"]):
        geometry = Geometry.from_model(task.model, **spec["geometry"])
    alg = dict(spec["algorithm"])
    name = alg.pop("name", None)
    with prefixed("algorithm", {**alg, **algorithm_defaults(name)}):
        algorithm = make_algorithm(name, geometry, **alg)
    algorithm.client_device = resolve_device("client_device", spec.get("client_device", "cpu"))
    check_min_k(algorithm)
    return task, algorithm


def algorithm_defaults(name: Any) -> dict[str, Any]:
    """Every option algorithm ``name`` takes, at its default (its class's ``BASE_OPTIONS`` and ``OPTIONS``, as
    ``Algorithm.__init__`` merges them); none for an unknown name."""
    from fedgluon.algorithms import ALGORITHMS

    cls = ALGORITHMS.get(name)
    return {**cls.BASE_OPTIONS, **cls.OPTIONS} if cls is not None else {}


def _annotated_kinds(*functions: Any) -> dict[str, tuple[str, Any]]:
    """The scalar options of builder functions, by annotation; ``X | None`` also takes null."""
    kinds: dict[str, tuple[str, Any]] = {}
    for fn in functions:
        for key, hint in typing.get_type_hints(fn).items():
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            optional = len(args) < len(typing.get_args(hint))
            base = args[0] if optional and len(args) == 1 else hint
            if base in KINDS:
                words, ok = KINDS[base]
                kinds[key] = (words + " or null", lambda v, ok=ok: v is None or ok(v)) if optional else (words, ok)
    return kinds


def check_option_types(task: Mapping[str, Any], algorithm: Mapping[str, Any],
                       geometry: Mapping[str, Any] | None = None) -> None:
    """Refuse a task, geometry or algorithm option of the wrong scalar type (``task.num_clients=abc``,
    ``algorithm.lr=abc``) with a message naming it, before a builder trips over it. Task and geometry
    options are checked against their builders' annotations (``fedgluon.tasks.registry.task_builders``;
    ``Geometry.from_shapes``), algorithm options against the type of their default (a number, a
    boolean or a string; options whose default is null or a mapping are the builders')."""
    sections = [("geometry", geometry or {}, _annotated_kinds(Geometry.from_shapes)),
                ("task", task, _annotated_kinds(*task_builders(task.get("name"))))]
    for section, options, kinds in sections:
        for key, value in options.items():
            if key in kinds and not kinds[key][1](value):
                raise ValueError(f"{section}.{key} must be {kinds[key][0]}, got {value!r}")
    defaults = algorithm_defaults(algorithm.get("name"))
    for key, value in algorithm.items():
        default = defaults.get(key)
        kind = bool if isinstance(default, bool) else str if isinstance(default, str) else \
            float if is_number(default) else None
        if kind is None:
            continue  # options whose default is null or a mapping are the builders' to judge
        words, ok = KINDS[kind]
        if not ok(value):
            grid = " (a list of values is a sweep's grid: fedgluon sweep)" if isinstance(value, list) else ""
            raise ValueError(f"algorithm.{key} must be {words}, got {value!r}{grid}")


def check_min_k(algorithm: Algorithm) -> None:
    """Refuse a sparsifier's ``min_k`` above the largest layer's size ``d``: each layer sends
    ``k_i = clamp(⌈ratio·d_i⌉, min_k, d_i)`` values, so such a ``min_k`` silently sends every layer whole.
    (A ``min_k`` above a small layer's size, a bias say, is the intended clamp and is allowed.)"""
    d = max((math.prod(shape) for shape in algorithm.shapes.values()), default=0)
    for key in ("compressor", "downlink"):
        compressor = getattr(algorithm, key, None)
        min_k = getattr(getattr(compressor, "structure", None), "min_k", None)
        if min_k is not None and min_k > d:
            raise ValueError(f"algorithm.{key}.min_k must be an integer in [1, {d}] (the largest layer's size; "
                             f"a larger min_k sends every layer whole), got {min_k}")
