"""Process tuning, behind one boundary: :func:`prepare_process` (``process``) prepares a process fedgluon
owns (the command line, Ray workers, sweep members) with the allocator settings (``allocator``) and torch's
thread count (``threads``); the engine loops take the GC pause once per round (``gc_pause``); a private Ray's
processes start in a session of their own (``ray_session``); ``trace``
times phases. Nothing here acts on import.

Imports nothing from fedgluon outside this package; the engines, the strategy and the experiment face call it.
"""

from fedgluon.runtime.process import prepare_process

__all__ = ["prepare_process"]
