"""Dion and Orth-Dion on the Flower engines: equal to the plain driver (with faults in phase 2), resumed, and
hostile replies in either phase rejected (the math is in tests/unit/test_dion.py)."""


import pytest
import torch
from helpers import inbox_targets, nan_in_payload, plain_run

ENGINE_SPEC = {"task": {"name": "synthetic", "num_clients": 4, "dim": 10, "classes": 4, "mean_samples": 40,
                        "hidden": [8]},
               "algorithm": {"name": "dion", "lr": 0.05, "rank": 2}, "rounds": 3, "seed": 3, "participation": 0.75}


@pytest.mark.parametrize("faults", [None, {"raise_prob": 0.2, "phase": 1}], ids=["clean", "phase2-faults"])
def test_inprocess_flower_equals_plain_driver(faults):
    """Both phases over Flower messages (strategy and ClientApp, shared with Ray and the deployment): metrics
    (per-phase bits included) and client-state tables bitwise equal to the plain driver's; with clients
    raising in the second phase, those clients fail, their rows stay as they were, and the rounds go on."""
    import pandas as pd
    from helpers import same_metrics, same_table

    from fedgluon.flower.engines import run_inprocess

    spec = {**ENGINE_SPEC, **({"faults": faults} if faults else {})}
    strategy = run_inprocess(spec)
    plain = plain_run(spec)
    frame = pd.DataFrame(strategy.history)
    same_metrics(frame, plain.frame())
    same_table(strategy.federation.table, plain.table)
    assert "up_phase1_int32_total" in frame and len(frame) == spec["rounds"]
    if faults:
        assert ((frame["failed"] > 0) & (frame["accepted"] > 0)).any()


def test_hostile_replies_in_either_phase_over_flower_are_rejected_and_leave_rows_unchanged(monkeypatch):
    """In round 1 a NaN in client 2's phase-0 reply (P_2) and in client 1's phase-1 reply (R_1), as a
    broken node could send them: both are rejected, their rows are as after round 0, the others commit."""
    from fedgluon.flower.engines import InProcessGrid, run_inprocess

    original = InProcessGrid.pull_messages

    def hostile(self, ids, timeout=None):
        ids = list(ids)
        where = inbox_targets(self, ids)
        replies = []
        for i in ids:
            reply = list(original(self, [i]))[0]
            if where[i] in (("1", 2), ("1.1", 1)):
                nan_in_payload(reply.content, where[i][1])
            replies.append(reply)
        return replies

    monkeypatch.setattr(InProcessGrid, "pull_messages", hostile)
    spec = {**ENGINE_SPEC, "participation": 1.0, "rounds": 2}
    strategy = run_inprocess(spec)
    row = strategy.history[1]
    assert (row["rejected"], row["accepted"]) == (2, 2)
    before = plain_run({**spec, "rounds": 1}).table
    table = strategy.federation.table
    for j in range(4):
        same = all(torch.equal(table.columns[p][j], before.columns[p][j]) for p in table.columns)
        assert same == (j in (1, 2)), j
    assert table.commits.tolist() == [2, 1, 1, 2]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ray_equals_plain_with_faults_in_the_second_phase():
    """The Ray engine (blocks of 2 clients per node), clients raising in phase 2: metrics equal the plain
    driver's (training loss to 1e-6: blocks reduce batch losses in another order), tables bitwise."""
    import pandas as pd
    from helpers import same_metrics, same_table

    from fedgluon.flower.engines import run_ray

    spec = {**ENGINE_SPEC, "block_size": 2, "faults": {"raise_prob": 0.2, "phase": 1}}
    strategy = run_ray(spec, num_cpus=1, ray_init_args={"num_cpus": 2})
    plain = plain_run(spec)
    frame = pd.DataFrame(strategy.history)
    same_metrics(frame, plain.frame(), loss_rtol=1e-6)
    same_table(strategy.federation.table, plain.table)
    assert ((frame["failed"] > 0) & (frame["accepted"] > 0)).any()
