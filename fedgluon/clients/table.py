"""The client-state table: every client's committed state, one tensor of shape ``(n_clients, *shape)``
per leaf of the run's client-state schema (:mod:`fedgluon.clients.state_schema`).

How a block steps on its rows (:meth:`ClientStateTable.rows`: views or gathered copies) and how only the
accepted clients' rows are copied in after the server step (:meth:`ClientStateTable.write_accepted`): docs/DESIGN.md
§3, "Client state". The server derives two columns, never read from a reply: ``commits`` ((n,) int64; 0 marks
a *first participation*: EMA's first ``m = g``, DASHA's dense first message) and ``seen`` ((n,) int64, −1:
none; the client's ``X_prev`` is ``models[seen]``, a history of broadcast models kept while any client points
at one, instead of an ``(n, d)`` column).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fedgluon.clients.state_schema import SEP, StateSchema, leaves

Tensors = dict[str, Tensor]
NEVER = -1  # ``seen`` of a client that never computed


def nest(flat: Mapping[str, Tensor]) -> dict[str, Any]:
    """The nested state tree of ``flat`` (``/``-joined path → tensor)."""
    root: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, key = path.split(SEP)
        node = root
        for p in parents:
            node = node.setdefault(p, {})
        node[key] = value
    return root


def flatten(tree: Mapping[str, Any] | None) -> dict[str, Tensor]:
    """Path → tensor of a nested state tree (empty sub-dicts carry no tensor)."""
    return {path: value for path, value in leaves(tree or {}) if value is not None}


@dataclass
class ClientRows:
    """A block's committed client states, one row per client (``clients`` in row order)."""

    clients: list[int]
    tree: dict[str, Any] | None  # nested dict of (B, *shape) tensors; None: no state yet (the schema step)
    commits: Tensor  # (B,) int64
    seen: Tensor  # (B,) int64, NEVER for a client that never computed
    models: Mapping[int, Tensors] = field(default_factory=dict)  # round → broadcast model, for X_prev

    @classmethod
    def fresh(cls, clients: Sequence[int]) -> ClientRows:
        """Clients that never stepped, without a table (the schema step)."""
        b = len(clients)
        return cls(list(clients), None, torch.zeros(b, dtype=torch.int64), torch.full((b,), NEVER, dtype=torch.int64))

    def __len__(self) -> int:
        return len(self.clients)

    @property
    def first(self) -> Tensor:
        """(B,) bool: the rows whose client participates for the first time."""
        return self.commits == 0

    def part(self, rows: slice) -> ClientRows:
        """Rows ``rows`` of the block (views; the block itself when they are all of it)."""
        if rows.indices(len(self.clients))[:2] == (0, len(self.clients)) and rows.step in (None, 1):
            return self
        tree = None if self.tree is None else _map(self.tree, lambda t: t[rows])
        return ClientRows(self.clients[rows], tree, self.commits[rows], self.seen[rows], self.models)

    def select(self, clients: Sequence[int]) -> ClientRows:
        """The rows of ``clients`` (a subset of :attr:`clients`, in order): views when they are all."""
        if list(clients) == self.clients:
            return self
        at = torch.as_tensor([self.clients.index(j) for j in clients], dtype=torch.int64)
        tree = None if self.tree is None else _map(self.tree, lambda t: t.index_select(0, at))
        return ClientRows(list(clients), tree, self.commits[at], self.seen[at], self.models)


def _consecutive(clients: Sequence[int]) -> slice | None:
    """The slice of sorted ids ``clients`` when they are consecutive (a block of the federation), else None."""
    if clients and list(clients) == list(range(clients[0], clients[0] + len(clients))):
        return slice(clients[0], clients[0] + len(clients))
    return None


def _map(tree: Mapping[str, Any], f) -> dict[str, Any]:
    return {k: _map(v, f) if isinstance(v, Mapping) else f(v) for k, v in tree.items()}


class ClientStateTable:
    """Every client's committed state (docs/DESIGN.md §3, "Client state"); ``keep_models``: keep the
    broadcast models that clients' ``seen`` points at (algorithms whose estimator needs ``X_prev``)."""

    FORMAT = 1

    def __init__(self, schema: StateSchema, num_clients: int, keep_models: bool):
        self.schema, self.num_clients, self.keep_models = schema, num_clients, keep_models
        self.columns: Tensors = {path: torch.zeros((num_clients, *leaf.shape), dtype=getattr(torch, leaf.dtype))
                                 for path, leaf in schema.leaves.items() if leaf.dtype is not None}
        self.commits = torch.zeros(num_clients, dtype=torch.int64)
        self.seen = torch.full((num_clients,), NEVER, dtype=torch.int64)
        self.models: dict[int, Tensors] = {}

    def rows(self, clients: Sequence[int]) -> ClientRows:
        """The committed rows of ``clients`` (sorted ids): views when they are consecutive, else copies."""
        clients = list(clients)
        run = _consecutive(clients)
        if run is not None:
            take = lambda t: t[run]  # noqa: E731
        else:
            index = torch.as_tensor(clients, dtype=torch.int64)
            take = lambda t: t.index_select(0, index)  # noqa: E731
        seen = take(self.seen)
        models = {r: self.models[r] for r in set(seen.tolist()) if r in self.models}
        return ClientRows(clients, nest({p: take(c) for p, c in self.columns.items()}),
                          take(self.commits), seen, models)

    def travelling(self, derived: tuple[str, ...] = ()) -> dict[str, Tensor]:
        """The columns a reply carries: those whose path starts with none of the ``derived`` prefixes."""
        return {p: c for p, c in self.columns.items() if not p.startswith(derived)}

    def check(self, proposed: Mapping[str, Tensor], rows: int, derived: tuple[str, ...] = ()) -> str | None:
        """Why proposed columns of a block of ``rows`` clients do not fit the schema (None when they do):
        a path missing or unknown (paths under a ``derived`` prefix must not come), a column of another
        dtype or shape than ``(rows, *leaf.shape)``."""
        expected = self.travelling(derived)
        if proposed.keys() != expected.keys():
            extra = sorted(set(proposed) - set(expected))[:3]
            missing = sorted(set(expected) - set(proposed))[:3]
            return f"state columns differ from the schema (unexpected {extra}, missing {missing})"
        for path, column in expected.items():
            got = proposed[path]
            shape = (rows, *column.shape[1:])
            if not isinstance(got, Tensor) or got.dtype != column.dtype or tuple(got.shape) != shape:
                desc = f"{got.dtype} {tuple(got.shape)}" if isinstance(got, Tensor) else type(got).__name__
                return f"state column {path!r} is {desc}, expected {column.dtype} {shape}"
        return None

    def write(self, clients: Sequence[int], rows: Mapping[str, Tensor]) -> None:
        """Copy ``rows`` (some schema paths → (B, *shape), row i client ``clients[i]``, sorted ids) into the
        columns: one slice copy per path for consecutive clients, else one ``index_copy_``."""
        if not clients:
            return
        run = _consecutive(clients)
        ids = None if run is not None else torch.as_tensor(list(clients), dtype=torch.int64)
        for path, new in rows.items():
            column = self.columns[path]
            if new.untyped_storage().data_ptr() == column.untyped_storage().data_ptr():
                new = new.clone()  # rows handed back unchanged (views of this column)
            if run is not None:
                column[run].copy_(new)
            else:
                column.index_copy_(0, ids, new)

    def write_accepted(self, clients: Sequence[int], proposed: Mapping[str, Tensor],
                       accepted: Collection[int]) -> list[int]:
        """:meth:`write` the rows of the ``accepted`` clients among ``clients`` (row i of every ``proposed``
        column is client ``clients[i]``'s); returns those clients."""
        at = [i for i, j in enumerate(clients) if j in accepted]
        ids = [clients[i] for i in at]
        if at:
            index = torch.as_tensor(at, dtype=torch.int64)
            whole = len(at) == len(clients)
            self.write(ids, {p: t if whole else t.index_select(0, index) for p, t in proposed.items()})
        return ids

    def mark(self, clients: Sequence[int], k: int, model: Mapping[str, Tensor]) -> None:
        """Round ``k`` is committed for ``clients``, who computed at ``model``: ``commits + 1``, ``seen = k``."""
        if not clients:
            return
        ids = torch.as_tensor(list(clients), dtype=torch.int64)
        self.commits.index_add_(0, ids, torch.ones(len(ids), dtype=torch.int64))
        self.seen.index_fill_(0, ids, k)
        if self.keep_models:
            self.models[k] = dict(model)

    def settle(self) -> None:
        """Forget the models no client points at any more (after a round's commits)."""
        live = set(self.seen.tolist())
        self.models = {r: m for r, m in self.models.items() if r in live}

    @property
    def bytes_per_client(self) -> int:
        """Bytes of one client's row (state columns, ``commits`` and ``seen``)."""
        return self.schema.nbytes + 2 * self.commits.element_size()

    def state_dict(self) -> dict[str, Any]:
        return {"format": self.FORMAT, "columns": self.columns, "commits": self.commits, "seen": self.seen,
                "models": self.models}

    def load_state_dict(self, data: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; ValueError naming the first part that does not fit this table."""
        if not isinstance(data, Mapping) or data.get("format") != self.FORMAT:
            fmt = data.get("format") if isinstance(data, Mapping) else None
            raise ValueError(f"client-state table format {fmt!r}, expected {self.FORMAT}")
        why = self.check(data["columns"], self.num_clients)
        if why is not None:
            raise ValueError(f"the client-state table does not fit this run's schema: {why}")
        for name in ("commits", "seen"):
            got = data[name]
            if not isinstance(got, Tensor) or got.dtype != torch.int64 or tuple(got.shape) != (self.num_clients,):
                raise ValueError(f"client-state table {name!r} must be int64 ({self.num_clients},)")
        missing = set(data["seen"].tolist()) - set(data["models"]) - {NEVER}
        if self.keep_models and missing:
            raise ValueError(f"client-state table lacks the models of rounds {sorted(missing)[:5]}")
        self.columns = {p: t.clone() for p, t in data["columns"].items()}
        self.commits, self.seen = data["commits"].clone(), data["seen"].clone()
        self.models = {int(r): dict(m) for r, m in data["models"].items()}
