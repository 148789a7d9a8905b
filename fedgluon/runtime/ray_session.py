"""Ray's processes in a session of their own, so that a signal to fedgluon's process group stops fedgluon alone.

``timeout``, ``kill -TERM -- -PGID`` and a terminal's Ctrl-C signal a whole process group. A private local
Ray (``ray.init(address="local")``, and Flower's simulation engine, which calls it) starts its GCS server,
raylet and, through the raylet, the worker processes running the clients, all in the driver's group. Ray
blocks SIGINT in them, but a SIGTERM to the group ends them at once: the round in flight then fails on a
dead actor, instead of finishing and writing its checkpoint (exit code 130).

While :func:`ray_daemons_in_own_session` is active, the processes Ray starts from this process begin a new
session (``setsid``, ``start_new_session=True``), out of reach of signals to this group; this process
handles SIGINT/SIGTERM and shuts Ray down at the end, as before. They still end if this process dies
without doing so: on Linux Ray starts them with kernel fate-sharing (``PR_SET_PDEATHSIG``), which this
module requires; elsewhere Ray's reaper finds them through this group, and they are left in it.

:func:`sigterm_restored` puts back, when Ray is done, the SIGTERM handler this process had before: ``ray.init``
in the main thread installs its own (``sys.exit``, so that a SIGTERM runs Ray's shutdown at exit), which
``ray.shutdown`` leaves in place. A notebook or a test process that had run fedgluon on Ray would otherwise
answer every later SIGTERM with ``SystemExit``.

A patch of Ray's private ``ray._private.services.ConsolePopen`` (the ``subprocess.Popen`` Ray starts its
processes with, in Ray 2.55), held while Flower's simulation or fedgluon's own ``ray.init`` runs, and
only where it is found with Ray's fate-sharing; otherwise nothing is changed (a debug log line says when
it is missing). A later Ray that starts its processes otherwise leaves them in this process group, as
before.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("fedgluon")


@contextmanager
def ray_daemons_in_own_session(address: str | None = None) -> Iterator[None]:
    """While active, the processes Ray starts from this process run in a new session (see the module); with
    a cluster ``address`` Ray starts none here (the cluster's own ``ray start`` did), and nothing changes."""
    if address:
        yield
        return
    try:
        import ray._private.services as services
        from ray._private.utils import detect_fate_sharing_support

        original = services.ConsolePopen
        fate_sharing = bool(detect_fate_sharing_support())
    except (ImportError, AttributeError) as err:
        log.debug("Ray's process start-up not found (%s); its processes stay in this process group", err)
        yield
        return
    if not fate_sharing:  # Ray's reaper would look for them in this group
        yield
        return

    class InOwnSession(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("start_new_session", True)
            super().__init__(*args, **kwargs)

    services.ConsolePopen = InOwnSession
    try:
        yield
    finally:
        services.ConsolePopen = original


@contextmanager
def sigterm_restored() -> Iterator[None]:
    """While active, Ray may be started and shut down; at the end the SIGTERM handler is again the one found at
    the start (see the module). Usable as a decorator. Off the main thread, where no handler can be set,
    nothing is changed."""
    before = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        main = threading.current_thread() is threading.main_thread()
        if main and before is not None and signal.getsignal(signal.SIGTERM) is not before:
            signal.signal(signal.SIGTERM, before)
