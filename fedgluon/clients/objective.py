"""A client's local objective f_j: gradients of a model's loss at any parameter dict.

Algorithms never touch a ``nn.Module`` directly: they ask an objective for
``(loss, ∇f_j(X; ξ))`` at parameter dicts ``X``, on batches the objective samples from a seeded
generator, so the same batch ξ can be evaluated at ``X^k`` and ``X^{k−1}`` (same-sample
requirement of SARAH/MVR) and every draw is reproducible (docs/DESIGN.md §2).

``functional_call`` swaps a module's parameters in place for the call, so two threads calling it on
one module see each other's parameters (measured: 433 of 600 vmapped gradients wrong with two threads
on one module, none with a copy each). :func:`thread_model` gives every thread but the main one its
own copy of the module, made once per thread: the plain driver's block workers
(fedgluon/sim/driver.py) step blocks of clients in threads.
"""

from __future__ import annotations

import copy
import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

Tensors = dict[str, Tensor]
Batch = tuple[Tensor, Tensor]

_copies = threading.local()


def thread_model(model: nn.Module) -> nn.Module:
    """``model`` in the main thread; in any other thread that thread's own deep copy of it (made on its
    first call), so ``functional_call`` in two threads never swaps the same module's parameters. A model
    with buffers (BatchNorm's running statistics, which a forward pass updates in place and a copy would
    not share) is always itself: such models must not step in threads (:func:`has_buffers`)."""
    if threading.current_thread() is threading.main_thread():
        return model
    own = _copies.__dict__.setdefault("models", weakref.WeakKeyDictionary())
    mine = own.get(model)
    if mine is None:
        mine = own[model] = model if has_buffers(model) else copy.deepcopy(model)
    return mine


def has_buffers(model: nn.Module) -> bool:
    """Whether ``model`` has buffers (a forward pass may update them in place, which per-thread copies
    would not share)."""
    return any(True for _ in model.buffers())


@dataclass
class SupervisedObjective:
    """``f_j(X) = mean_i loss(model_X(x_i), y_i)`` over the client's data, with minibatches of
    ``batch_size`` and large batches of ``large_batch_size`` (``None`` = the whole local set)."""

    model: nn.Module
    inputs: Tensor
    targets: Tensor
    batch_size: int = 32
    large_batch_size: int | None = None
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy

    def __post_init__(self) -> None:
        if len(self.inputs) != len(self.targets) or len(self.inputs) == 0:
            raise ValueError(f"a client needs matching, non-empty inputs and targets, got {len(self.inputs)} "
                             f"and {len(self.targets)}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        self._names = [n for n, p in self.model.named_parameters() if p.requires_grad]

    @property
    def num_samples(self) -> int:
        return len(self.inputs)

    def _draw(self, size: int | None, gen: torch.Generator) -> Batch:
        n = self.num_samples
        if size is None or size >= n:
            return self.inputs, self.targets
        idx = torch.randperm(n, generator=gen)[:size]
        return self.inputs.index_select(0, idx), self.targets.index_select(0, idx)  # = [idx], without its checks

    def sample_batch(self, gen: torch.Generator) -> Batch:
        return self._draw(self.batch_size, gen)

    def large_batch(self, gen: torch.Generator) -> Batch:
        return self._draw(self.large_batch_size, gen)

    def full_batch(self) -> Batch:
        return self.inputs, self.targets

    def loss(self, params: Mapping[str, Tensor], batch: Batch) -> Tensor:
        x, y = batch
        return self.loss_fn(functional_call(thread_model(self.model), dict(params), (x,)), y)

    def gradient(self, params: Mapping[str, Tensor], batch: Batch) -> tuple[float, Tensors]:
        """``(loss, ∇f(X; batch))`` with gradients for every trainable parameter."""
        leaves = {n: params[n].detach().requires_grad_(True) for n in self._names}
        with torch.enable_grad():
            loss = self.loss(leaves, batch)
            grads = torch.autograd.grad(loss, [leaves[n] for n in self._names])
        return float(loss.detach()), dict(zip(self._names, grads))
