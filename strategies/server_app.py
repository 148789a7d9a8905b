"""The Flower ``ServerApp``: builds the task and algorithm from the run spec and runs GluonStrategy.

``make_server_app(spec, sink)`` is used by fedgluon's engines (the spec is captured; results go to
``sink``); the module-level ``app`` is the ``flwr run .`` entry point: it reads the ``fedgluon run``
config named by the Flower run config (fedgluon/deployment.py) and writes the same run directory as
``fedgluon run`` (fedgluon/experiment.py), to an absolute directory. A run that fails leaves
``"complete": false`` and the reason in its ``summary.json`` (``flwr run`` exits 0 either way).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedgluon import dispatch
from fedgluon import spec as specs
from fedgluon.checkpoint import Checkpointer, Snapshot
from fedgluon.client_app import spec_from_context
from fedgluon.deployment import VersionCheckedGrid, wait_for_nodes
from fedgluon.dispatch import WakingGrid
from fedgluon.federation import Evaluate
from fedgluon.gc_pause import gc_frozen

from .wire import tensors_to_record
from .strategy import GluonStrategy

# Seconds between the server's polls for replies. Flower's simulation Grid (InMemoryGrid) sleeps
# 0.1 s between polls, up to 0.1 s added to every round (0.5 ms per client task at 200 clients, as
# much as the clients' whole work in blocks); polling the in-memory state every 5 ms costs ~1% of a
# core. Under fedgluon.engines.run_ray the Grid is also wrapped to wake on each stored reply instead
# (fedgluon.dispatch, which also wakes Flower's dispatch thread on each push).
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
                             schema=algorithm.state_schema(task.objectives[0], X0, spec["seed"]))
    poll_faster(grid)
    wake = dispatch.active()
    if wake is not None:  # Flower's simulation under fedgluon.engines.run_ray: event-driven hand-off
        grid = WakingGrid(grid, wake, on_reply=strategy.read_reply)  # type: ignore[assignment]
    wait_for_nodes(grid, task.num_clients, int(spec["block_size"]), float(spec["node_timeout"]))
    strategy.connect(VersionCheckedGrid(grid), timeout=float(spec["node_timeout"]))  # type: ignore[arg-type]
    with gc_frozen():
        strategy.start(grid=grid, initial_arrays=tensors_to_record(strategy.server_state["X"]),
                       timeout=float(spec["round_timeout"]))
    return strategy


def make_server_app(spec: Mapping[str, Any] | None = None, sink: list | None = None,
                    on_round: Callable[[dict[str, Any]], None] | None = None, evaluate: Evaluate | None = None,
                    checkpointer: Checkpointer | None = None, resume: Snapshot | None = None) -> ServerApp:
    fixed = specs.normalise(spec) if spec is not None else None
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if fixed is None and sink is None:  # flwr run: the whole run, with its run directory
            deployed_run(grid, context)
            return
        s = fixed if fixed is not None else spec_from_context(context)
        strategy = serve(grid, s, on_round, evaluate, checkpointer, resume)
        if sink is not None:
            sink.append(strategy)

    return app


def deployed_run(grid: Grid, context: Context) -> None:
    """``flwr run``'s ServerApp: run the config the Flower run config names (fedgluon/deployment.py) over
    ``grid`` and write its run directory; on any failure, ``"complete": false`` and the reason go to the
    run directory's summary.json (when the directory can be named) before the error propagates to
    Flower, which marks the run failed."""
    from fedgluon import deployment
    from fedgluon.config import ConfigError
    from fedgluon.experiment import run

    out = None
    try:
        cfg = deployment.load_config(context.run_config)
        _, _, root, resume, _ = deployment.run_settings(context.run_config)
        out = deployment.run_dir(cfg, root)
        run(cfg, progress=False, out_dir=out, resume=resume, grid=deployment.PollingGrid(grid))
    except BaseException as err:
        if isinstance(err, ConfigError) and "--overwrite" in str(err):  # fedgluon run's flag; flwr run's key
            err = ConfigError(str(err).replace("--overwrite", "--run-config overwrite=true"))
        if out is not None:
            deployment.record_failure(out, f"{type(err).__name__}: {err}")
        raise err from None


app = make_server_app()
