"""Hostile values that defeated the reply checks (a security review's findings, each reproduced here first):
integers too wide to print, a forged error code, low-rank factors that are finite but multiply to NaN,
repeated list entries that multiply the server's work, a NaN loss. Each now rejects or fails only the
client or block that sent it; the server goes on, and nothing non-finite reaches its state or metrics."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Error, Message
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.supercore.task_identity import TaskIdentity

from fedgluon.config import spec as specs
from fedgluon.core.text import shown
from fedgluon.flower.client_app import make_client_app
from fedgluon.flower.engines import InProcessGrid
from fedgluon.sim.driver import run_plain
from strategies.strategy import GluonStrategy

N = 4
SPEC = specs.normalise({"task": {"name": "synthetic", "num_clients": N, "dim": 6, "classes": 3, "hidden": [4]},
                        "algorithm": {"name": "gluon-ef21", "lr": 0.05, "compressor": {"name": "topk", "ratio": 0.3}},
                        "rounds": 100, "seed": 1})
HUGE = 10 ** 5000  # Python cannot print it (more than 4,300 digits) nor make it a float


def connected(spec=SPEC, *, deaths_stop_run=True) -> tuple[GluonStrategy, InProcessGrid]:
    task, algo = specs.build(spec)
    grid = InProcessGrid(make_client_app(spec), N, seed=1)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, grid.run.run_id, SUPERLINK_NODE_ID
    strategy = GluonStrategy(algo, task.initial_params(), N, seed=1, rounds=3, deaths_stop_run=deaths_stop_run,
                             schema=algo.state_schema(task.objectives[0], task.initial_params(), 1))
    strategy.connect(grid, timeout=10)
    return strategy, grid


def one_round(strategy, grid, edit) -> dict:
    """A round whose client-1 reply ``edit`` changes; returns client → its clients.csv row."""
    replies = list(grid.send_and_receive(list(strategy.configure_train(1, None, None, grid))))
    by_client = {strategy.partition_of[r.metadata.src_node_id]: r for r in replies}
    by_client[1] = edit(by_client[1]) or by_client[1]
    strategy.aggregate_train(1, list(by_client.values()))
    return {r["client"]: r for r in strategy.client_log}


def set_meta(key, value):
    def edit(reply):
        reply.content.config_records["meta"][key] = value
    return edit


def test_shown_never_raises_and_stays_short():
    class Broken:
        def __repr__(self):
            raise RuntimeError("no")

    assert shown(HUGE) == f"<an integer of {HUGE.bit_length()} bits>"
    assert shown(Broken()) == "<an unprintable Broken>"
    assert len(shown("x" * 10 ** 6, 80)) < 120 and shown(5) == "5"


WIDE = f"<an integer of {HUGE.bit_length()} bits>"


@pytest.mark.parametrize("edit, status, reason", [
    (set_meta("runs", HUGE), "rejected", f"runs must be an integer in [0, 1], got {WIDE}"),
    (set_meta("0/round", HUGE), "rejected", f"round must be an integer in [0, {2 ** 62}], got {WIDE}"),
    (set_meta("0/samples", [HUGE]), "rejected", f"samples must be an integer in [0, {2 ** 62}], got {WIDE}"),
    (set_meta("0/loss", [10 ** 400]), "rejected", "loss must be a float, got <an integer of 1329 bits>"),
    (set_meta("0/clients", [HUGE]), "rejected", f"clients must be an integer in [0, {N - 1}], got {WIDE}"),
    (lambda r: r.content.__setitem__("failed", ConfigRecord({"1": HUGE})), "failed", WIDE),
    (lambda r: r.content.config_records["info"].__setitem__("ray_node", HUGE), "accepted", ""),
], ids=["runs", "round", "samples", "loss", "clients", "failed-reason", "ray-node"])
def test_an_integer_too_wide_to_print_touches_only_its_block(edit, status, reason):
    """Before, formatting it in the error message raised ValueError out of aggregate_train. The check that
    names the field rejects it (not the last-line catch-all, whose reason says "unreadable")."""
    strategy, grid = connected()
    rows = one_round(strategy, grid, edit)
    assert rows[1]["status"] == status and all(rows[j]["status"] == "accepted" for j in (0, 2, 3))
    assert reason in rows[1]["reason"] and "unreadable" not in rows[1]["reason"], rows[1]["reason"]


def test_a_reply_with_a_record_the_server_does_not_expect_rejects_its_block():
    def edit(reply):
        reply.content["gossip"] = ConfigRecord({"x": 1})
    strategy, grid = connected()
    rows = one_round(strategy, grid, edit)
    assert rows[1]["status"] == "rejected" and "records the server does not expect" in rows[1]["reason"]
    assert all(rows[j]["status"] == "accepted" for j in (0, 2, 3))


@pytest.mark.parametrize("field, value", [("block", HUGE), ("num_samples", [HUGE]), ("clients", [HUGE])],
                         ids=["block", "num_samples", "clients"])
def test_a_handshake_with_an_integer_too_wide_to_print_rejects_that_node(field, value, caplog):
    from fedgluon.sim.federation import client_weights_from_sizes

    task, algo = specs.build(SPEC)
    app = make_client_app(SPEC)

    def hostile(msg, context):
        reply = app(msg, context)
        if msg.metadata.message_type == "query" and context.node_config["partition-id"] == 1:
            reply.content.metric_records["hello"][field] = value
        return reply

    grid = InProcessGrid(hostile, N, seed=1)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, grid.run.run_id, SUPERLINK_NODE_ID
    sizes = [o.num_samples for o in task.objectives]
    strategy = GluonStrategy(algo, task.initial_params(), N, seed=1, rounds=3, sizes=sizes, weights="samples",
                             schema=algo.state_schema(task.objectives[0], task.initial_params(), 1))
    strategy.connect(grid, timeout=10)
    assert "handshake: rejected node" in caplog.text and sorted(strategy.node_of) == [0, 2, 3]
    assert f"got {WIDE}" in caplog.text  # the field's own check, not an exception no check foresaw
    assert strategy.federation.weights == client_weights_from_sizes(sizes, "samples")


@pytest.mark.parametrize("deployed", [False, True])
def test_a_forged_death_code_stops_a_simulation_but_only_fails_a_deployed_block(deployed):
    """A node can return Flower's CLIENT_APP_CRASHED itself. In the simulation the code comes from the
    runtime, and a dead Ray actor is never replaced, so the run stops (ActorDeathError, with a checkpoint);
    on a Flower deployment the code is the node's word and its SuperNode starts a new ClientApp process for
    the next message, so it fails that block for the round and the run goes on."""
    from fedgluon.sim.checkpoint import ActorDeathError

    strategy, grid = connected(deaths_stop_run=not deployed)

    def forged(reply):
        return Message(Error(code=ErrorCode.CLIENT_APP_CRASHED, reason="forged"), reply_to=sent[0])

    sent = []
    messages = list(strategy.configure_train(1, None, None, grid))
    sent.append(next(m for m in messages if strategy.partition_of[m.metadata.dst_node_id] == 1))
    replies = [r for r in grid.send_and_receive(messages) if strategy.partition_of[r.metadata.src_node_id] != 1]
    replies.append(forged(None))
    if not deployed:
        with pytest.raises(ActorDeathError):
            strategy.aggregate_train(1, replies)
        return
    strategy.aggregate_train(1, replies)
    assert (strategy.history[-1]["accepted"], strategy.history[-1]["failed"]) == (3, 1)
    assert [r["reason"] for r in strategy.client_log if r["client"] == 1] == [f"error code "
                                                                              f"{ErrorCode.CLIENT_APP_CRASHED}: forged"]


def test_finite_low_rank_factors_whose_product_is_nan_are_rejected():
    """PowerSGD rank 2 on a 40×8 layer: P all 3e38, Q's two columns +3e38 and −3e38, every value finite;
    P Qᵀ is ∞ − ∞ = NaN in every entry, which the range check let through (NaN > bound is False) and the
    non-finite server step then stopped the run. Now that client is rejected each round."""
    spec = specs.normalise({**SPEC, "task": {**SPEC["task"], "dim": 8, "hidden": [40]},
                            "algorithm": {"name": "gluon-ef21", "lr": 0.05,
                                          "compressor": {"name": "powersgd", "rank": 2}}})
    task, algo = specs.build(spec)
    big = np.float32(3e38)

    def tamper(k, j, reply):
        if j == 2:
            p = reply.message["body.0.weight"]
            assert p.codec.startswith("powersgd") and p.shape == (40, 8)
            v = np.full_like(p.arrays["v.v"], big)
            v[40 * 2:] = np.tile(np.array([big, -big], dtype=v.dtype), 8)
            reply.message = {**reply.message, "body.0.weight": dataclasses.replace(p, arrays={**p.arrays, "v.v": v})}
        return reply

    res = run_plain(algo, task.objectives, task.initial_params(), 4, seed=1, tamper=tamper)
    assert [(r["accepted"], r["rejected"]) for r in res.history] == [(3, 1)] * 4
    assert all(bool(torch.isfinite(t).all()) for t in res.server_state["X"].values())


@pytest.mark.parametrize("key, times", [("0/groups", 100_000), ("0/failed", 10)])
def test_repeated_list_entries_reject_the_block_at_once(key, times):
    """A list the server loops over, repeated: 10⁵ copies of the group list cost seconds per round before,
    and the reply was accepted."""
    strategy, grid = connected()

    def edit(reply):
        meta = reply.content.config_records["meta"]
        meta[key] = list(meta[key]) * times if meta[key] else [0] * times
    rows = one_round(strategy, grid, edit)
    assert rows[1]["status"] == "rejected" and ("repeats" in rows[1]["reason"] or "at most" in rows[1]["reason"])
    assert all(rows[j]["status"] == "accepted" for j in (0, 2, 3))


@pytest.mark.parametrize("loss", [float("nan"), float("inf")])
def test_a_non_finite_loss_rejects_that_client_alone(loss):
    strategy, grid = connected()
    rows = one_round(strategy, grid, set_meta("0/loss", [loss]))
    assert rows[1]["status"] == "rejected" and "loss: not a finite number" in rows[1]["reason"]
    assert math.isfinite(strategy.history[-1]["train_loss"]) and strategy.history[-1]["accepted"] == 3


@pytest.mark.parametrize("remote", [False, True])
def test_whether_error_codes_stop_the_run_comes_from_the_grid_flwr_run_hands_over(remote):
    """``flwr run`` gives the ServerApp Flower's HttpGrid on a deployment (SuperNodes: codes are the
    nodes' word) and an InMemoryGrid under its simulation runtime (Ray: a dead actor stops the run);
    deployed_run tells PollingGrid which, and serve sets the strategy from it."""
    from fedgluon.exp.deployed import _remote
    from fedgluon.flower.deployment import PollingGrid
    from strategies.server_app import serve

    grid = InProcessGrid(make_client_app(SPEC), N, seed=1)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, grid.run.run_id, SUPERLINK_NODE_ID
    assert _remote(grid) is False
    strategy = serve(PollingGrid(grid, interval=0.001, remote=remote), specs.normalise({**SPEC, "rounds": 1}))
    assert strategy.deaths_stop_run is (not remote) and len(strategy.history) == 1
