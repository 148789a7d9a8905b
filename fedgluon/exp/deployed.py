"""``flwr run .``'s ServerApp (``pyproject.toml``'s ``serverapp``): a whole ``fedgluon run`` over a Flower
deployment (README "Flower deployment"), writing the same run directory to an absolute directory; a run that
fails leaves ``"complete": false`` and the reason in its ``summary.json`` (``flwr run`` exits 0 either way).
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedgluon.config.schema import ConfigError
from fedgluon.core.text import shown
from fedgluon.exp.experiment import run
from fedgluon.flower import deployment
from fedgluon.sim.checkpoint import RunStopped

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    deployed_run(grid, context)


def deployed_run(grid: Grid, context: Context) -> None:
    """``flwr run``'s ServerApp: run the config the Flower run config names (fedgluon/flower/deployment.py) over
    ``grid`` and write its run directory; on any failure, ``"complete": false`` and the reason go to the
    run directory's summary.json (when the directory can be named) before the error propagates to
    Flower, which marks the run failed."""
    out = None
    try:
        cfg = deployment.load_config(context.run_config)
        _, _, root, resume, _ = deployment.run_settings(context.run_config)
        out = deployment.run_dir(cfg, root)
        run(cfg, progress=False, out_dir=out, resume=resume, grid=deployment.PollingGrid(grid, remote=_remote(grid)))
    except BaseException as err:
        if isinstance(err, ConfigError) and ("--overwrite" in str(err) or "--resume" in str(err)):
            # fedgluon run's flags; flwr run's keys
            err = ConfigError(str(err).replace("--overwrite", "--run-config overwrite=true")
                              .replace("--resume", "--run-config resume=true"))
        if out is not None:  # a RunStopped wrote its own reason with the run's files
            deployment.record_failure(out, _reason(err), replace=not isinstance(err, RunStopped))
        raise err from None


def _remote(grid: Grid) -> bool:
    """Whether ``grid`` reaches SuperNodes over a SuperLink (Flower's ``HttpGrid``, as ``flwr run`` on a
    deployment gives the ServerApp), not a simulation runtime's in-memory nodes."""
    try:
        from flwr.superlink.grid import HttpGrid
    except ImportError:  # another flwr layout: treat it as a deployment, whose codes never stop the run
        return True
    return isinstance(grid, HttpGrid)


def _reason(err: BaseException) -> str:
    """A failure as summary.json's ``stopped``; a SuperLink's 401 (it no longer serves this run: ``flwr
    stop``, or its token expired) says so, since the HTTP error alone does not."""
    text = f"{type(err).__name__}: {shown(err, 1000, as_repr=False)}"
    if "401" in text and "Unauthorized" in text:
        text = f"the SuperLink no longer serves this run (stopped with flwr stop?): {text}"
    return text
