"""Process tuning, behind one boundary (docs/DESIGN.md §1: what each module does; it imports nothing from
fedgluon): :func:`prepare_process` prepares a process fedgluon owns. Nothing here acts on import.
"""

from fedgluon.runtime.process import prepare_process

__all__ = ["prepare_process"]
