"""glibc's malloc told to keep freed memory for reuse (``mallopt(3)``), in processes fedgluon owns.

Every round frees the previous round's client-state columns and allocates the next round's: for
1,000 clients of a 107k-parameter MLP, two 0.43 GB sets (estimates and trackers) in ~28 MB tensors.
On a Flower node, each block's reply is also joined into one bytes object of ~0.43 GB. glibc's
defaults give much of this back to the OS. A chunk above the mmap threshold (dynamic, at most 32
MiB) is unmapped when freed, and a heap whose free top exceeds the trim threshold (dynamic, twice
the mmap threshold) is trimmed. Every page given back is faulted in, zeroed, when it is next
allocated.

:func:`keep_freed_memory` turns mmap off for allocations (``M_MMAP_MAX`` 0: every chunk comes from
the heap), sets the trim threshold to 2 GiB − 1 (the largest ``mallopt`` takes) and the top pad to
256 MiB (the heap grows in large steps). From the third round on, the columns and the records then
reuse memory that is already mapped.

Measured on the 2-core AMD EPYC development VM (NumPy 2.4.6, torch 2.13.0+cpu), toggling
``FEDGLUON_KEEP_FREED_MEMORY``, mean round from the third:

- ``run_plain``, 1,000 clients of the 107k MLP, blocks of 500 in two workers, 10 rounds, three
  alternating pairs: 0.674, 0.686 and 0.735 s, against 0.985, 0.771 and 0.755 s with glibc's
  defaults. System time was 0.04–0.10 s a round, against 0.12–0.52 s.
- ``run_inprocess``, the same clients in blocks of 500, 6 rounds, two pairs: 1.22 and 1.31 s,
  against 2.08 and 2.23 s. Packing a block's reply took 0.04 s instead of 0.3–0.7 s
  (``FEDGLUON_TRACE``).
- Peak memory barely moved. In process, the peak RSS was 3.48–3.62 GB against 3.35–3.41 GB.
  ``bench_memory``'s 1,000 clients × 1M parameters peaked at 17.52 GiB against 17.78 GiB.

Only 64-byte-aligned chunks above ~32 MB are not always reused at once (torch's largest tensors):
a loop that frees and reallocates 100 + 40 MB tensors settled at 420 MB more resident memory than
with mmap.

As with :func:`fedgluon.runtime.gc_pause.freeze_worker`, this changes the whole process. So it is made only
in processes that exist to run fedgluon:

- the command line (``fedgluon run``, ``sweep``, ``tune``, ``bench``);
- worker processes: Ray actors running a spec's ClientApp, and Ray tasks running a parallel sweep's
  members.

In a user's own process it is theirs to call. ``FEDGLUON_KEEP_FREED_MEMORY=0`` in the environment
turns it off everywhere.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

# mallopt(3) parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
SETTINGS = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: (1 << 31) - 1, M_TOP_PAD: 256 << 20}
ENV = "FEDGLUON_KEEP_FREED_MEMORY"

_state = {"applied": False}


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (it has ``gnu_get_libc_version`` and ``mallopt``), else None."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    if not (hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt")):
        return None
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return libc


def applied() -> bool:
    """Whether :func:`keep_freed_memory` put its settings in force in this process."""
    return _state["applied"]


def keep_freed_memory() -> bool:
    """Apply the module doc's ``mallopt`` settings to this process, once. Returns whether they are in
    force: False off glibc, where ``mallopt`` refused one (logged), or with ``FEDGLUON_KEEP_FREED_MEMORY=0``."""
    if _state["applied"]:
        return True
    if os.environ.get(ENV, "1").strip() == "0":
        return False
    libc = _glibc()
    if libc is None:
        return False
    for param, value in SETTINGS.items():
        if libc.mallopt(param, value) != 1:
            log.warning("mallopt(%d, %d) refused: glibc keeps its default for it", param, value)
            return False
    _state["applied"] = True
    return True
