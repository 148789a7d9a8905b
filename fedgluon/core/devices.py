"""Device names in configs: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` and ``"auto"`` (a GPU when torch sees one).

Used by ``geometry.lmo_device`` (where the server's spectral LMOs run) and the run spec's
``client_device`` (where client blocks compute their vmapped gradients). Ray hides GPUs from client
tasks without an ``engine.num_gpus`` share, so ``auto`` resolves per process: in such a task it is the
CPU.
"""

from __future__ import annotations

import torch

NAMES = ("auto", "cpu", "cuda", "cuda:N")


def resolve_device(field: str, name: object, extra: tuple[str, ...] = ()) -> torch.device:
    """The device ``name`` stands for in this process; ``ValueError`` naming ``field`` for anything else,
    or for a GPU torch cannot see (``extra`` lists further names the caller handles itself)."""
    allowed = [*extra, *NAMES]
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name) if isinstance(name, str) else None
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"{field} must be one of {allowed}, got {name!r}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ValueError(f"{field} is {name!r} but torch sees {count} CUDA device(s); use 'auto' to take a "
                             "GPU only when there is one")
    return device
