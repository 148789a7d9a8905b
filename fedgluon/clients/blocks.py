"""Client blocks: one Flower node simulates ``B`` consecutive virtual clients.

Block ``p`` holds the virtual clients ``[pB, min((p+1)B, n))``; a run of n clients has ``ceil(n / B)`` nodes,
and ``B = 1`` is one client per node. How a block steps (vmapped runs of about ``Algorithm.RUN_BYTES``), and
why a run with blocks gives the metrics of one without: docs/DESIGN.md §3 ("Algorithm interface", "Flower apps
and transport") and §2 ("Exactness").
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def num_blocks(num_clients: int, block_size: int) -> int:
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return math.ceil(num_clients / block_size)


def block_of(client: int, block_size: int) -> int:
    return client // block_size


def block_clients(block: int, num_clients: int, block_size: int) -> list[int]:
    return list(range(block * block_size, min(num_clients, (block + 1) * block_size)))


def by_block(clients: Iterable[int], block_size: int) -> dict[int, list[int]]:
    """``{block: its clients among clients}``, blocks and clients in increasing order."""
    out: dict[int, list[int]] = {}
    for j in sorted(clients):
        out.setdefault(block_of(j, block_size), []).append(j)
    return out


def run_slices(count: int, per: int) -> list[slice]:
    """``count`` clients in consecutive runs of ``per`` (at least 1), a last run of one client joined to
    the run before it (a run of one steps client by client, not on columns)."""
    per = max(1, per)
    starts = list(range(0, count, per))
    if len(starts) > 1 and count - starts[-1] == 1:
        starts.pop()
    return [slice(a, b) for a, b in zip(starts, starts[1:] + [count])]
