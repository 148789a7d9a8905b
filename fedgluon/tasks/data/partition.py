"""Federated partitions of a labelled dataset, all seeded; each returns one index array per client
and covers every sample exactly once.

* ``iid`` — a random permutation cut into near-equal parts.
* ``dirichlet`` — for each class, proportions ``p ~ Dir(α·1_n)`` split that class's samples over
  the clients (Hsu, Qi, Brown 2019); small α → skewed label mixes, large α → close to iid. Redrawn
  (bounded) until every client has at least ``min_size`` samples.
* ``shards`` — sort by label, cut into ``n·k`` shards, give each client k shards (McMahan et al. 2017).

Tasks whose data come in clients already (LEAF synthetic, one distribution per client; Shakespeare, one
client per speaking role) make their own split and do not call :func:`partition`.
"""

from __future__ import annotations

import numpy as np

SCHEMES = ("iid", "dirichlet", "shards")


def partition(labels: np.ndarray, num_clients: int, scheme: str = "iid", *, seed: int = 0,
              alpha: float | None = None, shards_per_client: int | None = None, min_size: int = 1,
              max_tries: int = 100) -> list[np.ndarray]:
    """``scheme``'s split (module docstring). ``alpha`` (default 0.5) is ``dirichlet``'s and ``shards_per_client``
    (default 2) is ``shards``'; given with another scheme, where it would do nothing, it is refused."""
    if scheme not in SCHEMES:
        raise ValueError(f"partition must be one of {list(SCHEMES)}, got {scheme!r}")
    for key, value, owner in (("alpha", alpha, "dirichlet"), ("shards_per_client", shards_per_client, "shards")):
        if value is not None and scheme != owner:
            raise ValueError(f"{key} applies to partition={owner!r} only, got partition={scheme!r}")
    alpha, shards_per_client = 0.5 if alpha is None else alpha, 2 if shards_per_client is None else shards_per_client
    labels = np.asarray(labels)
    n = len(labels)
    rng = np.random.default_rng(seed)
    if not 1 <= num_clients <= n:
        raise ValueError(f"num_clients must be in [1, {n}], got {num_clients}")
    if scheme == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(n), num_clients)]
    if scheme == "dirichlet":
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0 (the Dirichlet concentration), got {alpha}")
        classes = np.unique(labels)
        for _ in range(max_tries):
            parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
            for c in classes:
                idx = rng.permutation(np.flatnonzero(labels == c))
                cuts = (np.cumsum(rng.dirichlet(alpha * np.ones(num_clients)))[:-1] * len(idx)).astype(int)
                for j, chunk in enumerate(np.split(idx, cuts)):
                    parts[j].append(chunk)
            out = [np.sort(np.concatenate(p)) for p in parts]
            if min(len(p) for p in out) >= min_size:
                return out
        raise ValueError(f"dirichlet(alpha={alpha}) left a client with fewer than {min_size} samples in "
                         f"{max_tries} draws; raise alpha or lower min_size")
    total = num_clients * shards_per_client  # scheme "shards"
    if total > n:
        raise ValueError(f"{total} shards need at least {total} samples, got {n}")
    order = np.argsort(labels, kind="stable")
    shards = np.array_split(order, total)
    assignment = rng.permutation(total).reshape(num_clients, shards_per_client)
    return [np.sort(np.concatenate([shards[s] for s in row])) for row in assignment]


def summary_rows(parts: list[np.ndarray], labels: np.ndarray) -> list[dict[str, int]]:
    """One row per client: its size and label histogram (keys ``label_<c>``)."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    rows = []
    for j, idx in enumerate(parts):
        counts = {f"label_{c}": int((labels[idx] == c).sum()) for c in classes}
        rows.append({"client": j, "size": len(idx), **counts})
    return rows
