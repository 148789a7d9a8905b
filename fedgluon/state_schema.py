"""The client-state schema: the leaves, dtypes and shapes of every client's state, fixed from round 0.

A client's state is a nested dict of tensors (an estimator's momentum, an error-feedback tracker, a
compressor's warm start, the commit counter, the model it last computed at). Every client of a run
holds the same layout, so the server fixes it once, before the first round, and checks every state it
is about to commit against it: a state a client returns with an extra or missing leaf, a leaf of
another dtype or shape, or more leaves than the schema has is rejected for that client (logged with
the reason), so a reply can neither grow the checkpoint nor slow later rounds. States that crossed a
process boundary are checked for NaN/Inf too.

The layout is found, not hand-declared: :meth:`fedgluon.algorithms.Algorithm.state_schema` steps one
throwaway client from no state at round 0 and reads the layout of what it proposes, so the schema
cannot drift from the code that makes the states (``tests/test_state_schema.py`` checks every
algorithm's states over several rounds against it).

Paths are ``/``-joined keys; an empty sub-dict is its path with a trailing ``/`` and no array (the
wire format of ``strategies/wire.py`` uses the same paths).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import Tensor

SEP = "/"


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` → ``"float32"`` (the names the wire format uses)."""
    return str(dtype).removeprefix("torch.")


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
    """Path → :class:`Leaf` of a client's state (module docstring)."""

    leaves: Mapping[str, Leaf]

    @classmethod
    def of(cls, tree: Mapping[str, Any] | None) -> StateSchema:
        """The schema of one state (the layout every other state must have)."""
        out: dict[str, Leaf] = {}
        for path, value in leaves(tree or {}):
            if value is None:
                out[path] = Leaf(None, ())
            elif isinstance(value, Tensor):
                out[path] = Leaf(dtype_name(value.dtype), tuple(value.shape))
            else:
                raise TypeError(f"client state leaf {path!r} is a {type(value).__name__}, not a tensor")
        return cls(out)

    @cached_property
    def _expected(self) -> dict[str, Any]:
        """The schema as a nested dict of ``(torch dtype, shape)`` leaves (empty sub-dicts empty), for
        :meth:`_fits`."""
        root: dict[str, Any] = {}
        for path, leaf in self.leaves.items():
            *parents, key = path.split(SEP)
            node = root
            for p in parents:
                node = node.setdefault(p, {})
            if leaf.dtype is not None:
                node[key] = (getattr(torch, leaf.dtype), torch.Size(leaf.shape))
        return root

    def _fits(self, node: Any, expected: dict[str, Any]) -> bool:
        """Whether a state of plain dicts fits: key sets compared per dict, dtypes and shapes per leaf, no
        path strings (the per-client check of every round; :meth:`mismatch` explains a False)."""
        if type(node) is not dict or node.keys() != expected.keys():
            return False
        for key, want in expected.items():
            value = node[key]
            if type(want) is dict:
                if not self._fits(value, want):
                    return False
            elif not (isinstance(value, Tensor) and value.dtype == want[0] and value.shape == want[1]):
                return False
        return True

    @property
    def nbytes(self) -> int:
        """Bytes of one client's state (shared leaves counted as if each client held its own)."""
        return sum(leaf.nbytes for leaf in self.leaves.values())

    def mismatch(self, tree: Any) -> str | None:
        """Why ``tree`` does not fit the schema (None when it does): not a dict, a leaf missing, extra or of
        another dtype or shape (paths are unique, so a state with more leaves than the schema has one
        it does not know, and the walk stops there). Values are not read: the Flower engines scan what
        crosses a process boundary for NaN/Inf where it arrives (strategies/wire.py)."""
        if self._fits(tree, self._expected):
            return None
        if not isinstance(tree, Mapping):
            return f"state must be a mapping, got {type(tree).__name__}"
        seen = 0
        for path, value in leaves(tree):
            want = self.leaves.get(path)
            if want is None:
                return f"unexpected state leaf {path[:200]!r}"
            seen += 1
            if want.dtype is None:  # an empty sub-dict ("path/"): only an empty mapping walks to it
                continue
            if not isinstance(value, Tensor):
                return f"state leaf {path!r} must be a tensor, got {type(value).__name__}"
            if dtype_name(value.dtype) != want.dtype or tuple(value.shape) != want.shape:
                return (f"state leaf {path!r} is {dtype_name(value.dtype)} {tuple(value.shape)}, "
                        f"expected {want.dtype} {want.shape}")
        if seen != len(self.leaves):
            missing = sorted(set(self.leaves) - {p for p, _ in leaves(tree)})
            return f"state lacks the leaves {missing[:5]}"
        return None

    def layout_mismatch(self, entries: list[tuple[str, str | None, tuple[int, ...]]]) -> str | None:
        """:meth:`mismatch` of a state described by its wire layout ``(path, dtype or None, shape)``, before
        any of its bytes are read."""
        if len(entries) != len(self.leaves):
            return f"state has {len(entries)} leaves, the schema {len(self.leaves)}"
        for path, dtype, shape in entries:
            want = self.leaves.get(path)
            if want is None:
                return f"unexpected state leaf {str(path)[:200]!r}"
            if want.dtype != dtype or want.shape != tuple(shape):
                return f"state leaf {path!r} is {dtype} {tuple(shape)}, expected {want.dtype} {want.shape}"
        return None

    def describe(self) -> str:
        return "\n".join(f"{p}: {leaf.dtype} {leaf.shape}" for p, leaf in self.leaves.items())
