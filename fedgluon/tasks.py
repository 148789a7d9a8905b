"""Tasks: a model + a federated dataset + a loss, built from a config by name.

A task gives each client its :class:`~fedgluon.objective.SupervisedObjective`, the initial model
parameters (seeded), the geometry's view of the model, and a central evaluation function on
held-out data. Registered tasks: ``synthetic`` (LEAF-style synthetic(α, β) softmax regression /
MLP). The tasks issue adds real datasets and partitions through the same registry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .data.synthetic import leaf_synthetic
from .models import MLP
from .objective import SupervisedObjective

Tensors = dict[str, Tensor]


@dataclass
class Task:
    model: nn.Module
    objectives: list[SupervisedObjective]
    test_inputs: Tensor
    test_targets: Tensor

    @property
    def num_clients(self) -> int:
        return len(self.objectives)

    def initial_params(self) -> Tensors:
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def evaluate(self, params: Mapping[str, Tensor]) -> dict[str, float]:
        """Central evaluation on the held-out set: test loss and accuracy."""
        with torch.no_grad():
            out = functional_call(self.model, dict(params), (self.test_inputs,))
            loss = F.cross_entropy(out, self.test_targets).item()
            acc = (out.argmax(1) == self.test_targets).float().mean().item()
        return {"test_loss": loss, "test_accuracy": acc}


def _synthetic(num_clients: int = 10, alpha: float = 1.0, beta: float = 1.0, dim: int = 60, classes: int = 10,
               mean_samples: int = 100, hidden: tuple[int, ...] = (), batch_size: int = 32,
               large_batch_size: int | None = None, test_fraction: float = 0.2, seed: int = 0,
               dtype: str = "float32") -> Task:
    torch_dtype = {"float32": torch.float32, "float64": torch.float64}[dtype]
    data = leaf_synthetic(num_clients, alpha, beta, dim=dim, classes=classes, mean_samples=mean_samples, seed=seed,
                          dtype=torch_dtype)
    train, test_x, test_y = [], [], []
    for x, y in data:  # hold out the last test_fraction of every client's samples for central evaluation
        cut = max(1, int(round(len(y) * (1 - test_fraction))))
        train.append((x[:cut], y[:cut]))
        test_x.append(x[cut:])
        test_y.append(y[cut:])
    torch.manual_seed(seed)
    model = MLP(dim, tuple(hidden), classes).to(torch_dtype)
    objectives = [SupervisedObjective(model, x, y, batch_size=batch_size, large_batch_size=large_batch_size)
                  for x, y in train]
    return Task(model, objectives, torch.cat(test_x), torch.cat(test_y))


TASKS: dict[str, Callable[..., Task]] = {"synthetic": _synthetic}


def make_task(spec: Mapping[str, Any]) -> Task:
    """Build a task from ``{"name": ..., **options}``."""
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in TASKS:
        raise ValueError(f"task.name must be one of {sorted(TASKS)}, got {name!r}")
    try:
        return TASKS[name](**spec)
    except TypeError as err:
        raise ValueError(f"bad options for task {name!r}: {err}") from None
