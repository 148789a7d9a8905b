"""Small linear-algebra routines shared by estimators and compressors."""

from __future__ import annotations

import torch
from torch import Tensor


def randomized_svd(M: Tensor, rank: int, oversample: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Rank-``r`` randomized SVD (Halko–Martinsson–Tropp; LiMuon's RSVD, docs/ALGORITHMS.md §7).

    ``Ω ~ N(0,1)^{n×(r+s)}`` (drawn on the CPU from ``generator``), ``Y = MΩ``, ``Q = qr(Y)``,
    ``B = QᵀM = Ũ Σ Vᵀ``; returns ``P = Q Ũ_r Σ_r`` (m×r) and ``V_r`` (n×r), so ``M ≈ P V_rᵀ``.
    """
    m, n = M.shape
    r = min(rank, m, n)
    k = min(r + oversample, m, n)
    omega = torch.randn(n, k, generator=generator, dtype=torch.float64).to(M.device, M.dtype)
    Q, _ = torch.linalg.qr(M @ omega)
    U, S, Vh = torch.linalg.svd(Q.mT @ M, full_matrices=False)
    return (Q @ U[:, :r]) * S[:r], Vh[:r].mT
