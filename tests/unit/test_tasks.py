"""Tasks from the registry: each builds, evaluates and gives gradients; errors name the option."""

import numpy as np
import pytest
import torch

from fedgluon.tasks.registry import TASKS, make_task

FAST = [{"name": "synthetic", "num_clients": 3}, {"name": "digits", "partition": "dirichlet", "alpha": 1.0},
        {"name": "breast_cancer", "partition": "shards"}, {"name": "a9a_synthetic", "num_samples": 2000},
        {"name": "libsvm", "path": "tests/data/small.svm", "num_clients": 2, "test_fraction": 0.5},
        {"name": "shakespeare", "max_clients": 4}]


@pytest.mark.parametrize("spec", FAST, ids=lambda s: s["name"])
def test_tasks_build_and_evaluate(spec):
    task = make_task(spec)
    assert task.num_clients >= 2 and all(o.num_samples > 0 for o in task.objectives)
    metrics = task.evaluate(task.initial_params())
    assert np.isfinite(metrics["test_loss"]) and 0 <= metrics["test_accuracy"] <= 1
    assert task.partition_summary["size"].sum() == sum(o.num_samples for o in task.objectives)
    loss, grads = task.objectives[0].gradient(task.initial_params(), task.objectives[0].sample_batch(
        torch.Generator().manual_seed(0)))
    assert set(grads) == set(task.initial_params()) and np.isfinite(loss)


def test_task_errors():
    with pytest.raises(ValueError, match="task.name must be one of"):
        make_task({"name": "cifar10"})
    for name in ("digits", "breast_cancer", "fashion_mnist", "a9a_synthetic", "libsvm"):  # builders passing **kw on
        words = rf"task '{name}' got unknown option\(s\) \['partitoin'\]; allowed: .*'partition'"
        with pytest.raises(ValueError, match=words):
            make_task({"name": name, "partitoin": "iid"})
    for key, scheme, other in (("alpha", "dirichlet", "iid"), ("shards_per_client", "shards", "dirichlet")):
        with pytest.raises(ValueError, match=f"{key} applies to partition='{scheme}' only, got partition='{other}'"):
            make_task({"name": "breast_cancer", "partition": other, key: 2})  # an option that would do nothing
    with pytest.raises(ValueError, match="path must name a LibSVM"):
        make_task({"name": "libsvm"})
    with pytest.raises(FileNotFoundError, match="apt-get install"):
        make_task({"name": "fashion_mnist", "data_dir": "/nonexistent"})
    assert set(TASKS) >= {"synthetic", "digits", "breast_cancer", "fashion_mnist", "libsvm", "a9a_synthetic",
                          "shakespeare"}


def test_sigmoid_squared_binary_task():
    """T2's nonconvex loss ``mean (1 − σ(s·aᵀx))²`` (s = ±1) on a bias-free linear model, with sign predictions."""
    task = make_task({"name": "breast_cancer", "num_clients": 5, "hidden": [], "loss": "sigmoid_squared",
                      "bias": False, "dtype": "float64"})
    params = task.initial_params()
    assert {n: tuple(t.shape) for n, t in params.items()} == {"head.weight": (1, 30)}
    w = torch.randn(1, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    obj = task.objectives[0]
    x, y = obj.full_batch()
    s = 2.0 * y.double() - 1.0
    expected = ((1 - torch.sigmoid(s * (x @ w[0]))) ** 2).mean()
    loss, g = obj.gradient({"head.weight": w}, (x, y))
    assert loss == pytest.approx(float(expected), rel=1e-12)
    assert g["head.weight"].dtype == torch.float64
    acc = task.evaluate({"head.weight": w})["test_accuracy"]
    assert acc == pytest.approx(float(((task.test_inputs @ w[0] > 0).long() == task.test_targets).double().mean()))
    with pytest.raises(ValueError, match="needs a binary dataset, this one has 10 classes"):
        make_task({"name": "digits", "loss": "sigmoid_squared"})


def _rows(x: torch.Tensor, y: torch.Tensor) -> list[tuple]:
    """A client's samples as a sorted list (a multiset): one tuple per sample."""
    return sorted(tuple(a.flatten().tolist()) + (int(b),) for a, b in zip(x, y))


@pytest.mark.parametrize("spec", FAST[:2], ids=lambda s: s["name"])
def test_a_validation_split_is_held_back_from_each_clients_training_data(spec):
    """``validation_fraction`` f: client j trains on all but ``floor(f n_j)`` of the samples it has without the
    option, and exactly those held-back samples, of all clients, are the validation set (no sample is in
    both); ``val_*`` are the test metrics' formulas on them; the split is seeded; f = 0 is the task without it."""
    plain, split = make_task(spec), make_task({**spec, "validation_fraction": 0.25})
    assert make_task({**spec, "validation_fraction": 0}).validation is None and plain.validation is None
    assert split.partition_summary["size"].sum() == sum(o.num_samples for o in split.objectives)
    held: list[tuple] = []
    for a, b in zip(plain.objectives, split.objectives):
        n = a.num_samples
        assert b.num_samples == n - int(0.25 * n)
        back = sorted(set(_rows(a.inputs, a.targets)) - set(_rows(b.inputs, b.targets)))
        assert _rows(a.inputs, a.targets) == sorted(_rows(b.inputs, b.targets) + back)
        held += back
    assert sorted(held) == _rows(*split.validation)
    x, y = split.validation
    metrics = split.evaluate(params := split.initial_params())
    out = torch.func.functional_call(split.model, params, (x,))
    assert metrics["val_loss"] == pytest.approx(float(split.loss_fn(out, y)), rel=1e-5)
    assert metrics["val_accuracy"] == pytest.approx(float((out.argmax(1) == y).double().mean()))
    assert metrics["test_loss"] == plain.evaluate(plain.initial_params())["test_loss"]
    assert all(torch.equal(u, v) for u, v in zip(split.validation, make_task({**spec,
                                                                              "validation_fraction": 0.25}).validation))
    with pytest.raises(ValueError, match=r"validation_fraction must be in \[0, 1\), got 1"):
        make_task({**spec, "validation_fraction": 1})
    with pytest.raises(ValueError, match="validation_fraction=0.0001 holds back no sample"):  # it would score 0
        make_task({**spec, "validation_fraction": 0.0001})


def test_shakespeare_roles_hold_back_the_end_of_their_text():
    """On Shakespeare each role keeps the first ceil((1 - f) n) characters of its training text and its
    validation windows are cut from the rest alone: no training window overlaps validation text."""
    from fedgluon.tasks.data import shakespeare as shk

    task = make_task({"name": "shakespeare", "max_clients": 3, "validation_fraction": 0.2})
    corpus = shk.build_corpus()
    val_x = []
    for obj, row in zip(task.objectives, task.partition_summary.itertuples()):
        text = corpus.train[(row.play, row.role)]
        cut = len(text) - int(0.2 * len(text))
        assert row.chars == cut
        x, y = shk.windows(corpus.encode(text[:cut]), 64, stride=32)
        assert torch.equal(obj.inputs, torch.from_numpy(x)) and torch.equal(obj.targets, torch.from_numpy(y))
        val_x.append(torch.from_numpy(shk.windows(corpus.encode(text[cut:]), 64)[0]))
    assert torch.equal(task.validation[0], torch.cat(val_x)) and len(task.validation[0]) > 0
    assert "val_perplexity" in task.evaluate(task.initial_params())
    with pytest.raises(ValueError, match="holds back no sample"):  # tails shorter than a window
        make_task({"name": "shakespeare", "max_clients": 3, "validation_fraction": 0.001})
    with pytest.raises(ValueError, match="after validation_fraction=0.99 held back the rest"):
        make_task({"name": "shakespeare", "max_clients": 3, "validation_fraction": 0.99})
