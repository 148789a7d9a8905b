"""glibc's malloc told to keep freed memory for reuse (``mallopt(3)``), in processes fedgluon owns.

Every round frees the previous round's client-state columns and allocates the next round's, in tensors
of tens of MB for large federations; on a Flower node, each block's reply is also joined into one bytes
object of the size of its state columns. glibc's defaults give much of this back to the OS. A chunk
above the mmap threshold (dynamic, at most 32 MiB) is unmapped when freed, and a heap whose free top
exceeds the trim threshold (dynamic, twice the mmap threshold) is trimmed. Every page given back is
faulted in, zeroed, when it is next allocated.

:func:`keep_freed_memory` turns mmap off for allocations (``M_MMAP_MAX`` 0: every chunk comes from
the heap), sets the trim threshold to 2 GiB − 1 (the largest ``mallopt`` takes) and the top pad to
256 MiB (the heap grows in large steps). From the third round on, the columns and the records then
reuse memory that is already mapped; peak memory stays about the same. Only 64-byte-aligned chunks
above ~32 MB (torch's largest tensors) are not always reused at once, so a loop that frees and
reallocates such tensors holds some more resident memory than with mmap. What this saves per round,
and what it costs in memory: BENCHMARKS.md, "Process tuning".

This changes the whole process, so it is made only in processes that exist to run fedgluon, by
:func:`fedgluon.runtime.prepare_process` (the command line, Ray workers running a spec's ClientApp,
Ray tasks running a parallel sweep's members). In a user's own process it is theirs to call.
``FEDGLUON_KEEP_FREED_MEMORY=0`` in the environment turns it off everywhere.
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
