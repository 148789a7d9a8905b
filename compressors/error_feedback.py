"""Error feedback as pure state transitions on dicts of tensors.

**EF21** (Richtárik, Sokolov, Fatkhullin 2021; docs/ALGORITHMS.md §8.1): client j keeps a tracker g_j, sends
``R_j = C(v_j − g_j)`` and sets ``g_j ← g_j + R_j``; the server adds ``w_j R_j`` to its aggregate, so
``G = Σ_j w_j g_j`` holds exactly as long as both sides add the *decoded* payload.

**EF14** (error feedback with residual memory, Seide et al. 2014 / Stich et al. 2018): client keeps
``e_j``, sends ``p = C(e_j + x_j)`` and keeps ``e_j ← e_j + x_j − p``.

**None**: send ``C(x)`` as is (unbiased compressors, or to measure what feedback buys).

Every kind has ``step(state, x, seed_parts, comp_states) -> (message, state', comp_states')``,
``step_rows(states, X)`` doing the same for B clients at once (``X[name]``: the B clients' tensors or
one (B, *shape) tensor; None when the compressor has no row encoder, see
:meth:`Compressor.compress_rows`; equal to ``step`` client by client), and says with ``tracks``
whether the server keeps a running sum of the decoded messages (EF21: ``G = Σ_j w_j g_j``) or
averages each round's (EF14, none). :func:`make_error_feedback` builds one by name.

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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .message import compress_message, compress_message_rows, split_rows
from .operators import Compressor, State
from .payload import Message, PayloadRows
from .sparse import WeightedSum

Tensors = dict[str, Tensor]


def add_own(compressor: Compressor, base: Mapping[str, Tensor], message: Message, sign: float = 1.0) -> Tensors:
    """``base + sign · decode(message)`` layer by layer, for the client's own message (sparse payloads
    are added at their indices, never decoded dense: :meth:`Compressor.add_decoded`)."""
    return {n: compressor.add_decoded(base[n], message[n], sign) for n in base}


Rows = list[tuple[Message, dict[str, Tensors], dict[str, State]]]


def _rows_of(states: Sequence[Mapping[str, Tensors] | None], key: str) -> list[Tensors | None]:
    return [s[key] if s else None for s in states]


CHUNK_BYTES = 1 << 21  # a row step takes a layer's rows in chunks of about this many bytes
STACK_ROWS = 8  # chunks of at least this many rows are stacked: one call per chunk instead of one per row


def _stacked(rows: Sequence[Tensor | None], like: Tensor) -> Tensor:
    """The rows stacked into a new (n, *shape) tensor, a missing row as zeros."""
    if any(r is None for r in rows):
        zero = torch.zeros_like(like)
        rows = [zero if r is None else r for r in rows]
    return torch.stack(list(rows))


def _chunking(compressor: Compressor, like: Tensor) -> tuple[int, bool]:
    """Rows per chunk of a layer whose rows are shaped like ``like`` (about ``CHUNK_BYTES``), and whether
    one chunk buffer may serve every chunk (not when the payloads may be views of it: dense)."""
    return (max(1, CHUNK_BYTES // max(1, like.numel() * like.element_size())),
            not compressor.rows_share_input(tuple(like.shape)))


def _chunks(per: int, reuse: bool, like: Tensor, count: int) -> Iterator[tuple[int, Tensor]]:
    """``count`` rows in chunks of ``per``: (first row, a buffer of the chunk's rows shaped like ``like``),
    the buffer reused from chunk to chunk when ``reuse`` (:func:`_chunking`), else fresh per chunk."""
    buf = None
    for start in range(0, count, per):
        if buf is None or not reuse:
            buf = torch.empty((min(per, count), *like.shape), dtype=like.dtype, device=like.device)
        yield start, buf[:min(per, count - start)]


def _layer_rows(compressor: Compressor, X: Sequence[Tensor], others: Sequence[Tensor | None], sign: float,
                feedback: str) -> tuple[list[PayloadRows], int, list[Tensor]] | None:
    """One layer of a row step, in chunks of rows small enough to stay in the cache: per chunk,
    ``C = X[i] + sign · others[i]`` into one buffer (a missing row is zero: ``X[i] + sign · 0``, exactly
    as the per-client step computes it), the chunk's payloads ``compress_rows(C)``, and the rows' new
    states: ``others[i] + decode(row i)`` (``feedback="ef21"``: the new tracker) or ``C[i] − decode(row i)``
    (``"ef14"``: the new residual), each its own tensor. So each pass over a chunk after the first reads
    the cache, and the buffer is reused from chunk to chunk unless the payloads may be views of it
    (dense). Chunks of ``STACK_ROWS`` rows or more (small layers) are stacked and stepped with one call
    per operation, larger rows one call per row (stacking them would cost a pass over the data).
    Returns (the chunks' payload rows, rows per chunk, new states), or None when a chunk cannot be
    compressed as rows (:meth:`Compressor.compress_rows`)."""
    per, reuse = _chunking(compressor, X[0])
    parts: list[PayloadRows] = []
    new: list[Tensor] = []
    for start, chunk in _chunks(per, reuse, X[0], len(X)):
        xs, os = X[start:start + per], others[start:start + per]
        stacked = len(xs) >= STACK_ROWS
        if stacked:  # sign = ±1: sign · o is exact, so x ± o is rounded once, as row by row
            base = _stacked(os, xs[0])
            torch.stack(list(xs), out=chunk)
            chunk.add_(base, alpha=sign)
        else:
            for i, (x, o) in enumerate(zip(xs, os)):
                torch.add(x, 0.0 if o is None else o, alpha=sign, out=chunk[i])
        rows = compressor.compress_rows(chunk)
        if rows is None:
            return None
        if feedback == "ef21":
            new += compressor.add_decoded_rows(base if stacked else list(os), rows, xs[0])
        elif stacked:  # the chunk is ours to overwrite unless the payloads are views of it
            new += compressor.add_decoded_rows(chunk if reuse else chunk.clone(), rows, xs[0], -1.0)
        else:
            new += compressor.add_decoded_rows(list(chunk.unbind(0)), rows, xs[0], -1.0)
        parts.append(rows)
    return parts, per, new


def _row_step(compressor: Compressor, X: Mapping[str, Sequence[Tensor]], others: Sequence[Mapping[str, Tensor] | None],
              sign: float, feedback: str, key: str) -> Rows | None:
    """:func:`_layer_rows` for every layer; per client (message, {key: new state}, {})."""
    layers = {}
    for n in sorted(X):  # messages list their layers sorted, as compress_message does; states keep X's order
        out = _layer_rows(compressor, X[n], [t[n] if t else None for t in others], sign, feedback)
        if out is None:
            return None
        layers[n] = out
    return [({n: parts[i // per].payload(i % per) for n, (parts, per, _) in layers.items()},
             {key: {n: layers[n][2][i] for n in X}}, {}) for i in range(len(others))]


def _row_list(X: Tensor | Sequence[Tensor]) -> list[Tensor]:
    """A block's rows: the B tensors of a sequence, or the rows of a (B, *shape) tensor."""
    return list(X.unbind(0)) if isinstance(X, Tensor) else list(X)


def _row_shapes(X: Mapping[str, Sequence[Tensor]]) -> dict[str, tuple[int, ...]]:
    """The per-client shapes of a block's rows."""
    return {n: tuple(t[0].shape) for n, t in X.items()}


class _RowSteps:
    """What every error-feedback kind says about row steps."""

    compressor: Compressor

    def supports_rows(self, shapes: Mapping[str, tuple[int, ...]]) -> bool:
        """Whether :meth:`step_rows` can handle tensors of these shapes (it may still decline a block
        with non-finite values)."""
        return all(self.compressor.rows_supported(tuple(s)) for s in shapes.values())


@dataclass
class EF21(_RowSteps):
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

    def step(self, state: Mapping[str, Tensors] | None, v: Mapping[str, Tensor], seed_parts: tuple[int, ...],
             comp_states: Mapping[str, State] | None = None) -> tuple[Message, dict[str, Tensors], dict[str, State]]:
        """One client round: (message, new EF state, new compressor states)."""
        if self.tracker == "full":
            g = state["g"] if state else {n: torch.zeros_like(t) for n, t in v.items()}
            msg, cstates = compress_message(self.compressor, {n: v[n] - g[n] for n in v}, seed_parts, comp_states)
            return msg, {"g": add_own(self.compressor, g, msg)}, cstates
        return self._step_fixed16(state, v, seed_parts, comp_states)

    def supports_rows(self, shapes: Mapping[str, tuple[int, ...]]) -> bool:
        return self.tracker == "full" and super().supports_rows(shapes)

    def step_rows(self, states: Sequence[Mapping[str, Tensors] | None],
                  v: Mapping[str, Tensor | Sequence[Tensor]]) -> Rows | None:
        """:meth:`step` for B clients at once (``v[name]``: the B clients' tensors, or one (B, *shape)
        tensor); full trackers only. Each client's new tracker is its own tensor (``g_j`` + its decoded
        row)."""
        v = {n: _row_list(t) for n, t in v.items()}
        if not self.supports_rows(_row_shapes(v)):
            return None
        return _row_step(self.compressor, v, _rows_of(states, "g"), -1.0, "ef21", "g")

    def step_column(self, V: Tensor, g: Tensor | None) -> tuple[PayloadRows, Tensor] | None:
        """:meth:`step_rows` of one layer on columns (full trackers): ``R_B = C(V_B − g_B)`` row by row and
        ``g'_B = g_B + R_B`` for the (B, *shape) estimates ``V`` and trackers ``g`` (None: zero, before
        the first round), in :func:`_layer_rows`' chunks; the payload rows and the new trackers as one
        (B, *shape) tensor, or None when a chunk cannot be compressed as rows (a row not finite: the
        per-client path then raises for its client)."""
        per, reuse = _chunking(self.compressor, V[0])
        out, parts = torch.empty_like(V), []
        for a, C in _chunks(per, reuse, V[0], len(V)):
            b = a + len(C)
            if g is None:
                C.copy_(V[a:b])
            else:
                torch.add(V[a:b], g[a:b], alpha=-1.0, out=C)
            rows = self.compressor.compress_rows(C)
            if rows is None:
                return None
            parts.append(rows)
            if g is None:
                out[a:b].zero_()
            else:
                out[a:b].copy_(g[a:b])
            self.compressor.add_decoded_block_(out[a:b], rows)
        if len(parts) == 1:
            return parts[0], out
        return PayloadRows(parts[0].codec, parts[0].shape,
                           {k: np.concatenate([p.arrays[k] for p in parts]) for k in parts[0].arrays}), out

    def tracker_values(self, state: Mapping[str, Tensors], like: Mapping[str, Tensor]) -> Tensors:
        """The tracker g_j as a tensor dict in the working dtype."""
        if self.tracker == "full":
            return dict(state["g"])
        return {n: state["q"][n].to(like[n].dtype) * state["step"][n].to(like[n].dtype) for n in like}

    def _step_fixed16(self, state, v, seed_parts, comp_states):
        if state:
            q_old, step = state["q"], state["step"]
        else:
            q_old = {n: torch.zeros_like(t, dtype=torch.int16) for n, t in v.items()}
            step = {}
            for n, t in v.items():
                amax = float(t.abs().max()) if t.numel() else 0.0
                e = math.ceil(math.log2(self.headroom * amax / 32767)) if amax > 0 else -24
                step[n] = torch.tensor(2.0 ** max(e, -126), dtype=torch.float64)
        g = {n: q_old[n].to(v[n].dtype) * step[n].to(v[n].dtype) for n in v}
        msg, cstates = compress_message(self.compressor, {n: v[n] - g[n] for n in v}, seed_parts, comp_states)
        g_plus_r = add_own(self.compressor, g, msg)
        q_new, delta = {}, {}
        for n in v:
            q = torch.round(g_plus_r[n].double() / step[n]).clamp(-32767, 32767)
            q_new[n] = q.to(torch.int16)
            delta[n] = ((q - q_old[n].double()) * step[n]).to(v[n].dtype)
            payload = msg[n]
            dtype = payload.arrays["v.v"].dtype
            flat = delta[n].reshape(-1)
            sent = flat if "idx" not in payload.arrays else flat[torch.from_numpy(
                payload.arrays["idx"].astype(np.int64))]
            payload.arrays["v.v"] = sent.detach().cpu().numpy().astype(dtype)
            if not torch.equal(torch.from_numpy(payload.arrays["v.v"]).to(sent.dtype), sent):
                raise ArithmeticError(f"fixed16 tracker difference of {n!r} is not exact in {dtype}")
        return msg, {"q": q_new, "step": step}, cstates


def ef21_server_update(G: Mapping[str, Tensor], decoded: Mapping[int, Mapping[str, Tensor]],
                       weights: Mapping[int, float]) -> Tensors:
    """``G ← G + Σ_j w_j R_j`` over accepted clients, in client-id order (docs/DESIGN.md §2)."""
    total = WeightedSum({n: t.clone() for n, t in G.items()})
    for j in sorted(decoded):
        total.add(weights[j], decoded[j])
    return total.result()


@dataclass
class EF14(_RowSteps):
    """Classic error feedback: send ``C(e + x)``, keep ``e ← e + x − C(e + x)``."""

    compressor: Compressor
    tracks = False

    def step(self, state: Mapping[str, Tensors] | None, x: Mapping[str, Tensor], seed_parts: tuple[int, ...],
             comp_states: Mapping[str, State] | None = None) -> tuple[Message, dict[str, Tensors], dict[str, State]]:
        e = state["e"] if state else {n: torch.zeros_like(t) for n, t in x.items()}
        corrected = {n: e[n] + x[n] for n in x}
        msg, cstates = compress_message(self.compressor, corrected, seed_parts, comp_states)
        return msg, {"e": add_own(self.compressor, corrected, msg, -1.0)}, cstates

    def step_rows(self, states: Sequence[Mapping[str, Tensors] | None],
                  x: Mapping[str, Tensor | Sequence[Tensor]]) -> Rows | None:
        x = {n: _row_list(t) for n, t in x.items()}
        if not self.supports_rows(_row_shapes(x)):
            return None
        return _row_step(self.compressor, x, _rows_of(states, "e"), 1.0, "ef14", "e")


@dataclass
class NoFeedback(_RowSteps):
    """No error feedback: send ``C(x)``; the client keeps no residual."""

    compressor: Compressor
    tracks = False

    def step(self, state: Mapping[str, Tensors] | None, x: Mapping[str, Tensor], seed_parts: tuple[int, ...],
             comp_states: Mapping[str, State] | None = None) -> tuple[Message, dict[str, Tensors], dict[str, State]]:
        msg, cstates = compress_message(self.compressor, dict(x), seed_parts, comp_states)
        return msg, {}, cstates

    def step_rows(self, states: Sequence[Mapping[str, Tensors] | None],
                  x: Mapping[str, Tensor | Sequence[Tensor]]) -> Rows | None:
        rows = compress_message_rows(self.compressor, {n: t if isinstance(t, Tensor) else torch.stack(list(t))
                                                       for n, t in x.items()})
        return None if rows is None else [(msg, {}, {}) for msg in split_rows(rows)]


ERROR_FEEDBACK = ("ef21", "ef14", "none")


def make_error_feedback(name: str, compressor: Compressor, tracker: str = "full") -> EF21 | EF14 | NoFeedback:
    """``ef21`` (with its ``tracker`` storage), ``ef14`` or ``none`` around ``compressor``."""
    if name not in ERROR_FEEDBACK:
        raise ValueError(f"error_feedback must be one of {list(ERROR_FEEDBACK)}, got {name!r}")
    if name != "ef21" and tracker != "full":
        raise ValueError(f"tracker={tracker!r} needs error_feedback='ef21', got {name!r}")
    if name == "ef21":
        return EF21(compressor, tracker=tracker)
    return EF14(compressor) if name == "ef14" else NoFeedback(compressor)
