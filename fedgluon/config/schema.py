"""Experiment configuration: OmegaConf structured configs (dataclasses), YAML files and ``key=value``
overrides, validated with errors that name the field and the allowed values (README "Experiments: configs,
runs, sweeps"). The defaults *are* the small, meaningful run of ``fedgluon run`` with no arguments. ``task``,
``geometry`` and ``algorithm`` are open mappings checked by their builders; everything else is typed here,
:data:`RULES` gives every field's allowed values (numbers are finite), and ``output.overwrite`` is never read
from a file or an override (:func:`load`'s ``overwrite``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedgluon.config.sections import (
    DEFAULT_SECTIONS,
    defaults_that_apply,
    explicit,
    options_that_apply,
    without_renamed_parts,
)

ENGINES = ("ray", "inprocess", "plain")


class ConfigError(ValueError):
    """A bad experiment config; the message names the field and the allowed values."""


@dataclass
class EngineConfig:
    name: str = "ray"  # ray | inprocess | plain
    num_cpus: float = 1.0  # Ray CPU share per client task
    num_gpus: float = 0.0  # Ray GPU share per client task
    address: str | None = None  # join an existing Ray cluster ("auto" or HOST:PORT)
    block_size: int = 1  # virtual clients per Flower node, gradients vmapped per block (fedgluon/clients/blocks.py)
    client_device: str = "cpu"  # where client blocks compute gradients: cpu | auto | cuda | cuda:N
    workers: int = 1  # plain engine: blocks stepped at once in threads (fedgluon/sim/driver.py); same results
    fast_dispatch: bool = True  # ray engine: Flower's simulation loops wake on events (fedgluon/flower/dispatch.py)


@dataclass
class NetworkConfig:
    """Simulated time of a round: ``2·latency + max_j uplink_j / up_bw + downlink / down_bw``."""

    uplink_mbps: float = 10.0
    downlink_mbps: float = 50.0
    latency_ms: float = 50.0
    bits: str = "int32"  # the bit convention the simulated time uses (compressors.CONVENTIONS)


@dataclass
class OutputConfig:
    dir: str = "runs"
    name: str | None = None  # default: <algorithm>-<task>-s<seed>
    overwrite: bool = False  # set by `fedgluon run --overwrite` / load(overwrite=True) only, never by a file
    save_model: bool = True
    checkpoint_every: int = 10  # rounds between checkpoints (0: only on SIGINT/SIGTERM and fatal stops)


@dataclass
class FaultConfig:
    """Injected client faults (fedgluon/sim/faults.py): per task, raise w.p. raise_prob, or sleep delay_s
    seconds w.p. delay_prob (late when delay_s > round_timeout); ``die``: [round, client] pairs whose
    Ray worker exits; ``phase``: the client phase of a round whose tasks the faults strike (algorithms
    with several phases per round, e.g. Dion's two uplink phases; 0, the first, for every other one)."""

    raise_prob: float = 0.0
    delay_prob: float = 0.0
    delay_s: float = 0.0
    die: list[Any] = field(default_factory=list)
    phase: int = 0


@dataclass
class ExperimentConfig:
    task: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(DEFAULT_SECTIONS["task"]))
    geometry: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(DEFAULT_SECTIONS["geometry"]))
    algorithm: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(DEFAULT_SECTIONS["algorithm"]))
    rounds: int = 30
    seed: int = 0
    participation: float = 1.0  # a fraction in (0, 1], or a count of clients when > 1
    weights: str = "uniform"  # uniform | samples
    eval_every: int = 1
    grad_norm_every: int = 10  # the true gradient's dual norm every N rounds (0 = never)
    threads: int = 1
    round_timeout: float = 120.0
    node_timeout: float = 60.0
    max_failed_rounds: int = 10  # stop after this many consecutive rounds without an accepted client (0: never)
    engine: EngineConfig = field(default_factory=EngineConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)


SECTIONS = ("task", "geometry", "algorithm")


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
         replace: dict[str, Any] | None = None, *, overwrite: bool = False, own_run: bool = False) -> DictConfig:
    """Defaults ← YAML file ← whole ``replace``d sections ← ``key=value`` overrides, then :func:`validate`.

    ``replace={"algorithm": {...}}`` swaps a section for a new mapping instead of merging into it (a
    sweep over algorithms whose options differ). ``output.overwrite`` is never read from the file or the
    overrides (a shared YAML file must not be able to delete a run directory): it is ``overwrite``,
    which ``fedgluon run --overwrite`` sets. ``own_run=True`` marks ``path`` as a run's own
    ``config.yaml`` (``--resume``), whose ``output.overwrite`` only records how that run started and
    is ignored. The file is read with YAML's safe loader: tags such as ``!!python/object`` are refused."""
    try:
        cfg = OmegaConf.structured(ExperimentConfig)
        user = OmegaConf.create({})
        if path is not None:
            user = OmegaConf.merge(user, _read_yaml(Path(path), own_run))
        for section, value in (replace or {}).items():
            if section not in SECTIONS or not isinstance(value, dict):
                raise ConfigError(f"only the sections {list(SECTIONS)} can be replaced by a mapping, got {section!r}")
            user[section] = value
            cfg[section] = {}
        if overrides:
            hydra = [o for o in overrides if o.startswith(("~", "+"))]
            bad = [o for o in overrides if "=" not in o or o in hydra]
            if bad:
                hint = ("; keys are not removed or added with Hydra's ~ and +: an algorithm, task or compressor of "
                        "another name keeps only the options it takes" if hydra else "")
                raise ConfigError(f"overrides must look like key=value, got {bad}{hint}")
            dotlist = _from_dotlist(list(overrides))
            _refuse_overwrite(dotlist, "a key=value override")
            user = _merged(user, dotlist, user=True)
        cfg = _merged(cfg, user, user=False)
        for section in replace or {}:  # written out as a file's section would read on reload
            cfg[section] = explicit(section, cfg[section])
        cfg.output.overwrite = bool(overwrite)
    except OmegaConfBaseException as err:
        raise ConfigError(_explain(err)) from None
    validate(cfg)
    return cfg


def _merged(base: DictConfig, top: DictConfig, *, user: bool) -> DictConfig:
    """``top`` merged over ``base``: the user's settings over the defaults, or (``user``) a file's key=value
    overrides over it. A section of ``top`` that names another task or algorithm keeps of ``base``'s only
    :func:`defaults_that_apply` (or, of what the user wrote, :func:`options_that_apply`); a sub-mapping of
    another ``name`` (a compressor) replaces ``base``'s, keeping (``user``) the options that still apply."""
    base = base.copy()
    for section in SECTIONS:
        mine, theirs = top.get(section), base.get(section)
        if not isinstance(mine, DictConfig) or not isinstance(theirs, DictConfig):
            continue
        named = mine.get("name")
        if named is not None and named != theirs.get("name"):
            base[section] = (options_that_apply if user else defaults_that_apply)(section, str(named), theirs)
        base[section] = without_renamed_parts(base[section], mine, keep=user)
    return OmegaConf.merge(base, top)


def _from_dotlist(overrides: list[str]) -> DictConfig:
    """``key=value`` overrides as a config (each value read as YAML); a value that is not YAML, such as an
    unclosed ``[`` or ``{``, is a ConfigError naming that override."""
    import yaml

    try:
        return OmegaConf.from_dotlist(overrides)
    except yaml.YAMLError:
        for o in overrides:
            try:
                OmegaConf.from_dotlist([o])
            except yaml.YAMLError as err:
                problem = getattr(err, "problem", None) or str(err).splitlines()[0]
                raise ConfigError(f"override {o!r}: the value is not YAML ({problem}); a list or mapping needs "
                                  f"its closing bracket, e.g. key=[1, 2] or key={{a: 1}}") from None
        raise


def _read_yaml(path: Path, own_run: bool) -> DictConfig:
    """A config file as a mapping, read by OmegaConf's (safe) YAML loader; any failure is a ConfigError."""
    import yaml

    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        tag = isinstance(err, yaml.constructor.ConstructorError) and "tag" in str(problem)
        raise ConfigError(f"config file {path} is not plain YAML{where}: {problem}"
                          + ("; tags such as !!python/... are not allowed" if tag else "")) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} cannot be read: {err}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping of config keys, got a list")
    if own_run and isinstance(loaded.get("output"), DictConfig) and "overwrite" in loaded.output:
        del loaded.output["overwrite"]
    _refuse_overwrite(loaded, f"config file {path}")
    return loaded


def _refuse_overwrite(user: DictConfig, source: str) -> None:
    output = user.get("output")
    if isinstance(output, DictConfig) and "overwrite" in output:
        raise ConfigError(f"output.overwrite must not be set in {source}: overwriting is requested only by "
                          f"`fedgluon run --overwrite` or fedgluon.config.schema.load(..., overwrite=True)")


def fields(cls: type | None = None, prefix: str = "") -> dict[str, Any]:
    """Every field of the structured config, ``{dotted key: type}`` (``engine.num_gpus: float``…); the
    open sections ``task``, ``geometry``, ``algorithm`` are one field each."""
    cls = cls or ExperimentConfig
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(fields(hints[f.name], f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = hints[f.name]
    return out


def _conventions() -> list[str]:
    from compressors import CONVENTIONS

    return list(CONVENTIONS)


def _registry(section: str) -> list[str]:
    if section == "task":
        from fedgluon.tasks.registry import TASKS

        return sorted(TASKS)
    from fedgluon.algorithms import ALGORITHMS

    return sorted(ALGORITHMS)


def _count(v: Any) -> bool:
    return 0 < v <= 1 or (v > 1 and float(v).is_integer())


def _plain_name(v: Any) -> bool:
    return v is None or (v not in ("", ".", "..") and "/" not in v and "\\" not in v and "\0" not in v
                         and not Path(v).is_absolute())


NONNEG_INT, POS_INT, NONNEG, POS = "an integer >= 0", "an integer >= 1", "a number >= 0", "a number > 0"
RULES: dict[str, tuple[Any, Callable[[Any], bool]]] = {
    # dotted key: (the allowed values in words, or a function giving them; the check of a typed value)
    "task": (lambda: f"a mapping with task.name one of {_registry('task')} and that task's options", lambda v: True),
    "geometry": ("a mapping of geometry options (preset, overrides, lmo_device, ...)", lambda v: True),
    "algorithm": (lambda: f"a mapping with algorithm.name one of {_registry('algorithm')} and its options",
                  lambda v: True),
    "rounds": (POS_INT + " (a run of no rounds writes no metrics)", lambda v: v >= 1),
    "seed": (NONNEG_INT, lambda v: v >= 0),
    "participation": ("a fraction in (0, 1] or a whole number of clients (at most task.num_clients)", _count),
    "weights": ("one of ['uniform', 'samples']", lambda v: v in ("uniform", "samples")),
    "eval_every": (POS_INT, lambda v: v >= 1),
    "grad_norm_every": (NONNEG_INT + " (0: never)", lambda v: v >= 0),
    "threads": (POS_INT + " (torch threads per client task)", lambda v: v >= 1),
    "round_timeout": ("a number of seconds > 0", lambda v: v > 0),
    "node_timeout": ("a number of seconds > 0", lambda v: v > 0),
    "max_failed_rounds": (NONNEG_INT + " (0: never stop)", lambda v: v >= 0),
    "engine.name": (f"one of {list(ENGINES)}", lambda v: v in ENGINES),
    "engine.num_cpus": (POS + " (Ray CPUs per client task)", lambda v: v > 0),
    "engine.num_gpus": (NONNEG + " (Ray GPUs per client task)", lambda v: v >= 0),
    "engine.address": ("null (a private local Ray), 'auto' or HOST:PORT", lambda v: True),
    "engine.block_size": (POS_INT, lambda v: v >= 1),
    "engine.client_device": ("one of ['auto', 'cpu', 'cuda', 'cuda:N']", lambda v: True),  # resolve_device
    "engine.workers": (POS_INT + " (more than 1 with engine.name='plain' only)", lambda v: v >= 1),
    "engine.fast_dispatch": ("true or false (engine.name='ray': patch Flower's simulation loops to wake on events, "
                             "fedgluon/flower/dispatch.py; false keeps Flower's 0.1 s polling)", lambda v: True),
    "network.uplink_mbps": (POS, lambda v: v > 0),
    "network.downlink_mbps": (POS, lambda v: v > 0),
    "network.latency_ms": (NONNEG, lambda v: v >= 0),
    "network.bits": (lambda: f"one of {_conventions()}", lambda v: v in _conventions()),
    "output.dir": ("a directory path", lambda v: True),
    "output.name": ("null (<algorithm>-<task>-s<seed>) or a plain name: no path separator, not '.' or '..', "
                    "not absolute", _plain_name),
    "output.overwrite": ("set by `fedgluon run --overwrite` or load(..., overwrite=True) only", lambda v: True),
    "output.save_model": ("true or false", lambda v: True),
    "output.checkpoint_every": (NONNEG_INT + " (0: only on SIGINT/SIGTERM and fatal stops)", lambda v: v >= 0),
    "faults.raise_prob": ("a probability in [0, 1] (raise_prob + delay_prob <= 1)", lambda v: 0 <= v <= 1),
    "faults.delay_prob": ("a probability in [0, 1] (raise_prob + delay_prob <= 1)", lambda v: 0 <= v <= 1),
    "faults.delay_s": ("a number of seconds >= 0", lambda v: v >= 0),
    "faults.die": ("a list of [round, client] pairs of integers, 0 <= round < rounds, 0 <= client < num_clients",
                   lambda v: True),  # checked against the task in validate
    "faults.phase": (NONNEG_INT + " below the algorithm's number of client phases per round (1 for most "
                     "algorithms, 2 for Dion's)", lambda v: v >= 0),  # checked against the algorithm in validate
}


def allowed(key: str) -> str:
    """The allowed values of a config field, in words."""
    text = RULES[key][0]
    return text() if callable(text) else text


def _bad(key: str, value: Any) -> ConfigError:
    return ConfigError(f"{key} must be {allowed(key)}, got {value!r}")


def _explain(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or getattr(err, "key", None)
    msg = str(err).splitlines()[0]
    if "Key" in type(err).__name__ or "not in struct" in msg:
        section = str(key).rpartition(".")[0]
        inner = sorted(k.partition(".")[2] for k in fields() if k.startswith(f"{section}."))
        if section and inner:  # engine, network, output or faults
            return f"unknown config key {key!r}; keys of {section!r} are {inner} (see fedgluon/config/schema.py)"
        top = sorted(f.name for f in dataclasses.fields(ExperimentConfig))
        return f"unknown config key {key!r}; top-level keys are {top} (see fedgluon/config/schema.py)"
    if key in RULES:
        return f"{key} must be {allowed(str(key))} ({msg})"
    return f"bad value for {key!r}: {msg}"


def validate(cfg: DictConfig) -> None:
    """Check every typed field against :data:`RULES`, then build the task and algorithm once (their
    builders name bad options) and check what depends on them (participation and faults.die against
    the number of clients, faults.phase against the algorithm's client phases per round)."""
    types = fields()
    for key, (_, ok) in RULES.items():
        value = OmegaConf.select(cfg, key)
        if (types[key] is float and not math.isfinite(value)) or not ok(value):
            raise _bad(key, value)
    if cfg.engine.workers != 1 and cfg.engine.name != "plain":
        raise ConfigError(f"engine.workers applies to engine.name='plain' only (Flower engines step one block per "
                          f"node), got engine.workers={cfg.engine.workers} with engine.name={cfg.engine.name!r}")
    try:
        from fedgluon.core.devices import resolve_device

        resolve_device("engine.client_device", cfg.engine.client_device)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    die = OmegaConf.to_container(cfg.faults.die)
    if not all(isinstance(d, list) and len(d) == 2 and all(type(x) is int and x >= 0 for x in d) for d in die):
        raise _bad("faults.die", die)
    for section in ("task", "algorithm"):
        if cfg[section].get("name") not in _registry(section):
            raise ConfigError(f"{section}.name must be one of {_registry(section)}, got {cfg[section].get('name')!r}")
    try:
        from fedgluon.config import spec as specs

        task, algorithm = specs.build_cached(spec_of(cfg))
    except ConfigError:
        raise
    except FileNotFoundError as err:
        raise ConfigError(f"task: {err}") from None
    except (ValueError, TypeError) as err:
        raise ConfigError(str(err)) from None
    except Exception as err:  # noqa: BLE001 - a builder's unforeseen failure is still one line, not a traceback
        raise ConfigError(f"building the task and algorithm failed: {type(err).__name__}: {err}") from None
    n = len(task.objectives)
    if cfg.participation > n:
        raise ConfigError(f"participation must be a fraction in (0, 1] or a whole number of clients in [1, {n}] "
                          f"(task has {n} clients), got {cfg.participation}")
    missing = [d for d in die if d[0] >= cfg.rounds or d[1] >= n]
    if missing:
        raise ConfigError(f"faults.die must be a list of [round, client] pairs with 0 <= round < {cfg.rounds} "
                          f"and 0 <= client < {n}, got {missing}")
    if cfg.faults.phase >= algorithm.phases:
        raise ConfigError(f"faults.phase must be an integer >= 0 and < {algorithm.phases} (the client phases per "
                          f"round of {cfg.algorithm.name!r}), got {cfg.faults.phase}")


def spec_of(cfg: DictConfig) -> dict[str, Any]:
    """The engine-level run spec (fedgluon/config/spec.py) of a config."""
    from fedgluon.config import spec as specs

    c = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(c, dict)
    spec = {k: c[k] if k in c else c["engine"][k] for k in specs.DEFAULTS}  # block_size, client_device: engine's
    if isinstance(spec["participation"], float) and spec["participation"] > 1:
        spec["participation"] = int(spec["participation"])
    return specs.normalise(spec)


def run_name(cfg: DictConfig) -> str:
    return cfg.output.name or f"{cfg.algorithm['name']}-{cfg.task['name']}-s{cfg.seed}"
