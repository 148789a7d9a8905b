"""FedMuon and FedMuon-BC on the in-process Flower engine with injected failures (the math is in
tests/unit/test_fedmuon.py)."""

import pandas as pd
import pytest

from fedgluon.sim.driver import run_plain


@pytest.mark.parametrize("name", ["fedmuon", "fedmuon-bc"])
def test_injected_failures_on_flower_equal_the_plain_driver(name):
    """A quarter of the client tasks raise on the in-process Flower engine (blocks of 2, 3 of 6 clients a
    round): metrics and every client's row (momentum, control variate) equal the plain driver's, which drops
    the same planned tasks; a failed client's row stays as it was."""
    from helpers import same_table

    from fedgluon.config import spec as specs
    from fedgluon.flower.engines import run_inprocess
    from fedgluon.sim.faults import FaultPlan
    from fedgluon.sim.metrics import TIMING_COLUMNS

    faults = {"raise_prob": 0.25}
    spec = specs.normalise({"task": {"name": "synthetic", "num_clients": 6, "dim": 8, "classes": 3, "hidden": [6],
                                     "mean_samples": 30},
                            "algorithm": {"name": name, "lr": 0.05, "local_steps": 2}, "rounds": 6, "seed": 5,
                            "participation": 3, "block_size": 2, "faults": faults})
    strategy = run_inprocess(spec)
    frame = pd.DataFrame(strategy.history)
    assert frame["failed"].sum() >= 2 and frame["accepted"].sum() >= 9
    task, algo = specs.build(spec)
    ref = run_plain(algo, task.objectives, task.initial_params(), 6, seed=5, participation=3, block_size=2,
                    faults=FaultPlan.from_spec(faults), evaluate=lambda X, k: task.evaluate(X))
    cols = [c for c in frame.columns if c not in TIMING_COLUMNS]
    pd.testing.assert_frame_equal(frame[cols], ref.frame()[cols], check_exact=True)
    same_table(strategy.federation.table, ref.table)
