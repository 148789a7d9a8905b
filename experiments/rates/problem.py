"""The test problem of the rate experiment: a smooth nonconvex objective with an exact full gradient.

``f(X) = (1/N) Σ_i CE(head(tanh(hidden(x_i))), y_i)`` on all N = 1,797 scikit-learn digits (pixels
in [0, 1], 20% of the labels redrawn at random), a 64→16→10 MLP with biases (1,210 parameters).
tanh and the cross-entropy are smooth, the network makes ``f`` nonconvex, and the full gradient is
one batched backward pass. The
stochastic oracle is a minibatch of ``b`` samples drawn uniformly with replacement, so
``σ² = E‖g_b − ∇f‖² = σ₁²/b``: the batch size controls the noise.

Geometry (one for every method, so the metric is the same): hidden and head matrices spectral with
Scion's factor ``sqrt(d_in/d_out)``, biases RMS. The metric is fedgluon's "true gradient dual
norm", ``Σ_i ‖∇_i f(X)‖_(i)*`` over the layers (``Geometry.dual_norms`` of the full gradient).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedgluon.lmo.geometry import Geometry
from fedgluon.tasks.data.tabular import load_sklearn

GEOMETRY = {"preset": "scion", "overrides": [{"pattern": "head.weight", "norm": "spectral"}]}


class TanhMLP(nn.Module):
    """``64 → hidden (tanh) → 10``; ``head`` is the output layer (a smooth network, unlike ReLU)."""

    parameter_roles = {"head.weight": "head"}

    def __init__(self, in_features: int = 64, hidden: int = 16, classes: int = 10):
        super().__init__()
        self.hidden = nn.Linear(in_features, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.hidden(x)))


LABEL_NOISE = 0.2  # fraction of samples whose label is redrawn uniformly (fixed, seed 0)


@lru_cache(maxsize=2)
def digits(label_noise: float = LABEL_NOISE) -> tuple[Tensor, Tensor]:
    """All 1,797 digits as float32 inputs in [0, 1] and int64 labels, ``label_noise`` of them redrawn
    uniformly at random (generator seed 0, the same for every run): the small network cannot fit those,
    so the minibatch noise does not vanish near stationary points (no interpolation). Cached: callers
    must not modify the tensors."""
    x, y = load_sklearn("digits")
    x, y = torch.from_numpy(x), torch.from_numpy(y).clone()
    gen = torch.Generator().manual_seed(0)
    flip = torch.rand(len(y), generator=gen) < label_noise
    y[flip] = torch.randint(0, 10, (int(flip.sum()),), generator=gen)
    return x, y


def make_model(seed: int, hidden: int = 16) -> TanhMLP:
    """The model with PyTorch's default initialisation under ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return TanhMLP(hidden=hidden)


def make_geometry(model: nn.Module) -> Geometry:
    return Geometry.from_model(model, **GEOMETRY, spectral_method="svd")


def full_gradient(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """``∇f`` at the model's current parameters over all of ``(x, y)`` (leaves ``.grad`` untouched)."""
    params = [p for p in model.parameters()]
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params)
    return {n: g.detach() for (n, _), g in zip(model.named_parameters(), grads)}


def grad_dual_norm(geometry: Geometry, grads: Mapping[str, Tensor]) -> float:
    """fedgluon's true-gradient metric: ``Σ_i ‖∇_i f‖_(i)*`` (the sum of the layers' dual norms)."""
    return float(sum(float(v) for v in geometry.dual_norms(grads).values()))


def noise_level(model: nn.Module, x: Tensor, y: Tensor, geometry: Geometry, batch: int, draws: int = 64,
                seed: int = 0) -> float:
    """``sqrt(mean ‖g_b − ∇f‖_*²)`` over ``draws`` minibatches at the current parameters: the σ of the
    oracle in the metric's dual norm (Σ over layers)."""
    full = full_gradient(model, x, y)
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(draws):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        g = full_gradient(model, x[idx], y[idx])
        total += grad_dual_norm(geometry, {n: g[n] - full[n] for n in g}) ** 2
    return (total / draws) ** 0.5
