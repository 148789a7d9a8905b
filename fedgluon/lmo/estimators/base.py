"""The block estimator interface: a block's state rows, its first-step mask (:class:`Rows`), and the
one-model step of the optimizer (:meth:`Estimator.step_one`; see :mod:`fedgluon.lmo.estimators`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch
from torch import Tensor

Tensors = dict[str, Tensor]
State = dict[str, Tensors]


def _check_beta(beta: float, *, allow_one: bool = False) -> None:
    ok = 0.0 <= beta <= 1.0 if allow_one else 0.0 <= beta < 1.0
    if not ok:
        raise ValueError(f"beta must be in [0, 1{']' if allow_one else ')'}, got {beta}")


def _require_prev(name: str, g_prev: Mapping[str, Tensor] | None) -> Mapping[str, Tensor]:
    if g_prev is None:
        raise ValueError(f"estimator {name!r} needs the gradient at the previous iterate on the same "
                         "batch (g_prev); pass it, or use the optimizer's closure protocol")
    return g_prev


class Rows:
    """A block's first-step mask ``first`` ((B,) bool) and the row selections made with it."""

    def __init__(self, first: Tensor, every: bool | None = None) -> None:
        """``every``: the one value of a block of one, known without reading ``first``."""
        self.first = first
        self.any = bool(first.any()) if every is None else every
        self.all = bool(first.all()) if every is None else every

    def _mask(self, t: Tensor) -> Tensor:
        return self.first.view(-1, *([1] * (t.ndim - 1))).to(t.device)

    def where(self, on_first: Tensor, otherwise: Tensor) -> Tensor:
        """``on_first`` in first rows, ``otherwise`` in the rest (a new tensor unless no row is first)."""
        return torch.where(self._mask(otherwise), on_first, otherwise) if self.any else otherwise

    def zero(self, t: Tensor) -> Tensor:
        """``t`` with its first rows set to 0: the state a first step starts from, whatever the row held."""
        if self.all:
            return torch.zeros_like(t)
        return t.masked_fill(self._mask(t), 0) if self.any else t


def _clone(t: Mapping[str, Tensor]) -> Tensors:
    return {k: v.clone() for k, v in t.items()}


def _as_block(t: Mapping[str, Tensor]) -> Tensors:
    return {k: v.unsqueeze(0) for k, v in t.items()}


def _row(t: Mapping[str, Tensor], i: int) -> Tensors:
    return {k: v[i] for k, v in t.items()}


def _state_row(state: State, i: int) -> State:
    return {grp: _row(part, i) for grp, part in state.items()}


_FIRST, _LATER = torch.tensor([True]), torch.tensor([False])  # read only

class Estimator(ABC):
    """A gradient estimator over a block of clients; subclasses define :meth:`zero_state` and ``_update``."""

    name: str = "estimator"
    needs_previous: bool = False  # uses ∇f(X^{k−1}; ξ_k)
    supports_refresh: bool = False  # accepts a large-batch refresh (SARAH/PAGE)

    @abstractmethod
    def zero_state(self, g: Mapping[str, Tensor]) -> State:
        """The zero-filled state of a block shaped like the gradients ``g`` ((B, *shape) each)."""

    @abstractmethod
    def _update(self, state: State, g_now: Mapping[str, Tensor], g_prev: Mapping[str, Tensor] | None,
                rows: Rows) -> tuple[State, Tensors]:
        """The block step, ``first`` already checked."""

    def schema(self, shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype) -> dict[str, dict[str, tuple]]:
        """One client's state layout: ``{group: {name: (shape, dtype)}}`` for parameters of these shapes."""
        meta = {k: torch.empty((1, *s), dtype=dtype, device="meta") for k, s in shapes.items()}
        return {grp: {k: (tuple(t.shape[1:]), t.dtype) for k, t in part.items()}
                for grp, part in self.zero_state(meta).items()}

    def update(self, state: State, g_now: Mapping[str, Tensor], g_prev: Mapping[str, Tensor] | None,
               first: Tensor) -> tuple[State, Tensors]:
        """One step of a block: the new state and the gradient estimate handed to the LMO, row by row.

        ``first`` ((B,) bool) marks the rows whose client steps for the first time; their state rows are
        ignored (zero-filled in a table)."""
        return self._update(state, g_now, g_prev, self._rows(first, g_now))

    def refresh(self, state: State, g_large: Mapping[str, Tensor], first: Tensor) -> tuple[State, Tensors]:
        """A large-batch refresh of a block (SARAH/PAGE); same conventions as :meth:`update`."""
        raise ValueError(f"estimator {self.name!r} has no large-batch refresh")

    @staticmethod
    def _rows(first: Tensor, g: Mapping[str, Tensor]) -> Rows:
        b = next(iter(g.values())).shape[0] if g else first.shape[0]
        if not isinstance(first, Tensor) or first.dtype != torch.bool or tuple(first.shape) != (b,):
            raise ValueError(f"first must be a ({b},) bool tensor, one entry per row of the block")
        return Rows(first)

    def step_one(self, state: State | None, g_now: Mapping[str, Tensor], g_prev: Mapping[str, Tensor] | None = None,
                 *, refresh: bool = False) -> tuple[State, Tensors]:
        """One model's step (the optimizer's, B = 1) on unbatched tensors: the block step of one row
        (unsqueezed views, no copy); ``state is None`` on the first step; the state comes back unbatched."""
        g1 = _as_block(g_now)
        s1 = self.zero_state(g1) if state is None else {grp: _as_block(part) for grp, part in state.items()}
        if refresh:
            new, est = self.refresh(s1, g1, _FIRST if state is None else _LATER)
        else:
            rows = Rows(_FIRST, True) if state is None else Rows(_LATER, False)
            new, est = self._update(s1, g1, None if g_prev is None else _as_block(g_prev), rows)
        return _state_row(new, 0), _row(est, 0)


def _zeros(g: Mapping[str, Tensor]) -> Tensors:
    return {k: torch.zeros_like(v) for k, v in g.items()}


def _batch(g: Mapping[str, Tensor]) -> int:
    return next(iter(g.values())).shape[0]


def _device(g: Mapping[str, Tensor]) -> torch.device:
    return next(iter(g.values())).device
