"""Error feedback as pure state transitions on dicts of tensors.

**EF21** (docs/ALGORITHMS.md §8.1): send ``R_j = C(v_j − g_j)``, ``g_j ← g_j + R_j``; ``G = Σ_j w_j g_j`` holds
exactly as both sides add the *decoded* payload. **EF14** (residual memory, Seide et al. 2014):
``p = C(e_j + x_j)``, ``e_j ← e_j + x_j − p``. **None** sends ``C(x)`` as is.

Every kind has one ``step(state, X, seed_parts, comp_states) -> (rows, state', comp_states')`` over a
block of B clients: ``X[name]`` is (B, *shape), ``state`` a tree of (B, *shape) leaves (None before the
first round: zeros), ``seed_parts[i]`` and ``comp_states[i]`` client i's; ``rows[name]`` holds the B
payloads (:class:`~compressors.payload.PayloadRows`). Row i depends on client i's inputs alone, so
B = 1 is the per-client step. A zero row of a state is a client's first round:
zeros for the residual and full tracker (``x − 0 = x``), a zero ``step`` for fixed16 (set from the
client's first estimate). ``tracks`` says whether the server keeps a running sum of the decoded
messages (EF21: ``G = Σ_j w_j g_j``) or averages each round's (EF14, none).
:func:`make_error_feedback` builds one by name.

**Reduced-precision trackers** (``tracker="fixed16"``): the tracker is stored as int16 multiples of
a per-layer power-of-two step ``s`` (2 bytes per entry, like fp16). The client compresses
``v − g_j`` against its *stored* tracker, rounds ``g_j + R_j`` to the grid (saturating), and sends
the exact difference of stored trackers ``Δ = s·(q_new − q_old)`` — an integer below 2^17 times a
power of two, so exact in fp32 — instead of ``R_j``. Client and server trackers therefore stay
equal. (fp16 storage cannot do this: the difference of two fp16 numbers may need 40 significant
bits.) ``Δ`` has the support of ``R_j``, so this needs a dense or top-k structure with fp32/fp64
values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from compressors.message import compress_block, contexts
from compressors.operators import Compressor, State
from compressors.payload import PayloadRows
from compressors.sparse import SparseTensor, weighted_sum

Tensors = dict[str, Tensor]
Rows = dict[str, PayloadRows]
CompStates = Sequence[Mapping[str, State] | None] | None

CHUNK_BYTES = 1 << 21  # a step takes a layer's rows in chunks of about this many bytes (they stay in the cache)


def _layer(compressor: Compressor, X: Tensor, other: Tensor | None, sign: float, kind: str,
           seed_parts: Sequence[tuple[int, ...]], layer: int, name: str, comp_states: CompStates
           ) -> tuple[PayloadRows, Tensor, list[State | None]]:
    """One layer of a step, in chunks of rows of about ``CHUNK_BYTES``: per chunk ``C = X + sign · other``
    (``other`` None: zero, so ``X ± 0`` as with a zero row; ``sign`` = ±1, so ``C`` is rounded once), its payload
    rows, and the new state rows ``other + decode(C)`` (``kind="ef21"``) or ``C − decode(C)`` (``"ef14"``).
    Returns (payload rows, new state (B, *shape), new compressor states)."""
    B = X.shape[0]
    ctxs = contexts(compressor, seed_parts, layer, name, comp_states)
    row_bytes = X[0].numel() * X.element_size() if B else 1
    if B * row_bytes <= CHUNK_BYTES:  # one chunk: no buffers to manage
        C = torch.add(X, 0.0 if other is None else other, alpha=sign)
        rows, states = compressor.encode(C, ctxs)
        if kind == "ef21":
            new = compressor.add_decoded_(other.clone() if other is not None else torch.zeros_like(X), rows)
        else:
            new = compressor.add_decoded_(C.clone() if _shares(compressor, X) else C, rows, -1.0)
        return rows, new, states
    per = max(1, CHUNK_BYTES // row_bytes)
    share = _shares(compressor, X)  # payloads may view C: no reuse
    new = torch.empty_like(X)
    parts, states, buf = [], [], None
    for a in range(0, B, per):
        b = min(B, a + per)
        if buf is None or share:
            buf = torch.empty((min(per, B), *X.shape[1:]), dtype=X.dtype, device=X.device)
        C = torch.add(X[a:b], 0.0 if other is None else other[a:b], alpha=sign, out=buf[:b - a])
        rows, st = compressor.encode(C, ctxs[a:b] if ctxs is not None else None)
        parts.append(rows)
        states += st
        if kind == "ef21":
            if other is None:
                new[a:b].zero_()
            else:
                new[a:b].copy_(other[a:b])
            compressor.add_decoded_(new[a:b], rows)
        else:
            compressor.add_decoded_(new[a:b].copy_(C), rows, -1.0)
    return PayloadRows.concat(parts), new, states


def _shares(compressor: Compressor, X: Tensor) -> bool:
    """Whether ``compressor``'s payloads for rows like ``X``'s may share memory with them (dense)."""
    return compressor._structure_for(tuple(X.shape[1:])).name == "dense"


def _step(compressor: Compressor, X: Mapping[str, Tensor], others: Mapping[str, Tensor] | None, sign: float,
          kind: str, seed_parts: Sequence[tuple[int, ...]], comp_states: CompStates
          ) -> tuple[Rows, Tensors, list[dict[str, State]]]:
    """:func:`_layer` for every layer (messages list their layers sorted; states keep ``X``'s order)."""
    rows: Rows = {}
    new: Tensors = {}
    comps: list[dict[str, State]] = [{} for _ in seed_parts]
    for i, n in enumerate(sorted(X)):
        rows[n], new[n], states = _layer(compressor, X[n], others[n] if others is not None else None, sign, kind,
                                         seed_parts, i, n, comp_states)
        for comp, state in zip(comps, states):
            if state is not None:
                comp[n] = state
    return rows, {n: new[n] for n in X}, comps


@dataclass
class EF21:
    """EF21 on the client side; the server applies :func:`ef21_server_update`."""

    tracks = True  # the server's aggregate is the sum of every client's tracker

    compressor: Compressor
    tracker: str = "full"  # "full" | "fixed16"
    headroom: float = 8.0  # fixed16: the grid covers headroom × max|v| at the first round

    def __post_init__(self) -> None:
        if self.tracker not in ("full", "fixed16"):
            raise ValueError(f"tracker must be one of ['full', 'fixed16'], got {self.tracker!r}")
        if self.tracker == "fixed16" and (self.compressor.structure.name not in ("dense", "topk")
                                          or self.compressor.values.name not in ("fp32", "fp64")):
            raise ValueError("tracker='fixed16' needs a dense or top-k compressor with fp32/fp64 values "
                             f"(the difference must travel exactly), got {self.compressor!r}")

    def step(self, state: Mapping[str, Tensors] | None, v: Mapping[str, Tensor], seed_parts: Sequence[tuple[int, ...]],
             comp_states: CompStates = None) -> tuple[Rows, dict[str, Tensors], list[dict[str, State]]]:
        """One round of B clients: ``R = C(v − g)``, ``g ← g + R`` row by row (see the module doc)."""
        if self.tracker == "full":
            rows, g, comps = _step(self.compressor, v, state["g"] if state else None, -1.0, "ef21", seed_parts,
                                   comp_states)
            return rows, {"g": g}, comps
        return self._step_fixed16(state, v, seed_parts, comp_states)

    def _first_steps(self, v: Tensor) -> Tensor:
        """Each row's grid step, a power of two: ``2^⌈log2(headroom · max|v| / 32767)⌉`` (2⁻²⁴ for a zero row)."""
        steps = []
        for row in v:
            amax = float(row.abs().max()) if row.numel() else 0.0
            e = math.ceil(math.log2(self.headroom * amax / 32767)) if amax > 0 else -24
            steps.append(2.0 ** max(e, -126))
        return torch.tensor(steps, dtype=torch.float64)

    def _step_fixed16(self, state, v, seed_parts, comp_states):
        q_old, step = {}, {}
        for n, t in v.items():
            q_old[n] = state["q"][n] if state else torch.zeros_like(t, dtype=torch.int16)
            step[n] = state["step"][n] if state else torch.zeros(len(t), dtype=torch.float64)
            first = step[n] == 0  # a zero step: the client's first round
            if first.any():
                step[n] = torch.where(first, self._first_steps(t), step[n])
        col = {n: step[n].reshape(-1, *[1] * (v[n].dim() - 1)) for n in v}
        g = {n: q_old[n].to(v[n].dtype) * col[n].to(v[n].dtype) for n in v}
        rows, g_plus_r, comps = _step(self.compressor, v, g, -1.0, "ef21", seed_parts, comp_states)
        q_new = {}
        for n in v:
            q = torch.round(g_plus_r[n].double() / col[n]).clamp(-32767, 32767)
            q_new[n] = q.to(torch.int16)
            delta = ((q - q_old[n].double()) * col[n]).to(v[n].dtype).reshape(len(q), -1)
            payload = rows[n]
            dtype = payload.arrays["v.v"].dtype
            sent = delta if "idx" not in payload.arrays else torch.gather(
                delta, 1, torch.from_numpy(payload.arrays["idx"].astype(np.int64)))
            payload.arrays["v.v"] = sent.detach().cpu().numpy().astype(dtype)
            if not torch.equal(torch.from_numpy(payload.arrays["v.v"]).to(sent.dtype), sent):
                raise ArithmeticError(f"fixed16 tracker difference of {n!r} is not exact in {dtype}")
        return rows, {"q": q_new, "step": step}, comps


def ef21_server_update(G: Mapping[str, Tensor], decoded: Mapping[int, Mapping[str, Tensor | SparseTensor]],
                       weights: Mapping[int, float]) -> Tensors:
    """``G ← G + Σ_j w_j R_j`` over accepted clients, in client-id order (docs/DESIGN.md §2); sparse
    ``R_j`` are added at their indices."""
    return weighted_sum(G, decoded, weights)


@dataclass
class EF14:
    """Classic error feedback: send ``C(e + x)``, keep ``e ← e + x − C(e + x)``."""

    compressor: Compressor
    tracks = False

    def step(self, state: Mapping[str, Tensors] | None, x: Mapping[str, Tensor], seed_parts: Sequence[tuple[int, ...]],
             comp_states: CompStates = None) -> tuple[Rows, dict[str, Tensors], list[dict[str, State]]]:
        rows, e, comps = _step(self.compressor, x, state["e"] if state else None, 1.0, "ef14", seed_parts,
                               comp_states)
        return rows, {"e": e}, comps


@dataclass
class NoFeedback:
    """No error feedback: send ``C(x)``; the client keeps no residual."""

    compressor: Compressor
    tracks = False

    def step(self, state: Mapping[str, Tensors] | None, x: Mapping[str, Tensor], seed_parts: Sequence[tuple[int, ...]],
             comp_states: CompStates = None) -> tuple[Rows, dict[str, Tensors], list[dict[str, State]]]:
        rows, comps = compress_block(self.compressor, x, seed_parts, comp_states)
        return rows, {}, comps


ErrorFeedback = EF21 | EF14 | NoFeedback


def stack_states(states: Sequence[Mapping[str, Any] | None], like: Mapping[str, Any] | None = None) -> Any:
    """The per-client state trees of a block as one tree of (B, *shape) leaves, a missing client's leaves as
    zeros (its first round: see the module doc); None when no client has one."""
    first = next((s for s in states if s), None)
    if first is None:
        return None
    return _stack([s or None for s in states], first)


def _stack(states: list[Any], first: Any) -> Any:
    if isinstance(first, Mapping):
        return {k: _stack([s[k] if s is not None else None for s in states], v) for k, v in first.items()}
    zero = torch.zeros_like(first)
    return torch.stack([zero if s is None else s for s in states])


def split_states(tree: Any, count: int) -> list[Any]:
    """The ``count`` per-client trees of a tree of (B, *shape) leaves, each leaf row a tensor of its own."""
    if isinstance(tree, Mapping):
        parts = {k: split_states(v, count) for k, v in tree.items()}
        return [{k: parts[k][i] for k in tree} for i in range(count)]
    return [row.clone() for row in tree.unbind(0)]


ERROR_FEEDBACK = ("ef21", "ef14", "none")


def check_contractive(feedback: str, compressor: Compressor, shapes: Mapping[str, tuple[int, ...]],
                      field: str = "compressor") -> None:
    """EF21 and EF14 assume a contractive compressor, ``E‖C(x) − x‖² ≤ (1 − α)‖x‖²`` with α > 0 (EF21's
    Definition 1; ``Properties.alpha``). An unbiased C with variance ω < 1 is one (α = 1 − ω, as
    ``E‖C(x) − x‖² = E‖C(x)‖² − ‖x‖² ≤ ω‖x‖²``); with ω ≥ 1 (rand-k below half of a layer, few-level QSGD)
    the feedback loop keeps the scaled-up noise and a run learns little, without an error; a value codec after
    such a structure (rand-k with fp16 values) keeps it too. Such a pairing raises ValueError naming ``field``,
    the layer and ω; the mechanics themselves (:class:`EF21`, :class:`EF14`) take any compressor.
    ``feedback="none"`` takes any; ``"EF21-P"`` is the downlink's feedback."""
    if feedback == "none":
        return
    for layer, shape in shapes.items():
        p, s = compressor.properties(tuple(shape)), compressor.structure
        omega = p.omega if p.kind == "unbiased" else \
            s.omega(tuple(shape)) if s.kind == "unbiased" and s.active(tuple(shape)) else None
        if omega is not None and omega >= 1:
            other = "" if field != "compressor" else \
                ", error_feedback='none', or an algorithm for unbiased compressors (gluon-marina, gluon-dasha-mvr)"
            raise ValueError(f"{field} is unbiased with omega = {omega:.3g} >= 1 on layer {layer!r}, and its error "
                             f"feedback ({feedback}) needs a contractive one; use topk, svd, rsvd or powersgd, "
                             f"rand-k of more than half of each layer{other}")


def make_error_feedback(name: str, compressor: Compressor, tracker: str = "full") -> ErrorFeedback:
    """``ef21`` (with its ``tracker`` storage), ``ef14`` or ``none`` around ``compressor``."""
    if name not in ERROR_FEEDBACK:
        raise ValueError(f"error_feedback must be one of {list(ERROR_FEEDBACK)}, got {name!r}")
    if name != "ef21" and tracker != "full":
        raise ValueError(f"tracker={tracker!r} needs error_feedback='ef21', got {name!r}")
    if name == "ef21":
        return EF21(compressor, tracker=tracker)
    return EF14(compressor) if name == "ef14" else NoFeedback(compressor)
