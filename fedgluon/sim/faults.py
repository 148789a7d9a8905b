"""Fault injection for testing and for studying stragglers: client tasks that raise, that miss the
round's deadline, and a Ray actor that dies.

Which client task fails is decided by one uniform draw ``u`` from
``generator(seed, "fault", client, round)``: ``u < raise_prob`` raises, ``u < raise_prob + delay_prob``
sleeps ``delay_s`` seconds before computing (the server's round deadline, ``round_timeout``, must be
shorter for the reply to count as late). The draw is the same in every engine and independent of
scheduling, so the expected failures of a run are known in advance. ``die`` names
``[round, client]`` tasks whose process exits (``os._exit``) inside a Ray worker; outside Ray the
task raises :class:`SimulatedActorDeath`, which the in-process grid (the runtime there) reports with
the error code of a crashed ClientApp, as Ray's reports a dead actor. The server takes only such
runtime error codes for a dead worker (``strategies.strategy.runtime_failure``), never a client's own words.

Spec form (run spec key ``faults``)::

    {"raise_prob": 0.1, "delay_prob": 0.1, "delay_s": 1.0, "die": [[3, 0]], "phase": 0}

``phase``: the client phase of a round whose tasks the faults strike (algorithms with several phases
per round, ``Algorithm.phases``; default 0, the first and, for most algorithms, the only one).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fedgluon.core.rng import generator

DEFAULTS: dict[str, Any] = {"raise_prob": 0.0, "delay_prob": 0.0, "delay_s": 0.0, "die": [], "phase": 0}


class InjectedFault(RuntimeError):
    """A client task failure requested by the fault configuration."""


class SimulatedActorDeath(RuntimeError):
    """An injected actor death outside Ray (there is no actor process to kill)."""


@dataclass(frozen=True)
class FaultPlan:
    raise_prob: float = 0.0
    delay_prob: float = 0.0
    delay_s: float = 0.0
    die: tuple[tuple[int, int], ...] = field(default_factory=tuple)
    phase: int = 0

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any] | None) -> FaultPlan:
        spec = dict(spec or {})
        unknown = set(spec) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"faults got unknown key(s) {sorted(unknown)}; allowed: {sorted(DEFAULTS)}")
        opts = {**DEFAULTS, **spec}
        p_raise, p_delay, delay = float(opts["raise_prob"]), float(opts["delay_prob"]), float(opts["delay_s"])
        if not (0 <= p_raise <= 1 and 0 <= p_delay <= 1 and p_raise + p_delay <= 1):
            raise ValueError(f"faults.raise_prob and faults.delay_prob must be in [0, 1] with a sum <= 1, "
                             f"got {p_raise} and {p_delay}")
        if delay < 0:
            raise ValueError(f"faults.delay_s must be >= 0, got {delay}")
        die = opts["die"]
        if not isinstance(die, Sequence) or not all(isinstance(d, Sequence) and len(d) == 2 for d in die):
            raise ValueError(f"faults.die must be a list of [round, client] pairs, got {die!r}")
        phase = opts["phase"]
        if isinstance(phase, bool) or not isinstance(phase, int) or phase < 0:
            raise ValueError(f"faults.phase must be an integer >= 0, got {phase!r}")
        return cls(p_raise, p_delay, delay, tuple((int(k), int(j)) for k, j in die), phase)

    def draw(self, seed: int, client: int, k: int, phase: int = 0) -> str | None:
        """``"die"``, ``"raise"``, ``"delay"`` or None for client ``client`` in phase ``phase`` of round ``k``
        (None in every phase but the plan's)."""
        if phase != self.phase:
            return None
        if (k, client) in self.die:
            return "die"
        if not (self.raise_prob or self.delay_prob):
            return None
        u = float(torch.rand((), generator=generator(seed, "fault", client, k)))
        if u < self.raise_prob:
            return "raise"
        if u < self.raise_prob + self.delay_prob:
            return "delay"
        return None

    def inject(self, seed: int, client: int, k: int, exit_process: bool = False, phase: int = 0) -> None:
        """Act out this task's fault inside the client: raise, sleep, or die, which ends the process
        (``os._exit``) when ``exit_process`` (the caller runs in a Ray worker) and raises
        :class:`SimulatedActorDeath` otherwise."""
        kind = self.draw(seed, client, k, phase)
        if kind == "raise":
            raise InjectedFault(f"injected fault: client {client} raised in round {k}")
        if kind == "delay":
            time.sleep(self.delay_s)
        elif kind == "die":
            if exit_process:
                os._exit(1)
            raise SimulatedActorDeath(f"injected actor death: client {client} in round {k}")
