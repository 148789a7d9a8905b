"""A decoded sparse payload: ``k`` values at strictly increasing flat indices of a tensor of ``shape``.

Sparse structures (top-k, rand-k) decode to this instead of a dense tensor when asked
(``decompress(..., sparse=True)``), so error feedback and the server's weighted sums add ``k`` values
instead of ``d``. Adding at the indices equals adding the dense decoded tensor element for element
(``b + w·0 = b``; only the sign of a zero may differ), since the indices are distinct.

A server decodes the rows of a block's payload group at once (:func:`compressors.decode_messages`)
into one :class:`SparseRows` — (B, k) indices and values — whose rows are the clients'
``SparseTensor``; :class:`WeightedSum` then adds a run of consecutive rows in one ``index_add_``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor


class SparseTensor:
    """``values`` at the flat indices ``idx`` (int64, strictly increasing, in ``[0, numel(shape))``) of a
    tensor of ``shape``. Row ``row`` of a :class:`SparseRows` ``block`` makes its two row views only when
    they are read (a server round reads most rows only through their block, in :class:`WeightedSum`)."""

    __slots__ = ("_idx", "_values", "shape", "block", "row")

    def __init__(self, idx: Tensor | None, values: Tensor | None, shape: tuple[int, ...],
                 block: SparseRows | None = None, row: int = -1):
        if (idx is None or values is None) and block is None:
            raise ValueError("a SparseTensor needs its indices and values, or the block row holding them")
        self._idx, self._values, self.shape, self.block, self.row = idx, values, shape, block, row

    @property
    def idx(self) -> Tensor:
        return self._idx if self._idx is not None else self._views()[0]

    @property
    def values(self) -> Tensor:
        return self._values if self._values is not None else self._views()[1]

    def _views(self) -> tuple[Tensor, Tensor]:
        """Make (and keep) the row views of the block's indices and values."""
        assert self.block is not None
        self._idx, self._values = self.block.idx[self.row], self.block.values[self.row]
        return self._idx, self._values

    def dense(self) -> Tensor:
        out = torch.zeros(self.shape, dtype=self.values.dtype, device=self.values.device)
        out.view(-1)[self.idx] = self.values
        return out

    def nbytes(self) -> int:
        if self._idx is None and self.block is not None:
            return self.block.row_nbytes()
        return self.idx.numel() * self.idx.element_size() + self.values.numel() * self.values.element_size()

    def __repr__(self) -> str:
        return f"SparseTensor(k={self.idx.numel()}, shape={self.shape})"


@dataclass
class SparseRows:
    """B sparse tensors of one shape and one k: row i of ``idx`` (B, k) and ``values`` (B, k)."""

    idx: Tensor
    values: Tensor
    shape: tuple[int, ...]

    def __post_init__(self) -> None:  # one row's bytes of indices and values (read once per client and layer)
        idx, values = self.idx, self.values
        self._row_nbytes = idx.shape[1] * idx.element_size() + values.shape[1] * values.element_size()

    def dense(self) -> Tensor:
        """The (B, *shape) dense tensors (zeros off the indices)."""
        out = torch.zeros((len(self.idx), *self.shape), dtype=self.values.dtype, device=self.values.device)
        out.view(len(self.idx), -1).scatter_(1, self.idx, self.values)
        return out

    def add_into_(self, out: Tensor, w: float = 1.0) -> Tensor:
        """``out[i] += w · row i`` for the (B, *shape) contiguous ``out``, in one ``index_add_`` at the flat
        positions ``i·d + idx`` (distinct: each gets its one term, rounded as :func:`add_scaled_`)."""
        B = out.shape[0]
        values = self.values if self.values.dtype == out.dtype else self.values.to(out.dtype)
        if w != 1.0:  # 1·v is v exactly: the product is skipped, not rounded differently
            values = w * values
        if B > 1:
            d = out.numel() // B
            flat = self.idx + torch.arange(0, B * d, d, device=self.idx.device)[:, None]
        else:
            flat = self.idx
        out.view(-1).index_add_(0, flat.reshape(-1), values.reshape(-1))
        return out

    def tensor(self, i: int) -> SparseTensor:
        return SparseTensor(None, None, self.shape, self, i)

    def row_nbytes(self) -> int:
        """Bytes of one row's indices and values."""
        return self._row_nbytes


def add_scaled_(out: Tensor, w: float, r: Tensor | SparseTensor) -> Tensor:
    """``out += w · r`` in place (``w · r`` rounded first, then added, as the dense expression does;
    ``r`` is cast to ``out``'s dtype before the product)."""
    v = r.values if isinstance(r, SparseTensor) else r
    v = v if v.dtype == out.dtype else v.to(out.dtype)
    v = v if w == 1.0 else w * v  # 1·v is v exactly
    if isinstance(r, SparseTensor):
        out.view(-1).index_add_(0, r.idx, v)
    else:
        out += v
    return out


def weighted_sum(start: Mapping[str, Tensor], terms: Mapping[int, Mapping[str, Tensor | SparseTensor]],
                 weights: Mapping[int, float]) -> dict[str, Tensor]:
    """``start + Σ_j w_j r_j`` into a copy of ``start``, the terms ``r_j`` added in increasing ``j`` (a layer
    that ``start`` lacks starts at zero); sparse terms at their indices (:class:`WeightedSum`)."""
    total = WeightedSum({n: t.clone() for n, t in start.items()})
    for j in sorted(terms):
        total.add(weights[j], terms[j])
    return total.result()


class WeightedSum:
    """``out[n] += w_j · r_j[n]`` for the terms ``(w_j, r_j)`` given to :meth:`add` in order, each add
    rounded as :func:`add_scaled_` does. Consecutive rows of one :class:`SparseRows` (clients decoded as
    a block, added in row order) go in one ``index_add_`` of their (rows·k) indices and weighted
    values: the same sums in the same order, since on CPU ``index_add_`` adds its source elements one
    after another and ``w · v`` rounds ``w`` to the values' dtype either way (tests compare the two
    bitwise). On other devices, where ``index_add_`` adds concurrently, rows are added one by one.
    Missing outputs start at zero; call :meth:`result` once all terms are in."""

    def __init__(self, out: dict[str, Tensor] | None = None):
        self.out: dict[str, Tensor] = out if out is not None else {}
        self._run: dict[str, tuple[SparseRows, int, list[float]]] = {}  # n -> (block, first row, weights)

    def add(self, w: float, terms: Mapping[str, Tensor | SparseTensor]) -> None:
        for n, r in terms.items():
            run = self._run.get(n)
            if run is not None and isinstance(r, SparseTensor) and r.block is run[0] and r.row == run[1] + len(run[2]):
                run[2].append(w)
                continue
            self._flush(n)
            target = self._target(n, r)
            if isinstance(r, SparseTensor) and r.block is not None and target.device.type == "cpu":
                self._run[n] = (r.block, r.row, [w])
            else:
                add_scaled_(target, w, r)

    def result(self) -> dict[str, Tensor]:
        for n in list(self._run):
            self._flush(n)
        return self.out

    def _target(self, n: str, r: Tensor | SparseTensor) -> Tensor:
        if n not in self.out:
            v = r.values if isinstance(r, SparseTensor) else r
            self.out[n] = torch.zeros(r.shape, dtype=v.dtype, device=v.device)
        return self.out[n]

    def _flush(self, n: str) -> None:
        run = self._run.pop(n, None)
        if run is None:
            return
        block, first, ws = run
        out = self.out[n]
        rows = slice(first, first + len(ws))
        scale = torch.tensor(ws, dtype=out.dtype, device=out.device).unsqueeze(1)
        out.view(-1).index_add_(0, block.idx[rows].reshape(-1), (scale * block.values[rows].to(out.dtype)).reshape(-1))
