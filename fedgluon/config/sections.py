"""How the open config sections (``task``, ``geometry``, ``algorithm``) meet their defaults: a config file's
section is merged over the default section (:func:`defaults_that_apply`, :func:`without_renamed_parts`), a
section that replaces it (a sweep over whole algorithm mappings, ``fedgluon tune --algorithm``) is not, so
such a run's saved section spells out what a file would otherwise take from the defaults
(:func:`explicit`)."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

# the default run's open sections (fedgluon.config.schema.ExperimentConfig)
DEFAULT_SECTIONS: dict[str, dict[str, Any]] = {
    "task": {"name": "synthetic", "num_clients": 10, "alpha": 1.0, "beta": 1.0, "hidden": [64], "batch_size": 32},
    "geometry": {"preset": "scion"},
    "algorithm": {"name": "gluon-ef21-sarah", "lr": 0.05, "schedule": "polynomial", "power": 0.5,
                  "compressor": {"name": "topk", "ratio": 0.05}},
}


def defaults_that_apply(section: str, name: str, defaults: DictConfig) -> dict[str, Any]:
    """The default section's options that still apply when the user names another task or algorithm than
    the default one. A task keeps none of the default task's options (the same option name can mean
    different things, e.g. ``alpha``). An algorithm keeps those it accepts, each at the algorithm's own
    default where its class declares one (``OPTIONS``: DiLoCo's and AdamW's ``lr`` is an AdamW learning
    rate, FedAvg's ``compressor`` is the identity, MARINA's Rand-K) and at the default section's value
    otherwise (a shared ``BASE_OPTIONS`` option, such as Gluon's radius ``lr`` or the schedule, which
    means the same for every algorithm that does not declare its own). Options the user writes are
    merged over these by :func:`fedgluon.config.schema.load`, so they are always kept."""
    kept = options_that_apply(section, name, defaults) if section == "algorithm" else {}
    if not kept:
        return {}
    from fedgluon.algorithms import ALGORITHMS

    own = {k: copy.deepcopy(v) for k, v in ALGORITHMS[name].OPTIONS.items() if k in kept and v is not None}
    return {k: own.get(k, v) for k, v in kept.items()}


OWN_TASK_OPTIONS = {"synthetic": frozenset({"alpha", "beta"})}  # LEAF's α, β; elsewhere α is Dirichlet's


def options_that_apply(section: str, name: str, options: DictConfig) -> dict[str, Any]:
    """The options a user wrote in a section that still mean the same for the task or algorithm ``name``:
    of an algorithm's, those the class of ``name`` accepts; of a task's, those the builders of ``name``
    take, but none of :data:`OWN_TASK_OPTIONS` of either task (an unknown name keeps none: validation
    names it)."""
    from fedgluon.config.spec import algorithm_defaults
    from fedgluon.tasks import registry as tasks

    kept = OmegaConf.to_container(options)
    assert isinstance(kept, dict)
    if section == "task" and name in tasks.TASKS:
        own = OWN_TASK_OPTIONS.get(name, frozenset()) | OWN_TASK_OPTIONS.get(str(kept.get("name")), frozenset())
        accepted = tasks.task_options(name) - own
    elif section == "algorithm":
        accepted = set(algorithm_defaults(name))
    else:
        return {}
    return {k: v for k, v in kept.items() if k in accepted}


def compressor_options_that_apply(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The options of a compressor mapping ``old`` that ``new``, a compressor of another name, takes too (a
    ratio from one sparsifier to another, the value codec unless ``new``'s name fixes its own, QSGD's levels
    where ``new`` ends up with qsgd values); none for a name that is no compressor."""
    from compressors.registry import COMPRESSORS, fixes_values

    name = str(new.get("name"))
    if name not in COMPRESSORS:
        return {}
    own_values = fixes_values(name)
    values = new.get("values", COMPRESSORS[name][2] if own_values else old.get("values", COMPRESSORS[name][2]))
    takes = {*COMPRESSORS[name][1], *(() if own_values else ("values",)), *(("levels",) if values == "qsgd" else ())}
    return {k: copy.deepcopy(v) for k, v in old.items() if k in takes}


def explicit(name: str, section: Mapping[str, Any]) -> dict[str, Any]:
    """A section that replaced the default ``name`` section (``task``, ``geometry`` or ``algorithm``), with
    every option a config file's section would take from the default section written out at the value the
    run uses, so that the run's ``config.yaml`` (or a tune's ``best.yaml``) run again reproduces it. A task
    of the default task's name and a geometry take their builder's defaults (a task of another name takes
    nothing from the default one); an algorithm: :func:`_explicit_algorithm`."""
    out = OmegaConf.to_container(section) if OmegaConf.is_config(section) else copy.deepcopy(dict(section))
    assert isinstance(out, dict)
    if name == "algorithm":
        return _explicit_algorithm(out)
    default = DEFAULT_SECTIONS[name]
    if name == "task":
        from fedgluon.tasks.registry import TASKS

        if out.get("name") != default["name"] or out["name"] not in TASKS:
            return out
        builder: Any = TASKS[out["name"]]
    else:
        from fedgluon.lmo.geometry import Geometry

        builder = Geometry.from_shapes
    _fill_defaults(out, default, builder)
    return out


def _explicit_algorithm(out: dict[str, Any]) -> dict[str, Any]:
    """``out``, a replaced algorithm section, with the options a file's section would take from the default
    section (:func:`defaults_that_apply`) at the algorithm's own defaults; a compressor of the default
    compressor's name gets its structure's defaults for the options the default compressor names."""
    from compressors.registry import COMPRESSORS
    from fedgluon.algorithms import ALGORITHMS
    from fedgluon.config.spec import algorithm_defaults

    if out.get("name") not in ALGORITHMS:
        return out  # refused by validate
    default = DEFAULT_SECTIONS["algorithm"]
    applies = copy.deepcopy(default) if out["name"] == default["name"] else \
        defaults_that_apply("algorithm", out["name"], OmegaConf.create(default))
    own = algorithm_defaults(out["name"])
    for key, value in applies.items():
        if key not in out:
            out[key] = copy.deepcopy(own.get(key))
        elif isinstance(value, dict) and isinstance(out[key], dict) and out[key].get("name") == value.get("name") \
                and value.get("name") in COMPRESSORS:
            factory, _, codec = COMPRESSORS[value["name"]]
            if "values" in value:
                out[key].setdefault("values", codec)
            _fill_defaults(out[key], value, factory)
    return out


def _fill_defaults(out: dict[str, Any], keys: Mapping[str, Any], builder: Any) -> None:
    """Set each of ``keys`` missing from ``out`` to ``builder``'s default for that parameter, where it has one
    (a tuple as the list YAML reads back)."""
    import inspect

    params = inspect.signature(builder).parameters
    for key in keys:
        if key not in out and key in params and params[key].default is not inspect.Parameter.empty:
            value = params[key].default
            out[key] = list(value) if isinstance(value, tuple) else copy.deepcopy(value)


def without_renamed_parts(defaults: DictConfig, user: DictConfig, keep: bool = False) -> DictConfig:
    """Drop a default sub-mapping (a compressor, say) that the user replaces by one with another ``name``:
    ``{name: topk, ratio: 0.05}`` must not leave its ``ratio`` in ``{name: powersgd, rank: 2}``. With
    ``keep`` (a file under its overrides) a compressor keeps :func:`compressor_options_that_apply`."""
    out = OmegaConf.to_container(defaults)
    assert isinstance(out, dict)
    for key, value in user.items():
        old = out.get(key)
        if isinstance(value, DictConfig) and isinstance(old, dict) and "name" in value and \
                value.get("name") != old.get("name"):
            out[key] = compressor_options_that_apply(old, value) if keep else {}
            if not out[key]:
                del out[key]
    return OmegaConf.create(out)


def dotted(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as ``{"section.key": leaf}`` (a config's keys as overrides name them)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(dotted(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def differing_keys(flat: Sequence[Mapping[str, Any]]) -> list[str]:
    """The keys whose values are not all the same across these flattened configs (:func:`dotted`; a key one
    of them lacks counts as None), sorted: what tells configurations apart in a label."""
    return sorted({k for f in flat for k in f if len({json.dumps(g.get(k), default=str) for g in flat}) > 1})


def differences(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """``"key: saved -> wanted"`` for each key whose value differs between two flattened configs
    (:func:`dotted`), in key order: what a refusal to reuse or resume a run names."""
    return [f"{k}: {saved.get(k)!r} -> {wanted.get(k)!r}" for k in sorted(set(saved) | set(wanted))
            if saved.get(k) != wanted.get(k)]


def listed(changes: list[str], most: int = 3) -> str:
    """The first ``most`` of :func:`differences`' list, for an error line."""
    return "; ".join(changes[:most]) + ("; ..." if len(changes) > most else "")
