"""FedMuon and FedMuon-BC on the in-process Flower engine with injected failures (the math is in
tests/unit/test_fedmuon.py)."""

import pandas as pd
import pytest


@pytest.mark.parametrize("name", ["fedmuon", "fedmuon-bc"])
def test_injected_failures_on_flower_equal_the_plain_driver(name):
    """A quarter of the client tasks raise on the in-process Flower engine (blocks of 2, 3 of 6 clients a
    round): metrics and every client's row (momentum, control variate) equal the plain driver's, which drops
    the same planned tasks; a failed client's row stays as it was."""
    from helpers import plain_run, same_metrics, same_table

    from fedgluon.flower.engines import run_inprocess

    spec = {"task": {"name": "synthetic", "num_clients": 6, "dim": 8, "classes": 3, "hidden": [6], "mean_samples": 30},
            "algorithm": {"name": name, "lr": 0.05, "local_steps": 2}, "rounds": 6, "seed": 5,
            "participation": 3, "block_size": 2, "faults": {"raise_prob": 0.25}}
    strategy = run_inprocess(spec)
    frame = pd.DataFrame(strategy.history)
    assert frame["failed"].sum() >= 2 and frame["accepted"].sum() >= 9
    ref = plain_run(spec, block_size=2)
    same_metrics(frame, ref.frame())
    same_table(strategy.federation.table, ref.table)
