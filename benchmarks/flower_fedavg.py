"""Stock Flower: the built-in ``FedAvg`` strategy and a plain ``ClientApp``, doing the same gradient work
as fedgluon's clients — the baseline row of ``bench_engines``.

Each client task loads the broadcast ``ArrayRecord`` into the benchmark task's model, computes one
minibatch gradient on its partition (the same objective, batch and seed scheme as fedgluon), takes
one SGD step and returns the parameters as an ``ArrayRecord`` with ``num-examples``; ``FedAvg``
averages them. Round times come from ``evaluate_fn``, which Flower calls once before the first round
and after every round.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch

from fedgluon.config import spec as specs
from fedgluon.core.rng import generator


def _client_app(spec: Mapping[str, Any]):
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        task, _ = specs.build_cached(spec)
        j = int(context.node_config["partition-id"])
        objective = task.objectives[j]
        params = {n: t for n, t in msg.content["arrays"].to_torch_state_dict().items()}
        k = int(msg.content["config"]["server-round"])
        _, grads = objective.gradient(params, objective.sample_batch(generator(spec["seed"], "sample", j, k)))
        new = {n: params[n] - 0.05 * grads[n] for n in params}
        content = RecordDict({"arrays": ArrayRecord(new),
                              "metrics": MetricRecord({"num-examples": objective.num_samples})})
        return Message(content=content, reply_to=msg)

    return app


def _server_app(spec: Mapping[str, Any], num_clients: int, rounds: int, stamps: list[float]):
    from flwr.app import ArrayRecord, Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        task, _ = specs.build_cached(spec)
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=num_clients,
                          min_available_nodes=num_clients)

        def record(server_round: int, arrays: ArrayRecord) -> None:
            stamps.append(time.perf_counter())

        strategy.start(grid=grid, initial_arrays=ArrayRecord(task.initial_params()), num_rounds=rounds,
                       evaluate_fn=record)

    return app


def run_stock_fedavg(spec: Mapping[str, Any], num_cpus: float = 1) -> list[float]:
    """Seconds of each round of stock Flower FedAvg on Flower's Ray simulation engine, one client per node."""
    from flwr.simulation import run_simulation

    from fedgluon.flower.engines import _quiet

    _quiet()
    s = specs.normalise(spec)
    task, _ = specs.build_cached(s)
    stamps: list[float] = []
    run_simulation(server_app=_server_app(s, task.num_clients, s["rounds"], stamps), client_app=_client_app(s),
                   num_supernodes=task.num_clients,
                   backend_config={"client_resources": {"num_cpus": num_cpus, "num_gpus": 0.0},
                                   "init_args": {"address": "local", "include_dashboard": False}})
    if len(stamps) != s["rounds"] + 1:
        raise RuntimeError(f"stock FedAvg ran {len(stamps) - 1} of {s['rounds']} rounds (see the Flower log)")
    return [b - a for a, b in zip(stamps[:-1], stamps[1:])]
