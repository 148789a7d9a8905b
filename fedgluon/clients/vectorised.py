"""Per-client gradients of a block of virtual clients in one call, with ``torch.func``.

For clients j ∈ J that share one model and loss (every task here) and draw equally sized batches,

    (ℓ_j, ∇f_j(X_j; ξ_j))_{j∈J} = vmap(grad_and_value(ℓ), in_dims=(X: None or 0, x: 0, y: 0))

over the stacked batches, with X shared (the broadcast model) or stacked (each client's X_prev).
Clients are grouped by batch shape (a client with fewer samples than the batch size gets a smaller
batch); a group of one, a model with BatchNorm (its running statistics are updated in place, which
vmap cannot batch) and objectives with different models fall back to ``objective.gradient``.

Measured here (2-core AVX2 CPU, MKL, synthetic-task MLPs, batches 16–32): float32 gradients equal the
per-client loop *bitwise*, so blocked runs reproduce unblocked ones exactly (tests/integration/test_blocks.py);
float64 gradients differ by up to ~1 ulp (the batched GEMM takes another kernel path); the reported
loss may differ in its last bit (the batch mean is reduced in another order). Other BLAS builds may
round differently: then blocked runs agree to rounding, not bitwise.

``device``: where the vmapped call runs. On a GPU the block's batches, the parameters and the model's
buffers go there for the call and the gradients come back to the batches' device (the CPU: client
states, estimators and compression stay there), so results agree with the CPU's to rounding, not
bitwise. Clients that fall back to ``objective.gradient`` compute on the CPU.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from fedgluon.clients.objective import Batch, SupervisedObjective, Tensors, thread_model


def can_vectorise(model: nn.Module) -> bool:
    """False for models whose forward pass updates buffers in place (BatchNorm with running statistics)."""
    return not any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in model.modules())


def warm_up() -> None:
    """Make torch.func's first call now: it imports ``torch._dynamo``, ~1 s and ~120,000 objects here. The
    ClientApp calls this in a Ray worker's handshake, so that the worker's first round does not pay it, and
    so that those objects are made before the worker freezes what it keeps (fedgluon/runtime/gc_pause.py)."""
    vmap(grad_and_value(lambda x: (x * x).sum()))(torch.ones(2, 1))


def stacked_gradients(objectives: Sequence[SupervisedObjective], js: Sequence[int], batches: Sequence[Batch],
                      shared: Mapping[str, Tensor] | None = None, stacked: Mapping[str, Tensor] | None = None,
                      device: torch.device | None = None) -> tuple[list[float], Tensors]:
    """The losses and gradients ``{name: (B, *shape)}`` of clients ``js`` (row i: ``js[i]`` on
    ``batches[i]``), at the ``shared`` parameters or at row i of ``stacked`` (exactly one of the two).
    Rows are grouped by batch shape (module doc), each group in one vmapped call; a group of one, a model
    whose forward pass writes buffers, and clients of different models take ``objective.gradient`` row
    by row. Row i's value depends on its own client, batch and parameters alone."""
    if (shared is None) == (stacked is None):
        raise ValueError("give either shared parameters or stacked per-row parameters")
    first = objectives[js[0]]
    vectorise = can_vectorise(first.model) and all(objectives[j].model is first.model
                                                   and objectives[j].loss_fn is first.loss_fn for j in js)
    names = first._names
    groups: dict[tuple, list[int]] = {}
    for i, (x, y) in enumerate(batches):  # rows stacked into one call share their batches' shapes and dtypes
        groups.setdefault((tuple(x.shape), tuple(y.shape), x.dtype, y.dtype) if vectorise else (i,), []).append(i)
    losses = [0.0] * len(js)
    out: Tensors = {}
    for rows in groups.values():
        if len(rows) == 1:
            i = rows[0]
            # stacked is given when shared is not (checked above)
            params = shared if shared is not None else {n: stacked[n][i] for n in names}  # type: ignore[index]
            loss, grads = objectives[js[i]].gradient(params, batches[i])
            got_losses, got = [loss], {n: g.unsqueeze(0) for n, g in grads.items()}
        else:
            xs, ys = torch.stack([batches[i][0] for i in rows]), torch.stack([batches[i][1] for i in rows])
            if shared is not None:
                params, dims = {n: shared[n].detach() for n in names}, None
            else:  # stacked is given (checked above)
                index = torch.tensor(rows)
                params, dims = {n: stacked[n].detach().index_select(0, index) for n in names}, 0  # type: ignore[index]
            got, loss_rows = _vmapped_call(first, xs, ys, params, dims, device)
            got_losses = loss_rows.tolist()
        if len(rows) == len(js):  # one group: its output is the columns
            return got_losses, got
        for i, loss in zip(rows, got_losses):
            losses[i] = loss
        for n, g in got.items():
            if n not in out:
                out[n] = torch.empty((len(js), *g.shape[1:]), dtype=g.dtype, device=g.device)
            out[n][rows] = g
    return losses, out


def _vmapped_call(objective: SupervisedObjective, xs: Tensor, ys: Tensor, params: Tensors, dims: int | None,
                  device: torch.device | None) -> tuple[Tensors, Tensor]:
    """``vmap(grad_and_value(loss))`` over the stacked batches (module doc), on ``device`` when given
    (results back on the batches' device)."""
    model, loss_fn = thread_model(objective.model), objective.loss_fn
    home = xs.device
    device = home if device is None else device
    moved = device != home
    buffers = {n: b.to(device) for n, b in model.named_buffers()} if moved else {}

    def loss(p: Tensors, x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(functional_call(model, {**buffers, **p} if moved else p, (x,)), y)

    if moved:
        params = {n: t.to(device) for n, t in params.items()}
    with torch.enable_grad():
        grads, losses = vmap(grad_and_value(loss), in_dims=(dims, 0, 0))(params, xs.to(device), ys.to(device))
    if moved:
        grads, losses = {n: g.to(home) for n, g in grads.items()}, losses.to(home)
    return grads, losses
