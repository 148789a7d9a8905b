"""Torch's intra-op thread count for one stretch of a run: the config's ``threads``, whatever the process had.

A float32 reduction split over more threads adds in another order, so the thread count is part of a
run's numbers. Every engine runs its server math (``experiment.run``, ``run_inprocess``, ``run_ray``) and
every client step (the ClientApp's ``train`` handler) under :func:`torch_threads` with the configured
count; each restores the caller's count when it ends, so the in-process engine's client handler,
which shares the server's process, leaves the server's count as it was. Worker processes that Ray
starts (``OMP_NUM_THREADS=1`` unless set) get the configured count the same way, so the plain,
in-process and Ray engines and parallel sweep members agree bitwise for a given ``threads``
(tests/integration/test_threads.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the body with ``n`` torch intra-op threads (``torch.set_num_threads``) and restore the calling
    thread's count afterwards (also when the body raises). Threads started inside begin with ``n``."""
    if n < 1:
        raise ValueError(f"threads must be at least 1, got {n}")
    before = torch.get_num_threads()
    torch.set_num_threads(n)  # even when equal here: also sets the count that threads started later begin with
    try:
        yield
    finally:
        torch.set_num_threads(before)
