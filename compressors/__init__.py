"""Compression operators, error feedback, payloads, validation and bit accounting.

Imports neither Flower nor Ray (docs/DESIGN.md §1); conversion to Flower records lives in ``fedgluon.flower.wire``.

    from compressors import make_compressor, compress_message, decode_message
    C = make_compressor({"name": "topk", "ratio": 0.05})
"""

from compressors.bits import CONVENTIONS, BitCount, dense_bits
from compressors.error_feedback import (
    EF14,
    EF21,
    ERROR_FEEDBACK,
    NoFeedback,
    check_contractive,
    ef21_server_update,
    make_error_feedback,
)
from compressors.message import compress_message, decode_message, decode_messages
from compressors.operators import Compressor, Context, Properties
from compressors.payload import Message, PayloadError, TensorPayload
from compressors.registry import COMPRESSORS, make_compressor

__all__ = ["BitCount", "CONVENTIONS", "COMPRESSORS", "Compressor", "Context", "EF14", "EF21", "ERROR_FEEDBACK",
           "Message", "NoFeedback", "PayloadError", "Properties", "TensorPayload", "check_contractive",
           "compress_message", "decode_message", "decode_messages", "dense_bits", "ef21_server_update",
           "make_compressor", "make_error_feedback"]
