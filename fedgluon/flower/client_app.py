"""The Flower ``ClientApp``: one node per call steps its block of simulated clients (``Algorithm.step_block``).

Each node simulates a block of ``block_size`` virtual clients (fedgluon/clients/blocks.py; one client per
node by default). Handlers:
* ``query`` — the handshake: builds the task and, in a Ray worker, makes torch.func's first call and freezes
  what the process holds (``_settle``; fedgluon/runtime/gc_pause.py); replies with the node's block, its
  virtual clients' stable ids (their partition ids, docs/DESIGN.md §2) and their numbers of samples.
* ``train`` — receives the broadcast model, the round's flags, the sampled clients of this block
  and *their committed rows of the client-state table* (``states``, and the models their ``X_prev``
  points at, ``prev``), runs their client step over the block (one vmapped gradient call and one
  compression call per layer) and replies with the payload groups, the proposed state columns and the
  metrics (``replies`` and ``meta``, fedgluon/flower/wire.py); clients whose injected fault raised are
  listed in ``failed``.

Why the state travels with the messages, and is committed only for accepted payloads: docs/DESIGN.md §2,
"Client state".
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from functools import cache, lru_cache
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedgluon.algorithms import Broadcast
from fedgluon.clients.blocks import block_clients
from fedgluon.clients.vectorised import warm_up
from fedgluon.config import spec as specs
from fedgluon.runtime import prepare_process
from fedgluon.runtime.gc_pause import freeze_once, gc_paused
from fedgluon.runtime.threads import torch_threads
from fedgluon.runtime.trace import phase
from fedgluon.sim.faults import FaultPlan, InjectedFault


def spec_from_context(context: Context) -> dict[str, Any]:
    """The run spec for ``flwr run``: the ``fedgluon run`` config named by the run config (``spec-file``,
    ``overrides``; fedgluon/flower/deployment.py), read and validated once per process and config."""
    from fedgluon.flower.deployment import spec_of_run_config

    return spec_of_run_config(context.run_config)


def _in_ray_worker() -> bool:
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE
    except Exception:  # noqa: BLE001 - no Ray, or not a worker
        return False


def _ray_task() -> dict[str, str]:
    """This Ray task's node id and the ids of the GPUs Ray assigned it (its ``engine.num_gpus`` share),
    comma-separated; empty strings outside Ray."""
    try:
        import ray

        if ray.is_initialized():
            context = ray.get_runtime_context()
            return {"ray_node": context.get_node_id(),
                    "ray_gpus": ",".join(map(str, context.get_accelerator_ids().get("GPU", [])))}
    except Exception:  # noqa: BLE001 - outside a Ray task there is no node and no accelerator
        pass
    return {"ray_node": "", "ray_gpus": ""}


def _clients_of(context: Context, spec: Mapping[str, Any], num_clients: int) -> list[int]:
    """The virtual clients simulated by this node (fedgluon.clients.blocks): block ``partition-id``."""
    return block_clients(int(context.node_config["partition-id"]), num_clients, int(spec["block_size"]))


@cache
def _settle() -> None:
    """In a Ray worker, a process that serves this run's messages until it ends, once, after its first message
    has built the task and before that message's records are read: torch.func's first call (``warm_up``),
    then :func:`~fedgluon.runtime.gc_pause.freeze_once`, so what the process has built stays out of every
    later collection. Elsewhere nothing: a deployed ClientApp process handles one message and exits, and
    the in-process engine's is the driver."""
    if _in_ray_worker():
        warm_up()
        freeze_once()


class SpecClientApp(ClientApp):
    """A ClientApp made by :func:`make_client_app` for a fixed spec, which pickles as that recipe.

    Flower's simulation engine sends the app to its Ray actor with every message, cloudpickled by
    value (the handlers are closures), which costs the driver time per message (BENCHMARKS.md, "Process
    tuning"). This one pickles as ``(client_app_for, spec as JSON)``, and each actor process builds the app once per
    spec and keeps it."""

    def __init__(self, spec_json: str):
        super().__init__()
        self.spec_json = spec_json

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return client_app_for, (self.spec_json,)


def client_app_for(spec_json: str) -> ClientApp:
    """The ClientApp of a spec given as JSON, made once per process (:class:`SpecClientApp`); the process
    is a worker of the run, prepared as fedgluon's (fedgluon/runtime/process.py)."""
    prepare_process(threads=int(json.loads(spec_json)["threads"]))
    return _client_app_for(spec_json)


@lru_cache(maxsize=8)
def _client_app_for(spec_json: str) -> ClientApp:
    return make_client_app(json.loads(spec_json))


def _as_json(spec: Mapping[str, Any] | None) -> str | None:
    """``spec`` as JSON when it comes back from JSON unchanged (else None: the app pickles by value)."""
    if spec is None:
        return None
    try:
        text = json.dumps(spec, sort_keys=True)
        return text if specs.normalise(json.loads(text)) == spec else None
    except (TypeError, ValueError):
        return None


def make_client_app(spec: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp for ``spec`` (or, when None, for the spec named in the run config)."""
    fixed = specs.normalise(spec) if spec is not None else None
    text = _as_json(fixed)
    app = ClientApp() if text is None else SpecClientApp(text)

    def resolve(context: Context) -> dict[str, Any]:
        return fixed if fixed is not None else spec_from_context(context)

    @app.query()
    def hello(msg: Message, context: Context) -> Message:
        s = resolve(context)
        with torch_threads(int(s["threads"])):  # the task is built as in every engine (fedgluon.runtime.threads)
            task, _ = specs.build_cached(s)
        _settle()
        clients = _clients_of(context, s, task.num_clients)
        from fedgluon.flower.deployment import versions

        content = RecordDict({"hello": MetricRecord({
            "block": int(context.node_config["partition-id"]), "clients": clients,
            "num_samples": [task.objectives[j].num_samples for j in clients]}),
            "versions": ConfigRecord(versions())})  # checked by the server (fedgluon.flower.deployment.check_versions)
        return Message(content, reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        s = resolve(context)
        # the spec's torch threads for this step only: the in-process engine's server shares this process
        with gc_paused(), torch_threads(int(s["threads"])), \
                phase("node", int(msg.metadata.group_id) if msg.metadata.group_id.isdigit() else -1):
            return _train(msg, context, s)

    def _train(msg: Message, context: Context, s: dict[str, Any]) -> Message:
        from fedgluon.flower.wire import record_to_rows, record_to_tensors, results_to_records
        task, algorithm = specs.build_cached(s)
        _settle()  # once the task is built, before the records are read: here if this actor had no handshake
        mine = _clients_of(context, s, task.num_clients)
        # Flower rebuilds these typed views on every access (O(records)): take them once
        arrays, cfg = msg.content.array_records, msg.content.config_records["config"]
        asked = [int(j) for j in cfg["clients"]]
        if not set(asked) <= set(mine):
            raise RuntimeError(f"message for clients {asked} reached the node of clients {mine}")
        bc = Broadcast(int(cfg["round"]), int(cfg["seed"]), record_to_tensors(arrays["model"]),
                       {"refresh": int(cfg["refresh"])}, phase=int(cfg.get("phase", 0)),
                       extra=record_to_tensors(arrays["extra"]) if "extra" in arrays else {})  # Algorithm.phases
        faults = FaultPlan.from_spec(s["faults"])
        failed, working = ConfigRecord(), []
        for j in asked:  # a raise fails its own client; a delay makes the whole node late; a death ends it
            try:
                faults.inject(bc.seed, j, bc.round, exit_process=_in_ray_worker(), phase=bc.phase)
                working.append(j)
            except InjectedFault as err:
                failed[str(j)] = f"InjectedFault: {err}"
        with phase("unpack", bc.round):
            rows = record_to_rows(asked, arrays["states"], arrays["prev"]).select(working)
        with phase("compute", bc.round):
            results = algorithm.step_block(rows, bc, task.objectives) if working else []
        with phase("pack", bc.round):
            replies, meta = results_to_records(results, algorithm.derived)
        info = ConfigRecord({**_ray_task(), "pid": os.getpid(), "device": str(algorithm.client_device)})
        return Message(RecordDict({"failed": failed, "info": info, "replies": replies, "meta": meta}), reply_to=msg)

    return app


app = make_client_app()  # `flwr run .` entry point (pyproject [tool.flwr.app.components])
