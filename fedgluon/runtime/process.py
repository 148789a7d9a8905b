"""The one entry point that prepares a process fedgluon owns: :func:`prepare_process`.

A process is fedgluon's when it exists to run fedgluon: the command line (``fedgluon run``, ``sweep``,
``tune``...), a Ray worker that runs a spec's ClientApp (it unpickled a
:class:`~fedgluon.flower.client_app.SpecClientApp`), and a Ray task that runs a parallel sweep's members.
There, and only there, fedgluon makes process-wide settings:

- glibc's malloc keeps freed memory for reuse (:func:`fedgluon.runtime.allocator.keep_freed_memory`;
  ``FEDGLUON_KEEP_FREED_MEMORY=0`` turns it off);
- torch's intra-op thread count, when the caller knows the run's ``threads`` (runs still set their own count
  for their stretch with :func:`fedgluon.runtime.threads.torch_threads`, which every engine does).

A user's process that imports fedgluon and runs experiments is left as it was: nothing here runs on import.
"""

from __future__ import annotations

import torch

from fedgluon.runtime.allocator import keep_freed_memory

_owned = {"is": False}  # set by prepare_process (tests read it)


def prepare_process(*, threads: int | None = None) -> dict[str, object]:
    """Make this process's settings, as one that exists to run fedgluon (module doc); safe to call again.
    Returns what is in force: ``{"malloc": bool, "threads": int}``."""
    _owned["is"] = True
    kept = keep_freed_memory()
    if threads is not None:
        if int(threads) < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        torch.set_num_threads(int(threads))
    return {"malloc": kept, "threads": torch.get_num_threads()}

