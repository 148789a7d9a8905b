"""LEAF-style synthetic(α, β) federated classification (Caldas et al., LEAF, 2018; the FedProx
"Synthetic(α, β)" data of Li et al., 2020).

Client k: ``u_k ~ N(0, α)``; ``W_k ~ N(u_k, 1)`` (C×d), ``b_k ~ N(u_k, 1)``; ``B_k ~ N(0, β)``,
``v_k ~ N(B_k, 1)`` (d); ``x ~ N(v_k, Σ)`` with ``Σ = diag(j^{−1.2})``; ``y = argmax(W_k x + b_k)``.
α controls how much the local models differ, β how much the local inputs differ; (0, 0) is
close to iid. Sample counts per client follow a lognormal, as in LEAF.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def leaf_synthetic(num_clients: int, alpha: float = 1.0, beta: float = 1.0, *, dim: int = 60, classes: int = 10,
                   mean_samples: int = 100, min_samples: int = 20, seed: int = 0,
                   dtype: torch.dtype = torch.float32) -> list[tuple[Tensor, Tensor]]:
    """One ``(inputs (n_k, dim), labels (n_k,))`` pair per client, reproducible from ``seed``."""
    for name, value, least in (("num_clients", num_clients, 1), ("alpha", alpha, 0), ("beta", beta, 0),
                               ("dim", dim, 1), ("classes", classes, 2)):
        if not value >= least:
            raise ValueError(f"{name} must be >= {least}, got {value}")
    rng = np.random.default_rng(seed)
    sizes = np.maximum(min_samples, rng.lognormal(np.log(mean_samples), 0.5, num_clients).astype(int))
    std = np.arange(1, dim + 1, dtype=np.float64) ** -0.6  # Σ = diag(j^-1.2) is diagonal: x = v + std ⊙ z
    out = []
    for k in range(num_clients):
        u = rng.normal(0, np.sqrt(alpha))
        W = rng.normal(u, 1, (classes, dim))
        b = rng.normal(u, 1, classes)
        v = rng.normal(rng.normal(0, np.sqrt(beta)), 1, dim)
        x = v + std * rng.standard_normal((sizes[k], dim))
        y = np.argmax(x @ W.T + b, axis=1)
        out.append((torch.tensor(x, dtype=dtype), torch.tensor(y, dtype=torch.long)))
    return out
