"""One tidy metrics row per round, shared by every engine so their outputs compare column by column."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from compressors import CONVENTIONS, BitCount
from fedgluon.algorithms.base import Broadcast, ClientReply, ServerOutcome

# Columns that measure this machine's time, not the run: they differ between reruns of the same seed.
TIMING_COLUMNS = ("wall_time", "server_time")


def bit_columns(prefix: str, per_client: Mapping[int, BitCount]) -> dict[str, float]:
    """``<prefix>_<convention>_{total,mean,max}`` over the clients in ``per_client``."""
    out: dict[str, float] = {}
    for c in CONVENTIONS:
        vals = [b.total(c) for b in per_client.values()]
        out[f"{prefix}_{c}_total"] = float(sum(vals))
        out[f"{prefix}_{c}_mean"] = float(sum(vals) / len(vals)) if vals else 0.0
        out[f"{prefix}_{c}_max"] = float(max(vals)) if vals else 0.0
    return out


def client_rows(k: int, participants: Sequence[int], replies: Mapping[int, ClientReply], outcome: ServerOutcome,
                failed: Mapping[int, str] | None = None) -> list[dict[str, Any]]:
    """One row per sampled client: accepted / rejected / failed with the reason, its loss and uplink bits."""
    failed = failed or {}
    rows = []
    for j in participants:
        if j in outcome.accepted:
            status, reason = "accepted", ""
        elif j in outcome.rejected:
            status, reason = "rejected", outcome.rejected[j]
        else:
            status, reason = "failed", failed.get(j, "")
        rows.append({"round": k, "client": j, "status": status, "reason": reason,
                     "loss": replies[j].loss if j in replies else float("nan"),
                     "up_bits_int32": outcome.uplink[j].total("int32") if j in outcome.uplink else 0})
    return rows


def round_row(k: int, participants: Sequence[int], replies: Mapping[int, ClientReply], outcome: ServerOutcome,
              bc: Broadcast, receivers: int, failed: int = 0) -> dict[str, Any]:
    """Round k's row: counts, mean training loss of accepted clients, gradient work, bits up and down."""
    acc = outcome.accepted
    losses = [replies[j].loss for j in acc]
    row: dict[str, Any] = {
        "round": k, "participants": len(participants), "accepted": len(acc), "rejected": len(outcome.rejected),
        "failed": failed, "train_loss": float(sum(losses) / len(losses)) if losses else float("nan"),
        "grad_evals": sum(replies[j].grad_evals for j in acc), "samples": sum(replies[j].samples for j in acc),
        "refresh": int(bc.flags.get("refresh", 0)), "receivers": receivers,
    }
    row.update(bit_columns("up", outcome.uplink))
    row.update({f"down_{c}_total": float(bc.bits.total(c) * receivers) for c in CONVENTIONS})
    return row
