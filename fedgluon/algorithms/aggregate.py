"""The server's view of a round's accepted payloads and the two aggregations every uplink uses: the
weighted mean of the round's estimates and the EF21/DASHA tracker update (docs/DESIGN.md §2)."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import ClassVar

import torch
from torch import Tensor

from compressors.error_feedback import ef21_server_update
from compressors.sparse import SparseTensor, add_scaled_, weighted_sum

Tensors = dict[str, Tensor]
Terms = dict[str, Tensor | SparseTensor]  # a decoded reply: layer → dense tensor or sparse (k values, indices)


class DecodedReplies(Mapping[int, Terms]):
    """The accepted replies of a round, decoded: sparse layers as :class:`SparseTensor` (k values and
    indices), kept while they fit in ``budget`` bytes, decoded again on access beyond it, so a round of
    many large clients never holds every dense payload at once (aggregations read each client once, in
    id order). ``self[j]`` is the stored form, which the sums below add at the indices. Decoding is
    deterministic and sparse adds equal dense ones, so every result is the same either way."""

    budget: ClassVar[int] = 256 * 2 ** 20

    def __init__(self, decode: Callable[[int], Mapping[str, Tensor | SparseTensor]]):
        self.decode = decode  # client → its reply decoded again (sparse layers sparse)
        self.decoded: dict[int, Terms | None] = {}  # None: decode again on access
        self.kept_bytes = 0

    def add(self, j: int, tensors: Mapping[str, Tensor | SparseTensor]) -> None:
        size = sum(t.nbytes() if isinstance(t, SparseTensor) else t.numel() * t.element_size()
                   for t in tensors.values())
        keep = self.kept_bytes + size <= self.budget
        self.decoded[j] = dict(tensors) if keep else None
        self.kept_bytes += size if keep else 0

    def __getitem__(self, j: int) -> Terms:
        tensors = self.decoded[j]
        return dict(tensors) if tensors is not None else dict(self.decode(j))

    def __contains__(self, j: object) -> bool:  # Mapping's default would decode
        return j in self.decoded

    def __iter__(self):
        return iter(self.decoded)

    def __len__(self) -> int:
        return len(self.decoded)


def weighted_mean(decoded: Mapping[int, Mapping[str, Tensor | SparseTensor]], weights: Mapping[int, float]) -> Tensors:
    """``Σ_j w_j V_j / Σ_j w_j`` over the given clients, summed in client-id order from zero."""
    total = sum(weights[j] for j in decoded)
    return weighted_sum({}, decoded, {j: weights[j] / total for j in decoded})


def tracker_update(G: Mapping[str, Tensor] | None, decoded: Mapping[int, Mapping[str, Tensor | SparseTensor]],
                   weights: Mapping[int, float], like: Mapping[str, Tensor]) -> Tensors:
    """:func:`compressors.ef21_server_update` from ``G`` (zeros like ``like`` when None): absent clients
    contribute their last tracker (docs/DESIGN.md §2)."""
    return ef21_server_update(G if G is not None else {n: torch.zeros_like(t) for n, t in like.items()}, decoded,
                              weights)


def update_trackers(columns: Mapping[str, Tensor], prefix: str, clients: Sequence[int], decoded: DecodedReplies,
                    first: Collection[int] = ()) -> None:
    """Clients' trackers after their accepted messages (docs/DESIGN.md §2), in place in the table's
    columns ``prefix + layer`` (row ``j``: client ``j``): ``G_j ← G_j + R_j`` with ``R_j`` as the server
    step decoded it (the client adds its own message to its tracker with the same operations), or
    ``G_j = R_j`` for a client in ``first`` (DASHA's first message is its tracker). Sparse messages that
    the server step decoded as consecutive rows of one block are added in one ``index_add_`` at their
    flat positions ``j·d + idx`` (distinct, so each gets its one term: the per-client sums)."""
    layers = [(p, p.removeprefix(prefix)) for p in columns if p.startswith(prefix)]
    runs: dict[str, list[tuple[int, SparseTensor]]] = {p: [] for p, _ in layers}
    for j in clients:
        terms = decoded[j]
        for p, n in layers:
            term, run = terms[n], runs[p]
            blocked = isinstance(term, SparseTensor) and term.block is not None and j not in first
            if not (blocked and run and run[-1][1].block is term.block and run[-1][1].row + 1 == term.row):
                _add_run(columns[p], run)  # the run ends here
            if blocked:
                run.append((j, term))
            elif j in first:  # a copy, not 0 + R_j: the sign of a zero survives, as in the client's copy
                columns[p][j].copy_(term.dense() if isinstance(term, SparseTensor) else term)
            else:
                add_scaled_(columns[p][j], 1.0, term)
    for p, _ in layers:
        _add_run(columns[p], runs[p])


def _add_run(column: Tensor, run: list[tuple[int, SparseTensor]]) -> None:
    """Add a run of consecutive rows of one decoded block to their clients' rows of ``column``; empties it."""
    if not run:
        return
    block, first = run[0][1].block, run[0][1].row
    assert block is not None
    rows = slice(first, first + len(run))
    ids = torch.tensor([j for j, _ in run], dtype=torch.int64, device=block.idx.device)
    flat = (block.idx[rows] + ids[:, None] * column[0].numel()).reshape(-1)
    values = block.values[rows]
    values = values if values.dtype == column.dtype else values.to(column.dtype)
    column.view(-1).index_add_(0, flat, values.reshape(-1))
    run.clear()
