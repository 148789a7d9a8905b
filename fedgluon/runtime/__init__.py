"""Process tuning, behind one boundary: the allocator settings (``allocator``), the per-round GC pause
(``gc_pause``), torch thread counts (``threads``) and phase timing (``trace``).

Imports nothing from fedgluon; the engines, the strategy and the experiment face call it.
"""
