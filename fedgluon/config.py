"""Experiment configuration: OmegaConf structured configs (dataclasses), YAML files and ``key=value``
overrides, validated with errors that name the field and the allowed values.

The defaults *are* the small, meaningful run that ``fedgluon run`` does with no arguments:
10 LEAF-synthetic clients, Gluon-EF21-SARAH with top-5% uplink compression, 30 rounds on Flower's
Ray engine. ``task``, ``geometry`` and ``algorithm`` are open mappings checked by their builders
(each builder names the allowed options); everything else is typed here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

ENGINES = ("ray", "inprocess", "plain")


class ConfigError(ValueError):
    """A bad experiment config; the message names the field and the allowed values."""


@dataclass
class EngineConfig:
    name: str = "ray"  # ray | inprocess | plain
    num_cpus: float = 1.0  # Ray CPU share per client task
    num_gpus: float = 0.0  # Ray GPU share per client task
    address: str | None = None  # join an existing Ray cluster ("auto" or HOST:PORT)
    block_size: int = 1  # virtual clients per Flower node, gradients vmapped per block (fedgluon/blocks.py)
    client_device: str = "cpu"  # where client blocks compute gradients: cpu | auto | cuda | cuda:N
    workers: int = 1  # plain engine: blocks stepped at once in threads (fedgluon/driver.py); same results


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
    overwrite: bool = False
    save_model: bool = True
    checkpoint_every: int = 10  # rounds between checkpoints (0: only on SIGINT/SIGTERM and fatal stops)


@dataclass
class FaultConfig:
    """Injected client faults (fedgluon/faults.py): per task, raise w.p. raise_prob, or sleep delay_s
    seconds w.p. delay_prob (late when delay_s > round_timeout); ``die``: [round, client] pairs whose
    Ray worker exits."""

    raise_prob: float = 0.0
    delay_prob: float = 0.0
    delay_s: float = 0.0
    die: list[Any] = field(default_factory=list)


@dataclass
class ExperimentConfig:
    task: dict[str, Any] = field(default_factory=lambda: {
        "name": "synthetic", "num_clients": 10, "alpha": 1.0, "beta": 1.0, "hidden": [64], "batch_size": 32})
    geometry: dict[str, Any] = field(default_factory=lambda: {"preset": "scion"})
    algorithm: dict[str, Any] = field(default_factory=lambda: {
        "name": "gluon-ef21-sarah", "lr": 0.05, "schedule": "polynomial", "power": 0.5,
        "compressor": {"name": "topk", "ratio": 0.05}})
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
         replace: dict[str, Any] | None = None) -> DictConfig:
    """Defaults ← YAML file ← whole ``replace``d sections ← ``key=value`` overrides, then :func:`validate`.

    ``replace={"algorithm": {...}}`` swaps a section for a new mapping instead of merging into it (a
    sweep over algorithms whose options differ)."""
    try:
        cfg = OmegaConf.structured(ExperimentConfig)
        user = OmegaConf.create({})
        if path is not None:
            p = Path(path)
            if not p.exists():
                raise ConfigError(f"config file {p} not found")
            user = OmegaConf.merge(user, OmegaConf.load(p))
        for section, value in (replace or {}).items():
            if section not in SECTIONS or not isinstance(value, dict):
                raise ConfigError(f"only the sections {list(SECTIONS)} can be replaced by a mapping, got {section!r}")
            user[section] = value
            cfg[section] = {}
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"overrides must look like key=value, got {bad}")
            user = OmegaConf.merge(user, OmegaConf.from_dotlist(list(overrides)))
        for section in SECTIONS:
            named = user.get(section, {}).get("name") if isinstance(user.get(section), DictConfig) else None
            if named is not None and named != cfg[section].get("name"):
                cfg[section] = _defaults_that_apply(section, str(named), cfg[section])
            if isinstance(user.get(section), DictConfig):
                cfg[section] = _without_renamed_parts(cfg[section], user[section])
        cfg = OmegaConf.merge(cfg, user)
    except OmegaConfBaseException as err:
        raise ConfigError(_explain(err)) from None
    validate(cfg)
    return cfg


def _defaults_that_apply(section: str, name: str, defaults: DictConfig) -> dict[str, Any]:
    """When the user names another task or algorithm than the default one: a task keeps none of the
    default task's options (the same option name can mean different things, e.g. ``alpha``); an
    algorithm keeps the default options it accepts (``lr``, the schedule, ``compressor``…), which
    mean the same for every algorithm."""
    if section != "algorithm":
        return {}
    from .algorithms import ALGORITHMS

    cls = ALGORITHMS.get(name)
    if cls is None:
        return {}
    accepted = {**cls.BASE_OPTIONS, **cls.OPTIONS}
    kept = OmegaConf.to_container(defaults)
    assert isinstance(kept, dict)
    return {k: v for k, v in kept.items() if k in accepted}


def _without_renamed_parts(defaults: DictConfig, user: DictConfig) -> DictConfig:
    """Drop a default sub-mapping (a compressor, say) that the user replaces by one with another ``name``:
    ``{name: topk, ratio: 0.05}`` must not leave its ``ratio`` in ``{name: powersgd, rank: 2}``."""
    out = OmegaConf.to_container(defaults)
    assert isinstance(out, dict)
    for key, value in user.items():
        old = out.get(key)
        if isinstance(value, DictConfig) and isinstance(old, dict) and "name" in value and \
                value.get("name") != old.get("name"):
            del out[key]
    return OmegaConf.create(out)


def _explain(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or getattr(err, "key", None)
    msg = str(err).splitlines()[0]
    if "Key" in type(err).__name__ or "not in struct" in msg:
        allowed = sorted(f.name for f in ExperimentConfig.__dataclass_fields__.values())
        return f"unknown config key {key!r}; top-level keys are {allowed} (see fedgluon/config.py)"
    return f"bad value for {key!r}: {msg}"


def validate(cfg: DictConfig) -> None:
    """Check the typed fields, then build the task and algorithm once (their builders name bad options)."""
    from .algorithms import ALGORITHMS
    from .tasks import TASKS

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    need(cfg.rounds >= 0, f"rounds must be >= 0, got {cfg.rounds}")
    need(cfg.engine.name in ENGINES, f"engine.name must be one of {list(ENGINES)}, got {cfg.engine.name!r}")
    need(cfg.weights in ("uniform", "samples"), f"weights must be one of ['uniform', 'samples'], got {cfg.weights!r}")
    need(cfg.participation > 0, f"participation must be a fraction in (0, 1] or a client count, got {cfg.participation}")
    need(cfg.eval_every >= 1, f"eval_every must be >= 1, got {cfg.eval_every}")
    need(cfg.grad_norm_every >= 0, f"grad_norm_every must be >= 0, got {cfg.grad_norm_every}")
    need(cfg.engine.num_cpus > 0, f"engine.num_cpus must be > 0, got {cfg.engine.num_cpus}")
    need(cfg.engine.block_size >= 1, f"engine.block_size must be >= 1, got {cfg.engine.block_size}")
    need(cfg.engine.workers >= 1, f"engine.workers must be >= 1, got {cfg.engine.workers}")
    need(cfg.engine.workers == 1 or cfg.engine.name == "plain",
         f"engine.workers applies to engine.name='plain' only (Flower engines step one block per node), "
         f"got engine.workers={cfg.engine.workers} with engine.name={cfg.engine.name!r}")
    try:
        from .devices import resolve_device

        resolve_device("engine.client_device", cfg.engine.client_device)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    need(cfg.output.checkpoint_every >= 0, f"output.checkpoint_every must be >= 0, got {cfg.output.checkpoint_every}")
    need(cfg.round_timeout > 0, f"round_timeout must be > 0 seconds, got {cfg.round_timeout}")
    need(cfg.max_failed_rounds >= 0, f"max_failed_rounds must be an integer >= 0 (0: never stop), "
                                     f"got {cfg.max_failed_rounds}")
    for key in ("uplink_mbps", "downlink_mbps"):
        need(cfg.network[key] > 0, f"network.{key} must be > 0, got {cfg.network[key]}")
    from compressors import CONVENTIONS

    need(cfg.network.bits in CONVENTIONS, f"network.bits must be one of {list(CONVENTIONS)}, got {cfg.network.bits!r}")
    need(cfg.task.get("name") in TASKS, f"task.name must be one of {sorted(TASKS)}, got {cfg.task.get('name')!r}")
    need(cfg.algorithm.get("name") in ALGORITHMS,
         f"algorithm.name must be one of {sorted(ALGORITHMS)}, got {cfg.algorithm.get('name')!r}")
    try:
        from . import spec as specs

        specs.build_cached(spec_of(cfg))
    except ConfigError:
        raise
    except FileNotFoundError as err:
        raise ConfigError(f"task: {err}") from None
    except (ValueError, TypeError) as err:
        raise ConfigError(str(err)) from None


def spec_of(cfg: DictConfig) -> dict[str, Any]:
    """The engine-level run spec (fedgluon/spec.py) of a config."""
    from . import spec as specs

    c = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(c, dict)
    participation = c["participation"]
    if isinstance(participation, float) and participation > 1:
        participation = int(participation)
    return specs.normalise({"task": c["task"], "geometry": c["geometry"], "algorithm": c["algorithm"],
                            "rounds": c["rounds"], "seed": c["seed"], "participation": participation,
                            "weights": c["weights"], "eval_every": c["eval_every"], "threads": c["threads"],
                            "round_timeout": c["round_timeout"], "node_timeout": c["node_timeout"],
                            "faults": c["faults"], "block_size": c["engine"]["block_size"],
                            "client_device": c["engine"]["client_device"],
                            "max_failed_rounds": c["max_failed_rounds"]})


def run_name(cfg: DictConfig) -> str:
    return cfg.output.name or f"{cfg.algorithm['name']}-{cfg.task['name']}-s{cfg.seed}"
