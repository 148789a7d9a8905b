"""The Flower ``ClientApp``: one simulated client per call, driven by the algorithm's ``client_step``.

Handlers:
* ``query`` — the handshake: replies with the node's partition id (its stable client id,
  DESIGN §2) and its number of samples.
* ``train`` — receives the broadcast model, the round's flags and *this client's committed state*,
  runs ``client_step`` and replies with the encoded payload, the proposed new state and metrics.

Why the state travels with the messages: DESIGN §2 wants client state keyed by partition id,
committed only when the server accepts the payload, included in checkpoints and reachable from
every node of a multi-node run. Flower's ``context.state`` is per node, saved even when the server
has given up on the reply, and invisible to the server. Here the server keeps every client's
committed state, sends it with the round's message and commits the returned state only for
accepted payloads. State bytes are simulation bookkeeping: in a deployment they would stay on the
device, so they are never counted as communication (bits come from the payload alone).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from . import spec as specs
from .algorithms import Broadcast
from .faults import FaultPlan

APP_DIR = Path(__file__).resolve().parents[1]  # the Flower app (project) directory


def app_path(value: str) -> Path:
    """A path from the run config, relative paths resolved against the app directory (Flower's
    runtimes do not run apps in it)."""
    path = Path(value)
    return path if path.is_absolute() else APP_DIR / path


def spec_from_context(context: Context) -> dict[str, Any]:
    """The run spec for ``flwr run``: a YAML/JSON file named by run config ``spec-file``."""
    from omegaconf import OmegaConf

    path = app_path(str(context.run_config.get("spec-file", "experiments/quickstart.yaml")))
    return specs.normalise(OmegaConf.to_container(OmegaConf.load(path), resolve=True))  # type: ignore[arg-type]


def _ray_node() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # noqa: BLE001 - outside Ray there is no node id
        return ""


def make_client_app(spec: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp for ``spec`` (or, when None, for the spec named in the run config)."""
    fixed = specs.normalise(spec) if spec is not None else None
    app = ClientApp()

    def resolve(context: Context) -> dict[str, Any]:
        return fixed if fixed is not None else spec_from_context(context)

    @app.query()
    def hello(msg: Message, context: Context) -> Message:
        s = resolve(context)
        task, _ = specs.build_cached(s)
        pid = int(context.node_config["partition-id"])
        content = RecordDict({"hello": MetricRecord({"partition": pid, "num_samples": task.objectives[pid].num_samples})})
        return Message(content, reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        from strategies.records import (
            message_to_records,
            record_to_state,
            record_to_tensors,
            state_to_record,
        )

        s = resolve(context)
        torch.set_num_threads(int(s["threads"]))
        task, algorithm = specs.build_cached(s)
        pid = int(context.node_config["partition-id"])
        cfg = msg.content.config_records["config"]
        if int(cfg["partition"]) != pid:
            raise RuntimeError(f"message for partition {cfg['partition']} reached partition {pid}")
        bc = Broadcast(int(cfg["round"]), int(cfg["seed"]), record_to_tensors(msg.content.array_records["model"]),
                       {"refresh": int(cfg["refresh"])})
        state = record_to_state(msg.content.array_records["state"])
        FaultPlan.from_spec(s["faults"]).inject(bc.seed, pid, bc.round)  # no-op unless faults are configured
        new_state, reply = algorithm.client_step(state, bc, task.objectives[pid], pid)
        arrays, header = message_to_records(reply.message)
        content = RecordDict({
            "payload": arrays, "payload.header": header, "state": state_to_record(new_state),
            "metrics": MetricRecord({"partition": pid, "round": bc.round, "loss": reply.loss,
                                     "grad_evals": reply.grad_evals, "samples": reply.samples}),
            "info": ConfigRecord({"ray_node": _ray_node(), "pid": os.getpid()}),
        })
        return Message(content, reply_to=msg)

    return app


app = make_client_app()  # `flwr run .` entry point (pyproject [tool.flwr.app.components])
