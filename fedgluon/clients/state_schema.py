"""The client-state schema: the leaves, dtypes and shapes of every client's state, fixed from round 0.

Found, not hand-declared, by one throwaway client step (:meth:`fedgluon.algorithms.Algorithm.state_schema`);
what the server checks against it: docs/DESIGN.md §3, "Client state". Paths are ``/``-joined keys; an empty
sub-dict is its path with a trailing ``/`` and no array."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

SEP = "/"


def leaves(tree: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """``(path, value)`` of every leaf of a nested dict, depth first in key order; an empty sub-dict
    yields ``(path + "/", None)``. A generator: a caller that stops at the first unknown path never
    walks the rest of a state of 200,000 leaves."""
    stack: list[tuple[str, Any]] = [("", tree)]
    while stack:
        prefix, node = stack.pop()
        if isinstance(node, Mapping) and (node or not prefix):
            for key in reversed(list(node)):
                stack.append((f"{prefix}{key}" if not prefix else f"{prefix}{SEP}{key}", node[key]))
            continue
        yield (prefix + SEP, None) if isinstance(node, Mapping) else (prefix, node)


@dataclass(frozen=True)
class Leaf:
    dtype: str | None  # None: an empty sub-dict
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        if self.dtype is None:
            return 0
        return math.prod(self.shape) * getattr(torch, self.dtype).itemsize


@dataclass(frozen=True)
class StateSchema:
    """Path → :class:`Leaf` of a client's state (docs/DESIGN.md §3, "Client state")."""

    leaves: Mapping[str, Leaf]

    @classmethod
    def of(cls, tree: Mapping[str, Any] | None) -> StateSchema:
        """The schema of one state (the layout every other state must have)."""
        out: dict[str, Leaf] = {}
        for path, value in leaves(tree or {}):
            if value is None:
                out[path] = Leaf(None, ())
            elif isinstance(value, Tensor):
                out[path] = Leaf(str(value.dtype).removeprefix("torch."), tuple(value.shape))
            else:
                raise TypeError(f"client state leaf {path!r} is a {type(value).__name__}, not a tensor")
        return cls(out)

    @property
    def nbytes(self) -> int:
        """Bytes of one client's state."""
        return sum(leaf.nbytes for leaf in self.leaves.values())
