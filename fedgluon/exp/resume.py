"""Resuming a run: what its checkpoint must match (:func:`run_key`: the run spec without the fields of the
environment, :data:`ENVIRONMENT`), the checks before a resume starts (:func:`to_resume`, :func:`check_table`),
each a one-line ConfigError naming what differs, and which stops a resume can get past (:func:`resumable`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedgluon.config import spec as specs
from fedgluon.config.run_dir import is_complete
from fedgluon.config.schema import ConfigError
from fedgluon.config.sections import differences, dotted, listed
from fedgluon.sim.checkpoint import CheckpointError, NonFiniteStateError, RunStopped, Snapshot
from fedgluon.sim.checkpoint import load as load_checkpoint
from fedgluon.sim.checkpoint import sweep as sweep_checkpoint

CHECKPOINT = "checkpoint.pt"
ENVIRONMENT = tuple("threads round_timeout node_timeout faults block_size client_device max_failed_rounds".split())
"""The spec fields that may change when a run is resumed."""


def run_key(spec: Mapping[str, Any]) -> str:
    """What a checkpoint must match to be resumed: the spec without the fields of the environment
    (threads, timeouts, injected faults, client block size), so a run checkpointed on Ray may resume
    in-process, or without the fault that stopped it."""
    return specs.key({k: v for k, v in spec.items() if k not in ENVIRONMENT})


def resumable(err: RunStopped) -> bool:
    """Whether resuming can get past this stop: not past a NaN/Inf of the server's (the resumed run replays
    the same round; only a new run with a smaller radius helps)."""
    return not isinstance(err, NonFiniteStateError)


def to_resume(out: Path, spec: Mapping[str, Any]) -> Snapshot:
    """The checkpoint in ``out`` that a run of ``spec`` may resume, after checking it: a ConfigError naming
    what is wrong otherwise (a complete run, no or a damaged checkpoint, another config, more rounds)."""
    if is_complete(out):
        raise ConfigError(f"{out} holds a complete run; nothing to resume")
    path = out / CHECKPOINT
    if not path.exists():
        raise ConfigError(f"{out} has no {CHECKPOINT} to resume from; rerun it with --overwrite")
    try:
        snapshot = load_checkpoint(path)
    except CheckpointError as err:
        raise ConfigError(f"{err}; start the run again with --overwrite") from None
    if snapshot.run_key != run_key(spec):
        raise ConfigError(f"{path} was written by a run with another config ({_changes(snapshot.run_key, spec)}); "
                          f"only engine, network and output settings, {', '.join(ENVIRONMENT)} may change on resume")
    if snapshot.next_round > spec["rounds"]:
        raise ConfigError(f"{path} cannot be resumed: it is at round {snapshot.next_round}, the run has "
                          f"{spec['rounds']} rounds")
    sweep_checkpoint(path, snapshot)  # temporary files and journals that killed saves left in this run directory
    return snapshot


def _changes(saved_key: str, spec: Mapping[str, Any]) -> str:
    """The fields in which ``spec`` differs from the run a checkpoint's ``run_key`` was made from, as
    ``key: saved -> now`` (the first three), for the refusal of a resume."""
    try:
        saved = dotted(json.loads(saved_key))
    except (ValueError, TypeError, AttributeError):  # a key this fedgluon did not write
        return "its run key differs"
    return listed(differences(saved, dotted(json.loads(run_key(spec))))) or "its run key differs"


def check_table(path: Path, snapshot: Snapshot, task: Any, algorithm: Any, seed: int) -> None:
    """ConfigError (one line) when the checkpoint's client-state table does not fit this run: another number
    of clients, or another schema. Checked before any engine starts, since an engine's server may run where
    its errors are not ours to report. Its peak memory is the resumed federation's own (a zero table and the
    loaded copy)."""
    from fedgluon.clients.table import ClientStateTable

    commits = snapshot.client_states.get("commits") if isinstance(snapshot.client_states, dict) else None
    held = int(commits.shape[0]) if hasattr(commits, "shape") and len(commits.shape) == 1 else None  # None: unknown
    if held != len(task.objectives):
        raise ConfigError(f"{path} cannot be resumed: it holds the states of {held} clients, the run has "
                          f"{len(task.objectives)}")

    schema = algorithm.state_schema(task.objectives[0], task.initial_params(), seed)
    table = ClientStateTable(schema, len(task.objectives), keep_models=algorithm.needs_previous)
    try:
        table.load_state_dict(snapshot.client_states)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ConfigError(f"{path} cannot be resumed: {str(err).splitlines()[0] if str(err) else err!r}; "
                          f"start the run again with --overwrite") from None
