"""The messages of a round: the server's broadcast, a client's reply and the server step's outcome."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from torch import Tensor

from compressors import BitCount, Message
from fedgluon.lmo.step import StepInfo

Tensors = dict[str, Tensor]


@dataclass
class Broadcast:
    """What the server sends round k: the model clients compute at, flags, tensors besides the model
    (``extra``: FedMuon's aggregate momentum and last global step, say; counted in ``bits``) and its bits
    per client.

    Algorithms with several client phases per round (``Algorithm.phases``) answer each phase before the
    last with the next phase's broadcast: the same round, model and flags, ``phase`` + 1, and in ``extra``
    what that phase needs (Dion's orthonormalised P); ``bits`` are then that answer's bits per client."""

    round: int
    seed: int
    model: Tensors
    flags: dict[str, int] = field(default_factory=dict)
    bits: BitCount = field(default_factory=BitCount)
    phase: int = 0
    extra: Tensors = field(default_factory=dict)

    def as_sent(self) -> Broadcast:
        """This broadcast with C-contiguous tensors, as every engine's wire delivers it (the federation hands
        clients this form): a client's matmul may round otherwise for an operand of another layout (LAPACK's
        QR returns a column-major Q), and the plain driver would then differ from the Flower engines."""
        return replace(self, model={n: t.contiguous() for n, t in self.model.items()},
                       extra={n: t.contiguous() for n, t in self.extra.items()})


@dataclass
class ClientReply:
    """A client's reply: its id and round (checked by the server), the payload, and metrics."""

    client: int
    round: int
    message: Message
    loss: float = float("nan")
    grad_evals: int = 0
    samples: int = 0
    group: str = ""  # the payload group it was sent in (Algorithm.reply_group), checked by the server


@dataclass
class ServerOutcome:
    """Who was accepted, who rejected and why, the uplink bits per client, the step's info, and the
    accepted payloads decoded (``decoded[j]``: layer → tensor or sparse tensor)."""

    accepted: list[int]
    rejected: dict[int, str]
    uplink: dict[int, BitCount]
    step: StepInfo | None = None
    decoded: Any = None
