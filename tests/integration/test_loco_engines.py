"""DiLoCo and MuLoCo on the in-process Flower engine, resumed, and with every reply rejected (the math is in
tests/unit/test_loco.py)."""


import pytest

from fedgluon.sim.driver import run_plain

IDENTITY = {"name": "identity", "values": "fp64"}
PLAIN_OUTER = {"outer_lr": 1.0, "outer_momentum": 0.0, "values": "fp64", "compressor": IDENTITY}



LOCO = [{"name": "diloco", "lr": 0.01, "local_steps": 2},
        {"name": "muloco", "lr": 0.02, "local_steps": 2,
         "compressor": {"name": "topk", "ratio": 0.2, "values": "int2"}}]


def loco_spec(algorithm, rounds=4):
    return {"task": {"name": "synthetic", "num_clients": 4, "dim": 6, "classes": 3, "mean_samples": 20, "hidden": [5]},
            "algorithm": algorithm, "rounds": rounds, "seed": 3, "participation": 3}


@pytest.mark.parametrize("algorithm", LOCO, ids=lambda a: a["name"])
def test_inprocess_flower_equals_plain_driver(algorithm):
    """The in-process Flower engine gives the plain driver's metrics and client-state table bitwise (3 of 4
    clients a round, so some rows wait with their kept inner state)."""
    import pandas as pd
    from helpers import plain_frame, plain_table, same_metrics, same_table

    from fedgluon.flower.engines import run_inprocess

    spec = loco_spec(algorithm)
    strategy = run_inprocess(spec)
    same_metrics(pd.DataFrame(strategy.history), plain_frame(spec))
    same_table(strategy.federation.table, plain_table(spec))


@pytest.mark.parametrize("algorithm", LOCO, ids=lambda a: a["name"])
def test_resume_and_rejection_keep_the_inner_state(tmp_path, algorithm):
    """A run stopped after round 2 and resumed equals the uninterrupted run bitwise (the inner state and the
    outer momentum are in the checkpoint); a client whose reply is rejected keeps its committed row."""
    from helpers import same_table, stop_and_resume

    from fedgluon.config import spec as specs

    s = specs.normalise(loco_spec(algorithm, rounds=5))
    task, algo = specs.build(s)
    stop_and_resume(algo, task.objectives, task.initial_params(), 5, 2, tmp_path / "c.pt", seed=3, participation=3)

    def stale(k, j, reply):
        if k == 2:
            reply.round = 99  # every reply of round 2 is rejected
        return reply

    two = run_plain(algo, task.objectives, task.initial_params(), 2, seed=3)
    rejected = run_plain(algo, task.objectives, task.initial_params(), 3, seed=3, tamper=stale)
    assert rejected.frame()["rejected"].tolist() == [0, 0, 4]
    same_table(two.table, rejected.table)


