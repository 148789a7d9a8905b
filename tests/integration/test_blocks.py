"""Client blocks: vmapped per-client gradients equal the per-client loop (bitwise in float32 here), a row's
result is bitwise independent of its block-mates, and a run with blocks of virtual clients (plain driver,
in-process Flower grid) gives the metrics of one client per node."""

import threading

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import run_inprocess

from fedgluon.clients import vectorised
from fedgluon.clients.blocks import block_clients, num_blocks
from fedgluon.clients.table import flatten
from fedgluon.clients.vectorised import can_vectorise, stacked_gradients
from fedgluon.config import spec as specs
from fedgluon.core.rng import generator
from fedgluon.sim.driver import run_plain
from fedgluon.sim.faults import FaultPlan
from fedgluon.sim.metrics import TIMING_COLUMNS
from fedgluon.tasks.registry import make_task

TASK = {"name": "synthetic", "num_clients": 9, "dim": 10, "classes": 4, "hidden": [16], "mean_samples": 30,
        "batch_size": 24}


def test_block_layout():
    assert num_blocks(10, 4) == 3 and block_clients(2, 10, 4) == [8, 9] and block_clients(0, 10, 1) == [0]
    with pytest.raises(ValueError, match="block_size"):
        num_blocks(10, 0)


@pytest.fixture
def vmapped_calls(monkeypatch):
    """The batch shapes of every vmapped call :func:`stacked_gradients` makes (the real call runs)."""
    calls = []
    real = vectorised._vmapped_call

    def spy(objective, xs, ys, *rest):
        calls.append(tuple(ys.shape))
        return real(objective, xs, ys, *rest)

    monkeypatch.setattr(vectorised, "_vmapped_call", spy)
    return calls


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_vmapped_gradients_equal_the_loop_bitwise(dtype, vmapped_calls):
    """Row i of ``stacked_gradients`` is client ``js[i]``'s ``objective.gradient`` on ``batches[i]``, at the
    shared parameters or at row i of stacked ones; rows are grouped by batch shape, one vmapped call per
    group of two or more (a client with fewer samples than the batch size draws a smaller batch)."""
    task = make_task({**TASK, "dtype": dtype, "seed": 2})
    objs, X = task.objectives, task.initial_params()
    js = list(range(len(objs)))[::-1]  # rows in another order than the clients
    batches = [objs[j].sample_batch(generator(0, "sample", j, 0)) for j in js]
    sizes = [len(b[1]) for b in batches]
    assert len(set(sizes)) > 1  # ragged: some clients hold < batch_size samples
    losses, shared = stacked_gradients(objs, js, batches, shared=X)
    groups = {n: sizes.count(n) for n in set(sizes)}
    assert sorted(vmapped_calls) == sorted((n, size) for size, n in groups.items() if n > 1)
    per = {n: torch.stack([t + 0.01 * j for j in js]) for n, t in X.items()}
    stacked_losses, stacked = stacked_gradients(objs, js, batches, stacked=per)
    for i, j in enumerate(js):
        for got, got_loss, params in ((shared, losses[i], X), (stacked, stacked_losses[i], {n: per[n][i] for n in X})):
            loss, ref = objs[j].gradient(params, batches[i])
            assert all(got[n].shape == (len(js), *X[n].shape) for n in ref)
            if dtype == "float32":  # measured bitwise equal here; float64 takes another BLAS path (1-ulp differences)
                assert all(torch.equal(got[n][i], ref[n]) for n in ref)
            for n in ref:
                torch.testing.assert_close(got[n][i], ref[n], rtol=1e-14 if dtype == "float64" else 0, atol=1e-15)
            assert got_loss == pytest.approx(loss, rel=1e-6)
    with pytest.raises(ValueError, match="either shared parameters or stacked"):
        stacked_gradients(objs, js, batches, shared=X, stacked=per)


def _running_bn():
    """A model whose BatchNorm keeps running statistics (buffers a forward pass updates in place)."""
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))


def test_batchnorm_with_running_statistics_falls_back_to_the_loop_and_the_cnn_has_none(vmapped_calls):
    """A model whose forward pass writes its running statistics is not vmapped: every row is its
    ``objective.gradient``, bitwise; SmallCNN normalises with batch statistics alone and has no buffers."""
    from fedgluon.clients.objective import SupervisedObjective
    from fedgluon.tasks.models import MLP, SmallCNN

    assert not can_vectorise(_running_bn()) and can_vectorise(MLP(4, (3,), 2))
    cnn = SmallCNN(1, 10, widths=(4,))
    assert can_vectorise(cnn) and not list(cnn.buffers())
    gen = torch.Generator().manual_seed(1)
    model = _running_bn()
    objs = [SupervisedObjective(model, torch.randn(8, 4, generator=gen), torch.randn(8, 3, generator=gen),
                                batch_size=4, loss_fn=torch.nn.functional.mse_loss) for _ in range(3)]
    X = {n: p.detach().clone() for n, p in model.named_parameters()}
    batches = [o.sample_batch(generator(0, "sample", j, 0)) for j, o in enumerate(objs)]
    losses, got = stacked_gradients(objs, [0, 1, 2], batches, shared=X)
    assert vmapped_calls == []
    for j, o in enumerate(objs):
        loss, ref = o.gradient(X, batches[j])
        assert losses[j] == loss and all(torch.equal(got[n][j], ref[n]) for n in ref)


def test_the_cnn_batches_its_gradients_and_gives_the_loop_results(vmapped_calls):
    """SmallCNN normalises with batch statistics only, so its block gradients are vmapped, equal to the
    per-client loop up to float32 rounding (conv kernels differ batched: measured <= 1e-6 relative)."""
    from fedgluon.clients.objective import SupervisedObjective
    from fedgluon.tasks.models import SmallCNN

    gen = torch.Generator().manual_seed(0)
    model = SmallCNN(1, 4, widths=(3,), image_size=8)
    objs = [SupervisedObjective(model, torch.randn(6, 1, 8, 8, generator=gen), torch.randint(0, 4, (6,), generator=gen),
                                batch_size=4) for _ in range(3)]
    X = {n: p.detach().clone() for n, p in model.named_parameters()}
    batches = [o.sample_batch(generator(0, "sample", j, 0)) for j, o in enumerate(objs)]
    _, got = stacked_gradients(objs, [0, 1, 2], batches, shared=X)
    assert vmapped_calls == [(3, 4)]  # one call for the block
    for j, o in enumerate(objs):
        loss, ref = o.gradient(X, batches[j])
        for n in ref:
            torch.testing.assert_close(got[n][j], ref[n], rtol=1e-5, atol=1e-6)


def _frames_match(a: pd.DataFrame, b: pd.DataFrame) -> None:
    cols = [c for c in a.columns if c not in (*TIMING_COLUMNS, "train_loss")]
    pd.testing.assert_frame_equal(a[cols], b[cols], check_exact=True)
    pd.testing.assert_series_equal(a["train_loss"], b["train_loss"], rtol=1e-6)


def _tables_equal(a, b) -> None:
    """Two runs' client-state tables hold the same rows bitwise: every tracker, estimate and residual,
    the commit counts, the rounds last seen and the models kept for X_prev."""
    assert a.columns.keys() == b.columns.keys()
    assert all(torch.equal(a.columns[p], b.columns[p]) for p in a.columns)
    assert torch.equal(a.commits, b.commits) and torch.equal(a.seen, b.seen)
    assert a.models.keys() == b.models.keys()
    assert all(torch.equal(a.models[r][n], b.models[r][n]) for r in a.models for n in a.models[r])


@pytest.mark.parametrize("algorithm", [
    {"name": "gluon-ef21-sarah", "refresh_prob": 0.3, "compressor": {"name": "topk", "ratio": 0.1}},
    {"name": "gluon-mvr", "variant": "storm"},
    {"name": "gluon-marina", "compressor": {"name": "randk", "ratio": 0.2}},
    {"name": "fedavg", "local_steps": 2},
    {"name": "gluon-ef21", "error_feedback": "ef14", "compressor": {"name": "topk", "ratio": 0.2}},
    {"name": "gluon-ef21-mvr", "error_feedback": "none", "compressor": {"name": "identity"}},
    {"name": "gluon-ef21", "tracker": "fixed16", "compressor": {"name": "topk", "ratio": 0.1}},
])
def test_plain_driver_blocks_equal_one_client_per_node(algorithm):
    spec = specs.normalise({"task": TASK, "algorithm": {"lr": 0.05, **algorithm}, "rounds": 6, "seed": 4})
    task, algo = specs.build(spec)
    kw = {"seed": 4, "participation": 0.7, "evaluate": lambda X, k: task.evaluate(X)}
    one = run_plain(algo, task.objectives, task.initial_params(), 6, **kw)
    blocks = run_plain(algo, task.objectives, task.initial_params(), 6, block_size=4, **kw)
    threads = run_plain(algo, task.objectives, task.initial_params(), 6, block_size=2, workers=3, **kw)
    for other in (blocks, threads):
        _frames_match(one.frame(), other.frame())
        _tables_equal(one.table, other.table)
        assert all(torch.equal(one.server_state["X"][n], other.server_state["X"][n]) for n in one.server_state["X"])


def _rows_of(results) -> dict:
    """Per client of a block step's results: its reply's group, metrics and payload arrays, its proposed
    state row (views) and its failure, if any."""
    out = {}
    for res in results:
        state = flatten(res.state)
        replies, failures = res.replies(), res.failures()
        for i, j in enumerate(res.clients):
            reply = replies.get(j)
            out[j] = {"state": {p: t[i] for p, t in state.items()}, "failed": failures.get(j),
                      "reply": None if reply is None else (reply.group, reply.loss, reply.grad_evals, reply.samples),
                      "payload": None if reply is None else reply.message}
    return out


def _same_row(a: dict, b: dict, what: str) -> None:
    """Bitwise equal but the reported loss, which may differ in its last bit (module doc of
    fedgluon.clients.vectorised: a vmapped batch mean is reduced in another order)."""
    assert a["failed"] == b["failed"], what
    if a["reply"] is None or b["reply"] is None:
        assert a["reply"] == b["reply"], what
    else:
        (group, loss, *rest), (group_b, loss_b, *rest_b) = a["reply"], b["reply"]
        assert group == group_b and rest == rest_b and loss == pytest.approx(loss_b, rel=1e-6), what
    assert a["state"].keys() == b["state"].keys(), what
    for p, t in a["state"].items():
        assert t.dtype == b["state"][p].dtype and torch.equal(t, b["state"][p]), f"{what}: state {p}"
    if a["payload"] is None:
        assert b["payload"] is None, what
        return
    assert a["payload"].keys() == b["payload"].keys(), what
    for layer, x in a["payload"].items():
        y = b["payload"][layer]
        assert (x.codec, x.shape, x.meta) == (y.codec, y.shape, y.meta), f"{what}: {layer}"
        assert x.arrays.keys() == y.arrays.keys(), f"{what}: {layer}"
        for k, arr in x.arrays.items():
            other = np.asarray(y.arrays[k])
            arr = np.asarray(arr)
            assert arr.dtype == other.dtype and np.array_equal(arr, other), f"{what}: {layer}/{k}"


@pytest.mark.parametrize("algorithm", [
    {"name": "gluon-ef21-mvr", "compressor": {"name": "topk", "ratio": 0.1}},
    {"name": "gluon-mvr", "variant": "storm"},  # Muon-MVR: per-row clipping norms
    {"name": "gluon-dasha-mvr", "compressor": {"name": "randk", "ratio": 0.2}},  # dense first messages
    {"name": "gluon-ef21", "tracker": "fixed16", "compressor": {"name": "topk", "ratio": 0.1}},  # per-layer scales
    {"name": "limuon", "rank": 2},  # per-row RSVD factors
    {"name": "fedavg", "local_steps": 2},
    {"name": "diloco", "local_steps": 2},  # AdamW kept across rounds: per-row step counts
])
def test_a_rows_result_is_bitwise_independent_of_its_block_mates(algorithm):
    """After 3 rounds of partial participation (first-time clients beside later ones, X_prev of several
    rounds), every client steps round 3 alone, in a block of all 9 (table views) and in a block of every
    other client (gathered rows): its payload arrays, metrics and proposed state row are bitwise equal, and
    the table's rows and the broadcast model are left as they were."""
    from fedgluon.algorithms.block import concat

    spec = specs.normalise({"task": TASK, "algorithm": {"lr": 0.05, **algorithm}, "rounds": 3, "seed": 6})
    task, algo = specs.build(spec)
    objs = task.objectives
    res = run_plain(algo, objs, task.initial_params(), 3, seed=6, participation=0.5)
    table = res.table
    assert (table.commits == 0).any() and (table.commits > 0).any()
    bc = algo.broadcast(res.server_state, 3, 6, len(objs))
    n = len(objs)

    before = {p: c.clone() for p, c in table.columns.items()}
    model = {k: t.clone() for k, t in bc.model.items()}

    def step(blocks: list[list[int]]) -> dict:
        return _rows_of([concat(algo.step_block(table.rows(js), bc, objs)) for js in blocks])

    alone = step([[j] for j in range(n)])
    together = step([list(range(n))])
    mixed = step([list(range(0, n, 2)), list(range(1, n, 2))])
    assert any(r["payload"] for r in alone.values())
    for j in range(n):
        _same_row(alone[j], together[j], f"client {j}: alone vs a block of {n}")
        _same_row(alone[j], mixed[j], f"client {j}: alone vs every other client")
    # a step never writes into the rows or the model it is given: the in-process engine and the plain driver
    # hand it the server's own table and model memory (table views, wire arrays that share memory)
    assert all(torch.equal(before[p], c) for p, c in table.columns.items())
    assert all(torch.equal(model[k], t) for k, t in bc.model.items())


def test_threads_never_share_a_module_in_functional_call():
    """Two threads computing vmapped and per-client gradients at once get the serial results
    (``functional_call`` swaps a module's parameters, so threads sharing one module read each other's:
    hundreds of wrong gradients in this loop without :func:`thread_model`); the main thread and models
    with buffers use the module itself."""
    from fedgluon.clients.objective import thread_model

    task = make_task({**TASK, "seed": 5})
    objs, X = task.objectives, task.initial_params()
    batches = [o.sample_batch(generator(0, "sample", j, 0)) for j, o in enumerate(objs)]
    js = list(range(len(objs)))
    _, ref = stacked_gradients(objs, js, batches, shared=X)
    wrong = []

    def work(params: dict) -> None:
        for _ in range(40):
            _, got = stacked_gradients(objs, js, batches, shared=params)
            wrong.extend(j for j in js if not all(torch.equal(got[n][j], ref[n][j]) for n in X))

    other = {n: t + 1.0 for n, t in X.items()}  # a second thread at other parameters would leak them
    pool = [threading.Thread(target=work, args=(p,)) for p in (X, X, other)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert len(wrong) == 40 * len(objs)  # exactly the third thread's, all of them
    model = objs[0].model
    assert thread_model(model) is model
    cnn = _running_bn()
    seen = {}
    worker = threading.Thread(target=lambda: seen.update(mlp=thread_model(model), again=thread_model(model),
                                                         cnn=thread_model(cnn)))
    worker.start()
    worker.join()
    assert seen["mlp"] is not model and seen["again"] is seen["mlp"] and seen["cnn"] is cnn


def test_workers_are_checked_and_models_with_buffers_step_one_block_at_a_time(caplog):
    from fedgluon.clients.objective import SupervisedObjective
    from fedgluon.sim.driver import block_workers

    task, algo = specs.build(specs.normalise({"task": TASK, "algorithm": {"name": "gluon-ef21"}}))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="workers must be an integer >= 1"):
            run_plain(algo, task.objectives, task.initial_params(), 1, workers=bad)
    threads = torch.get_num_threads()
    with block_workers(2, task.objectives) as pool:
        assert pool is not None
        assert pool.submit(torch.get_num_threads).result() == max(1, threads // 2)
    later = []  # threads started afterwards begin with the caller's count again
    t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert later == [threads] and torch.get_num_threads() == threads
    cnn = SupervisedObjective(_running_bn(), torch.zeros(4, 4), torch.zeros(4, dtype=torch.long))
    with caplog.at_level("WARNING", logger="fedgluon.sim.driver"), block_workers(2, [cnn]) as pool:
        assert pool is None
    assert "buffers" in caplog.text


@pytest.mark.parametrize("algorithm", [
    {"name": "gluon-ef21", "compressor": {"name": "topk", "ratio": 0.1}},
    {"name": "gluon-ef21-sarah", "refresh_prob": 0.3, "compressor": {"name": "topk", "ratio": 0.1}},
])
def test_a_block_steps_in_runs_of_bounded_gradient_bytes(algorithm, monkeypatch):
    """A block's clients step in runs of ``RUN_BYTES`` of gradients (two per client where the estimator
    needs ∇f(X_prev)), a last run of one joined to the one before; a block of all 9 clients in runs of 2
    equals one run and one client per node."""
    from fedgluon.algorithms.base import Algorithm

    spec = specs.normalise({"task": TASK, "algorithm": {"lr": 0.05, **algorithm}, "rounds": 5, "seed": 3})
    task, algo = specs.build(spec)
    X = task.initial_params()
    grad_bytes = sum(t.numel() * t.element_size() for t in X.values()) * (2 if algo.needs_previous else 1)
    kw = {"seed": 3, "participation": 0.8, "evaluate": lambda X, k: task.evaluate(X)}
    blocks, runs = [], []
    step_block, client_step = Algorithm.step_block, Algorithm.client_step
    monkeypatch.setattr(Algorithm, "step_block",
                        lambda self, rows, *a: blocks.append(len(rows)) or step_block(self, rows, *a))
    monkeypatch.setattr(Algorithm, "client_step",
                        lambda self, rows, *a: runs.append(len(rows)) or client_step(self, rows, *a))

    def run(run_bytes: int):
        monkeypatch.setattr(Algorithm, "RUN_BYTES", run_bytes)
        blocks.clear()
        runs.clear()
        result = run_plain(algo, task.objectives, X, 5, block_size=9, **kw)
        assert runs[0] == 1  # the schema's throwaway step of client 0 (Algorithm.state_schema)
        return result, runs[1:]

    in_runs, got = run(2 * grad_bytes + 1)
    assert len(blocks) == 5 and min(blocks) >= 3
    assert got == [r for b in blocks for r in [2] * (b // 2 - 1) + [2 + b % 2]]  # 7 clients: 2, 2, 3
    assert 3 in got
    whole, got = run(10 ** 12)
    assert got == blocks  # one run per block
    one = run_plain(algo, task.objectives, X, 5, **kw)
    _frames_match(in_runs.frame(), whole.frame())
    _frames_match(in_runs.frame(), one.frame())
    _tables_equal(in_runs.table, whole.table)
    _tables_equal(in_runs.table, one.table)


def test_flower_blocks_equal_plain_driver_with_faults():
    """9 clients in blocks of 4 (3 nodes, the last holding one client), partial participation, injected raises
    that fail single clients inside a block."""
    faults = {"raise_prob": 0.15}
    spec = specs.normalise({"task": TASK, "rounds": 6, "seed": 1, "participation": 0.8, "block_size": 4,
                            "faults": faults,
                            "algorithm": {"name": "gluon-ef21-mvr", "lr": 0.05,
                                          "compressor": {"name": "topk", "ratio": 0.1}}})
    strategy = run_inprocess(spec)
    task, algo = specs.build(spec)
    ref = run_plain(algo, task.objectives, task.initial_params(), 6, seed=1, participation=0.8,
                    evaluate=lambda X, k: task.evaluate(X), faults=FaultPlan.from_spec(faults))
    frame = pd.DataFrame(strategy.history)
    assert frame["failed"].sum() > 0
    _frames_match(frame, ref.frame())


def test_client_device_is_checked_and_cpu_without_a_gpu():
    """``client_device``: a bad name or an invisible GPU is an error naming the field; ``auto`` is the CPU on
    a machine without a GPU, so its run equals the default's bitwise."""
    with pytest.raises(ValueError, match="client_device must be one of"):
        specs.normalise({"task": TASK, "client_device": "tpu"})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="client_device is 'cuda' but torch sees 0 CUDA"):
            specs.normalise({"task": TASK, "client_device": "cuda"})
    runs = []
    for device in ("cpu", "auto"):
        spec = specs.normalise({"task": TASK, "algorithm": {"name": "gluon-ef21-mvr", "lr": 0.05}, "rounds": 3,
                                "seed": 1, "client_device": device})
        task, algo = specs.build(spec)
        assert algo.client_device == (torch.device("cpu") if device == "cpu" or not torch.cuda.is_available()
                                      else torch.device("cuda", torch.cuda.current_device()))
        runs.append(run_plain(algo, task.objectives, task.initial_params(), 3, seed=1, block_size=4))
    if not torch.cuda.is_available():
        pd.testing.assert_frame_equal(runs[0].frame().drop(columns=list(TIMING_COLUMNS)),
                                      runs[1].frame().drop(columns=list(TIMING_COLUMNS)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_vmapped_gradients_on_the_gpu_match_the_cpu():
    task = make_task({**TASK, "seed": 2})
    objs, X = task.objectives, task.initial_params()
    js = list(range(len(objs)))
    batches = [o.sample_batch(generator(0, "sample", j, 0)) for j, o in enumerate(objs)]
    cpu_losses, cpu = stacked_gradients(objs, js, batches, shared=X)
    gpu_losses, gpu = stacked_gradients(objs, js, batches, shared=X, device=torch.device("cuda"))
    assert np.allclose(cpu_losses, gpu_losses, rtol=0, atol=1e-4)
    for n in X:
        assert gpu[n].device.type == "cpu"
        torch.testing.assert_close(gpu[n], cpu[n], rtol=1e-4, atol=1e-5)
