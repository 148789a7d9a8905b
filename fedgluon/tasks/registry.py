"""Tasks: a model + a federated dataset + a loss, built from a config by name (one registry).

A task gives each client its :class:`~fedgluon.clients.objective.SupervisedObjective`, the initial model
parameters (seeded), the model for the geometry, a partition summary (client sizes and label
histograms) and a central evaluation on held-out test data (loss, accuracy; perplexity for language
models), and on a validation split the clients held back from their training data when the task's
``validation_fraction`` is above 0 (:func:`hold_back`, :func:`validation_set`), so that tuning need not look
at the test data.

The tasks, their data and options: README, "Tasks and data".
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from fedgluon.clients.objective import SupervisedObjective
from fedgluon.core.rng import generator
from fedgluon.tasks.data import partition as partitions
from fedgluon.tasks.data.synthetic import leaf_synthetic
from fedgluon.tasks.models import MLP, SmallCNN, TinyGPT

if TYPE_CHECKING:
    import pandas as pd

Tensors = dict[str, Tensor]


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy over every position."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def sigmoid_squared_loss(scores: Tensor, targets: Tensor) -> Tensor:
    """The nonconvex binary loss of MARINA/DASHA's experiments, ``mean_i (1 − σ(s_i z_i))²`` with the
    label mapped to ``s_i = 2y_i − 1 ∈ {−1, +1}`` and the model's single score ``z_i`` (docs/ALGORITHMS.md §13 T2)."""
    signs = 2.0 * targets.to(scores.dtype) - 1.0
    return (1.0 - torch.sigmoid(signs * scores[..., 0])).square().mean()


def argmax_prediction(out: Tensor) -> Tensor:
    return out.argmax(-1)


def sign_prediction(out: Tensor) -> Tensor:
    """Class 1 where the single score is positive (the prediction of :func:`sigmoid_squared_loss`)."""
    return (out[..., 0] > 0).long()


LOSSES: dict[str, tuple[Callable[[Tensor, Tensor], Tensor], Callable[[Tensor], Tensor]]] = {
    "cross_entropy": (F.cross_entropy, argmax_prediction),
    "sigmoid_squared": (sigmoid_squared_loss, sign_prediction),
}
"""Classification losses by name: (loss function, prediction from the model's output)."""


@dataclass
class Task:
    model: nn.Module
    objectives: list[SupervisedObjective]
    test_inputs: Tensor
    test_targets: Tensor
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy
    language_model: bool = False
    summary_rows: list[dict[str, Any]] = field(default_factory=list)  # one per client: see partition_summary
    eval_batch: int = 2048
    predict: Callable[[Tensor], Tensor] = argmax_prediction
    validation: tuple[Tensor, Tensor] | None = None  # (inputs, targets) the clients held back: validation_set

    @property
    def partition_summary(self) -> pd.DataFrame:
        """One row per client (its size, and its label histogram or its play and role), as a DataFrame built
        on access: a Flower ClientApp process builds the task for every message and never needs pandas."""
        import pandas as pd

        return pd.DataFrame(self.summary_rows)

    @property
    def num_clients(self) -> int:
        return len(self.objectives)

    def initial_params(self) -> Tensors:
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def evaluate(self, params: Mapping[str, Tensor]) -> dict[str, float]:
        """Central evaluation: ``test_loss``, ``test_accuracy`` (+ ``test_perplexity``) on the held-out test data,
        and the same as ``val_*`` on the task's validation split if it has one."""
        row = self._scores(params, self.test_inputs, self.test_targets, "test")
        if self.validation is not None:
            row.update(self._scores(params, *self.validation, "val"))
        return row

    def _scores(self, params: Mapping[str, Tensor], inputs: Tensor, targets: Tensor, split: str) -> dict[str, float]:
        total_loss, correct, count = 0.0, 0, 0
        with torch.no_grad():
            for i in range(0, len(targets), self.eval_batch):
                x, y = inputs[i:i + self.eval_batch], targets[i:i + self.eval_batch]
                out = functional_call(self.model, dict(params), (x,))
                total_loss += float(self.loss_fn(out, y)) * y.numel()
                correct += int((self.predict(out) == y).sum())
                count += y.numel()
        loss = total_loss / max(1, count)
        row = {f"{split}_loss": loss, f"{split}_accuracy": correct / max(1, count)}
        if self.language_model:
            row[f"{split}_perplexity"] = math.exp(min(loss, 50.0))
        return row


EVAL_SPLITS = ("test", "val")
"""The evaluation splits, as their metrics' prefixes: the held-out test data, and the validation split."""
EVAL_METRICS: dict[str, Callable[[float, float], float]] = {
    f"{split}_{m}": better for split in EVAL_SPLITS for m, better in (("loss", min), ("accuracy", max))}
"""The central evaluation's loss and accuracy of every split → which of two values is the better one."""


def _fraction(fraction: float) -> float:
    if not 0 <= fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1), got {fraction}")
    return fraction


def hold_back(sizes: Sequence[int], fraction: float, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """A validation split from the clients' own training data (task option ``validation_fraction``): per client
    ``j`` of ``sizes``, the sorted indices of the samples it keeps and of the ``min(floor(fraction * n_j),
    n_j - 1)`` it holds back, drawn with ``generator(seed, "validation", j)``. ``fraction`` 0 holds back none."""
    fraction, out = _fraction(fraction), []
    for j, n in enumerate(sizes):
        k = min(int(n * fraction), n - 1)
        order = torch.randperm(n, generator=generator(seed, "validation", j)).numpy() if k > 0 else np.arange(n)
        out.append((np.sort(order[k:]), np.sort(order[:k])))
    return out


def validation_set(held: Sequence[tuple[Tensor, Tensor]], fraction: float) -> tuple[Tensor, Tensor] | None:
    """The samples the clients held back, in client order, as one validation set (None for ``fraction`` 0).
    Holding back nothing is an error: an empty set would score a perfect loss of 0."""
    if not fraction:
        return None
    x, y = torch.cat([x for x, _ in held]), torch.cat([y for _, y in held])
    if not len(y):
        raise ValueError(f"validation_fraction={fraction} holds back no sample (a client holds back "
                         f"floor(f * n) of its n samples, a shakespeare role whole windows of its text): raise it")
    return x, y


def _objectives(model: nn.Module, data: list[tuple[Tensor, Tensor]], batch_size: int, large_batch_size: int | None,
                loss_fn=F.cross_entropy) -> list[SupervisedObjective]:
    """One client's objective per ``(inputs, targets)`` pair."""
    return [SupervisedObjective(model, x, y, batch_size=batch_size, large_batch_size=large_batch_size, loss_fn=loss_fn)
            for x, y in data]


def stratified_split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int):
    """``(x_train, x_test, y_train, y_test)``, stratified by label, seeded (scikit-learn's train_test_split)."""
    from sklearn.model_selection import train_test_split

    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    return train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)


def _classification(x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, y_te: np.ndarray, model: nn.Module, *,
                    num_clients: int = 10, partition: str = "iid", alpha: float | None = None,
                    shards_per_client: int | None = None,
                    batch_size: int = 32, large_batch_size: int | None = None, seed: int = 0, dtype: str = "float32",
                    loss: str = "cross_entropy", validation_fraction: float = 0.0) -> Task:
    torch_dtype = _dtype(dtype)
    parts = partitions.partition(y_tr, num_clients, partition, seed=seed, alpha=alpha,
                                 shards_per_client=shards_per_client)
    xt, yt = torch.tensor(x_tr, dtype=torch_dtype), torch.tensor(y_tr, dtype=torch.long)
    loss_fn, predict = LOSSES[loss]
    splits = hold_back([len(p) for p in parts], validation_fraction, seed)
    kept = [torch.from_numpy(p[keep]) for p, (keep, _) in zip(parts, splits)]
    held = [torch.from_numpy(p[back]) for p, (_, back) in zip(parts, splits)]
    return Task(model.to(torch_dtype), _objectives(model, [(xt[i], yt[i]) for i in kept], batch_size, large_batch_size,
                                                   loss_fn),
                torch.tensor(x_te, dtype=torch_dtype), torch.tensor(y_te, dtype=torch.long), loss_fn=loss_fn,
                summary_rows=partitions.summary_rows([i.numpy() for i in kept], y_tr), predict=predict,
                validation=validation_set([(xt[i], yt[i]) for i in held], validation_fraction))


def _dtype(name: str) -> torch.dtype:
    dtypes = {"float32": torch.float32, "float64": torch.float64}
    if name not in dtypes:
        raise ValueError(f"dtype must be one of {sorted(dtypes)}, got {name!r}")
    return dtypes[name]


def _head(x: np.ndarray, y: np.ndarray, hidden: tuple[int, ...], loss: str, bias: bool = True) -> nn.Module:
    """The task's MLP: C outputs for cross-entropy, one score for the binary ``sigmoid_squared`` loss."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {list(LOSSES)}, got {loss!r}")
    classes = int(y.max()) + 1
    if loss == "sigmoid_squared" and classes != 2:
        raise ValueError(f"loss 'sigmoid_squared' needs a binary dataset, this one has {classes} classes")
    return MLP(x.shape[1], tuple(hidden), 1 if loss == "sigmoid_squared" else classes, bias=bias)


def _synthetic(num_clients: int = 10, alpha: float = 1.0, beta: float = 1.0, dim: int = 60, classes: int = 10,
               mean_samples: int = 100, hidden: tuple[int, ...] = (), batch_size: int = 32,
               large_batch_size: int | None = None, test_fraction: float = 0.2, seed: int = 0,
               dtype: str = "float32", validation_fraction: float = 0.0) -> Task:
    torch_dtype = _dtype(dtype)
    data = leaf_synthetic(num_clients, alpha, beta, dim=dim, classes=classes, mean_samples=mean_samples, seed=seed,
                          dtype=torch_dtype)
    torch.manual_seed(seed)
    model = MLP(dim, tuple(hidden), classes).to(torch_dtype)
    # hold out the last test_fraction of every client's samples for central evaluation
    cuts = [max(1, int(round(len(y) * (1 - test_fraction)))) for _, y in data]
    splits = hold_back(cuts, validation_fraction, seed)
    objectives = _objectives(model, [(x[keep], y[keep]) for (x, y), (keep, _) in zip(data, splits)], batch_size,
                             large_batch_size)
    sizes = [{"client": j, "size": o.num_samples} for j, o in enumerate(objectives)]
    return Task(model, objectives, torch.cat([x[c:] for (x, _), c in zip(data, cuts)]),
                torch.cat([y[c:] for (_, y), c in zip(data, cuts)]), summary_rows=sizes,
                validation=validation_set([(x[back], y[back]) for (x, y), (_, back) in zip(data, splits)],
                                          validation_fraction))


def _sklearn(name: str, default_hidden: tuple[int, ...]):
    def build(hidden: tuple[int, ...] | None = None, test_fraction: float = 0.25, loss: str = "cross_entropy",
              bias: bool = True, **kw: Any) -> Task:
        from fedgluon.tasks.data.tabular import load_sklearn

        return _linear(*load_sklearn(name), test_fraction, default_hidden if hidden is None else hidden, loss, bias,
                       **kw)
    return build


def _fashion_mnist(data_dir: str | None = None, model: str = "cnn", train_limit: int | None = None,
                   test_limit: int | None = None, widths: tuple[int, ...] = (32, 64), seed: int = 0, **kw: Any) -> Task:
    from fedgluon.tasks.data.idx import FASHION_MNIST_DIR, load_mnist_like

    directory = data_dir or FASHION_MNIST_DIR
    x_tr, y_tr = load_mnist_like(directory, "train")
    x_te, y_te = load_mnist_like(directory, "test")
    if train_limit:
        keep = np.random.default_rng(seed).permutation(len(y_tr))[:train_limit]
        x_tr, y_tr = x_tr[np.sort(keep)], y_tr[np.sort(keep)]
    if test_limit:
        x_te, y_te = x_te[:test_limit], y_te[:test_limit]

    def prep(x: np.ndarray) -> np.ndarray:
        return ((x.astype(np.float32) / 255.0 - 0.2860) / 0.3530)[:, None, :, :]
    torch.manual_seed(seed)
    if model == "cnn":
        net: nn.Module = SmallCNN(1, 10, tuple(widths), 28)
    elif model == "mlp":
        net = MLP(28 * 28, (256,), 10)
    else:
        raise ValueError(f"model must be one of ['cnn', 'mlp'], got {model!r}")
    return _classification(prep(x_tr), y_tr.astype(np.int64), prep(x_te), y_te.astype(np.int64), net, seed=seed,
                           **kw)


def _linear(x: np.ndarray, y: np.ndarray, test_fraction: float = 0.2, hidden: tuple[int, ...] = (),
            loss: str = "cross_entropy", bias: bool = True, seed: int = 0, **kw: Any) -> Task:
    x_tr, x_te, y_tr, y_te = stratified_split(x, y, test_fraction, seed)
    torch.manual_seed(seed)
    return _classification(x_tr, y_tr, x_te, y_te, _head(x, y, hidden, loss, bias), loss=loss, seed=seed, **kw)


def _libsvm(path: str | None = None, n_features: int | None = None, **kw: Any) -> Task:
    from fedgluon.tasks.data.tabular import load_libsvm

    if path is None:
        raise ValueError("path must name a LibSVM/svmlight file (task 'libsvm' needs one)")
    return _linear(*load_libsvm(path, n_features), **kw)


def _a9a(num_samples: int = 32561, seed: int = 0, **kw: Any) -> Task:
    from fedgluon.tasks.data.tabular import a9a_like

    return _linear(*a9a_like(num_samples, seed), seed=seed, **kw)


def _shakespeare(plays: tuple[str, ...] | None = None, context: int = 64, min_chars: int = 2000,
                 max_clients: int | None = 20, dim: int = 64, layers: int = 2, heads: int = 4, batch_size: int = 16,
                 large_batch_size: int | None = None, test_fraction: float = 0.1, validation_fraction: float = 0.0,
                 seed: int = 0) -> Task:
    """One client per speaking role. With ``validation_fraction`` f, each role keeps the first
    ``ceil((1 - f) n)`` characters of its training text and holds back the rest as its validation text (whole
    windows of it), so no training window overlaps validation text."""
    from fedgluon.tasks.data import shakespeare as shk

    corpus = shk.build_corpus(tuple(plays) if plays else shk.PLAYS, test_fraction)
    f = _fraction(validation_fraction)
    cut = {k: len(text) - int(len(text) * f) for k, text in corpus.train.items()}
    floor = max(min_chars, context + 1)  # a client needs at least one full window
    roles = sorted((k for k in corpus.train if cut[k] >= floor), key=lambda k: (-cut[k], k))[:max_clients]
    if not roles:
        kept = f" after validation_fraction={validation_fraction} held back the rest" if validation_fraction else ""
        raise ValueError(f"no speaking role has at least min_chars={min_chars} training characters{kept}")
    torch.manual_seed(seed)
    model = TinyGPT(len(corpus.vocab), context, dim, layers, heads)

    def tensors(text: str, stride: int | None = None) -> tuple[Tensor, Tensor]:
        x, y = shk.windows(corpus.encode(text), context, stride)
        return torch.from_numpy(x), torch.from_numpy(y)
    objectives = _objectives(model, [tensors(corpus.train[r][:cut[r]], context // 2) for r in roles], batch_size,
                             large_batch_size, lm_loss)
    validation = validation_set([tensors(corpus.train[r][cut[r]:]) for r in roles], validation_fraction)
    summary = [{"client": j, "play": r[0], "role": r[1], "size": o.num_samples, "chars": cut[r]}
               for j, (r, o) in enumerate(zip(roles, objectives))]
    return Task(model, objectives, *tensors(corpus.test), loss_fn=lm_loss, language_model=True,
                summary_rows=summary, eval_batch=256, validation=validation)


TASKS: dict[str, Callable[..., Task]] = {
    "synthetic": _synthetic,
    "digits": _sklearn("digits", (128,)),
    "breast_cancer": _sklearn("breast_cancer", ()),
    "fashion_mnist": _fashion_mnist,
    "libsvm": _libsvm,
    "a9a_synthetic": _a9a,
    "shakespeare": _shakespeare,
}


PASSED_ON: dict[Callable[..., Task], tuple[Callable[..., Task], ...]] = {
    _libsvm: (_linear, _classification), _a9a: (_linear, _classification)}  # where a builder's **kw go


def task_builders(name: Any) -> tuple[Callable[..., Task], ...]:
    """The functions whose keyword options task ``name`` takes: its builder, then those its ``**kw`` reach
    (:data:`PASSED_ON`, else :func:`_classification`, which checks them); none for an unknown name."""
    builder = TASKS.get(name) if isinstance(name, str) else None
    if builder is None:
        return ()
    if not any(p.kind is p.VAR_KEYWORD for p in inspect.signature(builder).parameters.values()):
        return (builder,)
    return (builder, *PASSED_ON.get(builder, (_classification,)))


def task_options(name: str) -> set[str]:
    """The options task ``name`` takes: its builder's, and of the functions its ``**kw`` reach
    (:func:`task_builders`) those with a default or keyword only."""
    builder, *further = task_builders(name)
    named = {n for n, p in inspect.signature(builder).parameters.items() if p.kind is not p.VAR_KEYWORD}
    passed = {n for f in further for n, p in inspect.signature(f).parameters.items()
              if p.kind is p.KEYWORD_ONLY or (p.default is not p.empty and p.kind is not p.VAR_KEYWORD)}
    return named | passed


def make_task(spec: Mapping[str, Any]) -> Task:
    """Build a task from ``{"name": ..., **options}``."""
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in TASKS:
        raise ValueError(f"task.name must be one of {sorted(TASKS)}, got {name!r}")
    hidden = spec.get("hidden")
    if hidden is not None and not (isinstance(hidden, (list, tuple)) and
                                   all(type(w) is int and w >= 1 for w in hidden)):
        raise ValueError(f"task.hidden must be a list of hidden layer widths, integers >= 1 ([] for none), "
                         f"got {hidden!r}")
    accepted = task_options(name)
    unknown = sorted(set(spec) - accepted)
    if unknown:
        raise ValueError(f"task {name!r} got unknown option(s) {unknown}; allowed: {sorted(accepted)}")
    try:
        return TASKS[name](**spec)
    except TypeError as err:
        raise ValueError(f"bad options for task {name!r}: {err}") from None
