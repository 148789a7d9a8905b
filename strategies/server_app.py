"""The Flower ``ServerApp``: builds the task and algorithm from the run spec and runs GluonStrategy.

``make_server_app(spec, sink)`` is used by fedgluon's engines (the spec is captured, or read from the
run's context when ``spec`` is None; results go to ``sink``). The ``flwr run .`` entry point, which reads
a whole ``fedgluon run`` config and writes its run directory, is ``fedgluon.exp.deployed.app``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedgluon.config import spec as specs
from fedgluon.flower import dispatch
from fedgluon.flower.client_app import spec_from_context
from fedgluon.flower.deployment import VersionCheckedGrid, wait_for_nodes
from fedgluon.flower.dispatch import WakingGrid
from fedgluon.flower.wire import tensors_to_record
from fedgluon.sim.checkpoint import Checkpointer, Snapshot
from fedgluon.sim.federation import Evaluate
from strategies.strategy import GluonStrategy

# Seconds between the server's polls for replies. Flower's simulation Grid (InMemoryGrid) sleeps
# 0.1 s between polls, up to 0.1 s added to every round; polling the in-memory state every 5 ms costs
# little CPU (BENCHMARKS.md, "Process tuning"). Under fedgluon.flower.engines.run_ray the Grid is also
# wrapped to wake on each stored reply instead (fedgluon.flower.dispatch, which also wakes Flower's
# dispatch thread on each push).
POLL_INTERVAL = 0.005


def poll_faster(grid: Grid, interval: float = POLL_INTERVAL) -> None:
    """Lower the Grid's reply-polling interval to ``interval`` where it has one (Flower's InMemoryGrid
    documents ``pull_interval``); other grids are left as they are."""
    current = getattr(grid, "pull_interval", None)
    if isinstance(current, (int, float)) and not isinstance(current, bool) and current > interval:
        grid.pull_interval = interval  # type: ignore[attr-defined]


def serve(grid: Grid, spec: Mapping[str, Any], on_round: Callable[[dict[str, Any]], None] | None = None,
          evaluate: Evaluate | None = None, checkpointer: Checkpointer | None = None,
          resume: Snapshot | None = None) -> GluonStrategy:
    """Run a whole federated training over ``grid`` (or what is left of it after ``resume``); returns the
    strategy (history, states). ``evaluate(X, k)`` replaces the task's central evaluation (e.g. to add
    the true gradient's norm)."""
    task, algorithm = specs.build_cached(spec)
    X0 = task.initial_params()
    strategy = GluonStrategy(algorithm, X0, task.num_clients, seed=spec["seed"], participation=spec["participation"],
                             weights=spec["weights"], evaluate=evaluate or (lambda X, k: task.evaluate(X)),
                             eval_every=spec["eval_every"], on_round=on_round, rounds=spec["rounds"],
                             checkpointer=checkpointer, resume=resume, block_size=int(spec["block_size"]),
                             sizes=[objective.num_samples for objective in task.objectives],
                             max_failed_rounds=int(spec["max_failed_rounds"]),
                             schema=algorithm.state_schema(task.objectives[0], X0, spec["seed"]),
                             deaths_stop_run=not getattr(grid, "remote", False))  # SuperNodes restart ClientApps
    poll_faster(grid)
    wake = dispatch.active()
    if wake is not None:  # Flower's simulation under fedgluon.flower.engines.run_ray: event-driven hand-off
        grid = WakingGrid(grid, wake, on_reply=strategy.read_reply)  # type: ignore[assignment]
    wait_for_nodes(grid, task.num_clients, int(spec["block_size"]), float(spec["node_timeout"]))
    strategy.connect(VersionCheckedGrid(grid), timeout=float(spec["node_timeout"]))  # type: ignore[arg-type]
    strategy.start(grid=grid, initial_arrays=tensors_to_record(strategy.server_state["X"]),
                   timeout=float(spec["round_timeout"]))
    return strategy


def make_server_app(spec: Mapping[str, Any] | None = None, sink: list | None = None,
                    on_round: Callable[[dict[str, Any]], None] | None = None, evaluate: Evaluate | None = None,
                    checkpointer: Checkpointer | None = None, resume: Snapshot | None = None) -> ServerApp:
    """The ServerApp of ``spec``. With a ``sink``, what ends the run goes there and the app returns: the strategy,
    or the exception that stopped it (the engine raises it again; Flower's simulation, flwr 1.42, waits 3 s for
    the result of a ServerApp that raised). Without one, an exception propagates to Flower."""
    fixed = specs.normalise(spec) if spec is not None else None
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        s = fixed if fixed is not None else spec_from_context(context)
        try:
            strategy = serve(grid, s, on_round, evaluate, checkpointer, resume)
        except Exception as err:  # noqa: BLE001 - handed over whole, raised again by the engine
            if sink is None:
                raise
            sink.append(err)
            return
        if sink is not None:
            sink.append(strategy)

    return app
