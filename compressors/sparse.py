"""A decoded sparse payload: ``k`` values at strictly increasing flat indices of a tensor of ``shape``.

Sparse structures (top-k, rand-k) decode to this instead of a dense tensor when asked
(``decompress(..., sparse=True)``), so error feedback and the server's weighted sums add ``k`` values
instead of ``d``. Adding at the indices equals adding the dense decoded tensor element for element
(``b + w·0 = b``; only the sign of a zero may differ), since the indices are distinct.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SparseTensor:
    idx: Tensor  # int64, strictly increasing, in [0, numel(shape))
    values: Tensor
    shape: tuple[int, ...]

    def dense(self) -> Tensor:
        out = torch.zeros(self.shape, dtype=self.values.dtype, device=self.values.device)
        out.view(-1)[self.idx] = self.values
        return out

    def nbytes(self) -> int:
        return self.idx.numel() * self.idx.element_size() + self.values.numel() * self.values.element_size()


def add_scaled_(out: Tensor, w: float, r: Tensor | SparseTensor) -> Tensor:
    """``out += w · r`` in place (``w · r`` rounded first, then added, as the dense expression does;
    ``r`` is cast to ``out``'s dtype before the product)."""
    if isinstance(r, SparseTensor):
        out.view(-1).index_add_(0, r.idx, w * r.values.to(out.dtype))
    else:
        out += w * r.to(out.dtype)
    return out


def added(base: Tensor, w: float, r: Tensor | SparseTensor) -> Tensor:
    """``base + w · r`` as a new tensor."""
    return add_scaled_(base.clone(), w, r)
