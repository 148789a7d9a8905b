"""Problems and assertions shared by tests/unit and tests/integration (importable as ``helpers``: pyproject's pytest
``pythonpath`` puts tests/ on the path). A helper used by one module stays in that module."""

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from fedgluon.clients.objective import SupervisedObjective
from fedgluon.clients.table import nest
from fedgluon.config import spec as specs
from fedgluon.lmo.geometry import Geometry
from fedgluon.sim import checkpoint
from fedgluon.sim.checkpoint import Checkpointer, RunInterrupted, Snapshot
from fedgluon.sim.driver import RunResult, run_plain
from fedgluon.sim.faults import FaultPlan
from fedgluon.sim.metrics import TIMING_COLUMNS
from fedgluon.tasks.data.synthetic import leaf_synthetic
from fedgluon.tasks.models import MLP


def run_inprocess(spec: Mapping[str, Any], **kwargs: Any) -> Any:
    """Flower's in-process engine (``fedgluon.flower.engines.run_inprocess``), or the calling test skipped where
    Flower is not installed: the GPU machine the CUDA tests run on has torch but neither Flower nor Ray, so
    modules that test the GPU paths import Flower only in the tests that compare against its engines."""
    pytest.importorskip("flwr", reason="Flower is not installed (the GPU machine has none)")
    from fedgluon.flower.engines import run_inprocess as run

    return run(spec, **kwargs)


def client_state(table, j: int) -> dict[str, Any]:
    """Client ``j``'s committed state in a client-state table, as a tree of row views."""
    return nest({p: c[j] for p, c in table.columns.items()})


def journal_path(path: str | Path) -> Path:
    """The rows journal that the checkpoint at ``path`` names (it must exist and be readable)."""
    path = Path(path)
    return path.with_name(checkpoint._read_payload(path)["journal"]["name"])


def same_table(a, b) -> None:
    """Two client-state tables hold bitwise the same rows, commit counters, rounds seen and models."""
    assert a.columns.keys() == b.columns.keys() and all(torch.equal(a.columns[p], b.columns[p]) for p in a.columns)
    assert torch.equal(a.commits, b.commits) and torch.equal(a.seen, b.seen)
    assert a.models.keys() == b.models.keys()
    assert all(a.models[r].keys() == b.models[r].keys() and all(torch.equal(a.models[r][n], b.models[r][n])
                                                               for n in a.models[r]) for r in a.models)


def same_metrics(a: pd.DataFrame, b: pd.DataFrame, loss_rtol: float = 0.0) -> None:
    """Equal in every column but wall time (and the mean training loss to ``loss_rtol``: client blocks
    reduce each batch's loss in another order)."""
    skip = (*TIMING_COLUMNS, "train_loss") if loss_rtol else TIMING_COLUMNS
    cols = [c for c in a.columns if c not in skip]
    assert sorted(cols) == sorted(c for c in b.columns if c not in skip)
    pd.testing.assert_frame_equal(a[cols], b[cols], check_exact=True)
    if loss_rtol:
        pd.testing.assert_series_equal(a["train_loss"], b["train_loss"], rtol=loss_rtol)


def plain_run(spec: Mapping[str, Any], evaluate: bool = True, **kw: Any) -> RunResult:
    """The plain driver's run of a run spec (fedgluon/config/spec.py): its rounds, seed, participation and
    faults, the task evaluated every round unless ``evaluate`` is false; ``kw`` goes to ``run_plain``
    (``block_size``, say: the spec's is not applied, so a Flower run in blocks is compared with one client
    at a time)."""
    s = specs.normalise(spec)
    task, algo = specs.build(s)
    return run_plain(algo, task.objectives, task.initial_params(), s["rounds"], seed=s["seed"],
                     participation=s["participation"], faults=FaultPlan.from_spec(s["faults"]),
                     evaluate=(lambda X, k: task.evaluate(X)) if evaluate else None, **kw)


def plain_frame(spec: Mapping[str, Any], **kw: Any) -> pd.DataFrame:
    """The metrics of :func:`plain_run`."""
    return plain_run(spec, **kw).frame()


def plain_table(spec: Mapping[str, Any], **kw: Any):
    """The client-state table after :func:`plain_run` (no evaluation: the table does not depend on it)."""
    return plain_run(spec, evaluate=False, **kw).table


def stop_and_resume(algo, objectives, X0: Mapping[str, torch.Tensor], rounds: int, stop_at: int, path: Path,
                    at_stop: Callable[[Snapshot], None] | None = None, **kw: Any) -> tuple[RunResult, RunResult]:
    """Run ``rounds`` rounds of the plain driver uninterrupted; again with a checkpoint at ``path`` and a stop
    requested in round ``stop_at`` (as SIGTERM does), which must stop the run after that round; then resumed
    from the checkpoint to the end. The resumed run must equal the uninterrupted one bitwise: metrics (wall
    times aside), client log, final model and client-state table. ``at_stop(snapshot)`` checks the checkpoint
    before the resume; ``kw`` goes to every ``run_plain`` call. Returns the uninterrupted and resumed runs."""
    def start():
        return {n: t.clone() for n, t in X0.items()}

    full = run_plain(algo, objectives, start(), rounds, **kw)
    stopper = Checkpointer(path)

    def stop(row):
        if row["round"] == stop_at:
            stopper.request_stop("test")

    with pytest.raises(RunInterrupted):
        run_plain(algo, objectives, start(), rounds, **kw, checkpointer=stopper, on_round=stop)
    snap = checkpoint.load(path)
    assert snap.next_round == stop_at + 1
    if at_stop is not None:
        at_stop(snap)
    resumed = run_plain(algo, objectives, start(), rounds, **kw, checkpointer=Checkpointer(path, resumed=snap),
                        resume=snap)
    same_metrics(full.frame(), resumed.frame())
    assert full.client_log == resumed.client_log
    X, Y = full.server_state["X"], resumed.server_state["X"]
    assert X.keys() == Y.keys() and all(torch.equal(X[n], Y[n]) for n in X)
    same_table(full.table, resumed.table)
    return full, resumed


def synthetic_federation():
    """10 LEAF-synthetic clients, an MLP, its start point and geometry, and the loss on all clients' data."""
    data = leaf_synthetic(10, 1.0, 1.0, dim=20, classes=5, mean_samples=60, seed=3)
    torch.manual_seed(0)
    model = MLP(20, (24,), 5)
    objs = [SupervisedObjective(model, x, y, batch_size=16) for x, y in data]
    X0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    allx, ally = torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])

    def loss(X):
        with torch.no_grad():
            return F.cross_entropy(functional_call(model, X, (allx,)), ally).item()
    return model, objs, X0, Geometry.from_model(model), loss


def inbox_targets(grid: Any, ids: list[Any]) -> dict[Any, tuple[str, int]]:
    """Message id → (its group id, i.e. the round and phase, and the partition id of its node) of the messages
    an in-process Flower grid (fedgluon.flower.engines.InProcessGrid) holds for ``ids``."""
    return {i: (grid._inbox[i].metadata.group_id,
                grid.contexts[grid._inbox[i].metadata.dst_node_id].node_config["partition-id"]) for i in ids}


def nan_in_payload(content, j: int) -> None:
    """A NaN in the first value of client ``j``'s first payload layer of a node's reply (fedgluon/flower/wire.py
    layout), the way a broken node could send it."""
    from fedgluon.flower.wire import DTYPES, to_array

    meta, arrays = content.config_records["meta"], content.array_records["replies"]
    r = next(r for r in range(meta["runs"]) if j in meta[f"{r}/clients"])
    i = meta[f"{r}/clients"].index(j)
    g = next(g for g in meta[f"{r}/groups"] if i in meta[f"{r}/p/{g}/rows"])
    key = f"{r}/p/{g}/{meta[f'{r}/p/{g}/layers'][0]}/v.v"
    bad = np.frombuffer(arrays[key].data, dtype=DTYPES[arrays[key].dtype]).reshape(arrays[key].shape).copy()
    bad[meta[f"{r}/p/{g}/rows"].index(i), 0] = np.nan
    arrays[key] = to_array(bad)
