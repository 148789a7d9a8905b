"""Hostile payloads are rejected with a specific error; nothing else escapes the decoder."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compressors import PayloadError, TensorPayload, compress_message, decode_message, make_compressor
from compressors.payload import (
    CodecError,
    DtypeError,
    DuplicateIndexError,
    IndexRangeError,
    LayerSetError,
    MetaError,
    NonFiniteError,
    ShapeError,
    SizeError,
    TruncatedError,
)

SHAPES = {"w": (30, 20), "b": (30,)}
SPECS = ["identity", {"name": "topk", "ratio": 0.1}, {"name": "randk_seeded", "ratio": 0.1}, "qsgd", "natural",
         {"name": "svd", "rank": 2}, {"name": "topk", "ratio": 0.1, "values": "fp16"}, "int2",
         {"name": "randk", "ratio": 0.1, "values": "fp64"}, {"name": "rsvd", "rank": 2},
         {"name": "powersgd", "rank": 2}, {"name": "topk", "ratio": 0.1, "values": "int4"},
         {"name": "identity", "values": "int8"}]


def test_the_fuzzed_specs_cover_every_compressor_and_value_codec():
    """A new compressor or value codec joins ``SPECS``, so that the fuzzing below sends it hostile payloads."""
    from compressors.registry import COMPRESSORS
    from compressors.values import VALUE_CODECS

    built = [make_compressor(spec) for spec in SPECS]
    assert not set(COMPRESSORS) - {C.name for C in built}
    assert not set(VALUE_CODECS) - {C.values.name for C in built}


def valid(spec):
    C = make_compressor(spec)
    msg, _ = compress_message(C, {n: torch.randn(s) for n, s in SHAPES.items()}, (1, 2, 3))
    return C, msg


def mutated(msg, layer="w", **changes):
    p = msg[layer]
    new = TensorPayload(changes.get("codec", p.codec), changes.get("shape", p.shape),
                        dict(changes.get("arrays", p.arrays)), dict(changes.get("meta", p.meta)))
    return {**msg, layer: new}


def test_specific_errors():
    C, msg = valid({"name": "topk", "ratio": 0.1})
    idx = msg["w"].arrays["idx"]
    vals = msg["w"].arrays["v.v"]
    cases = [
        (mutated(msg, shape=(20, 30)), ShapeError),
        (mutated(msg, codec="randk/fp32"), CodecError),
        (mutated(msg, codec=b"topk/fp32"), CodecError),
        (mutated(msg, arrays={**msg["w"].arrays, "idx": np.where(np.arange(idx.size) == 0, 600, idx).astype(np.int32)}),
         IndexRangeError),
        (mutated(msg, arrays={**msg["w"].arrays, "idx": np.where(np.arange(idx.size) == 0, -1, idx.astype(np.int32))}),
         IndexRangeError),
        (mutated(msg, arrays={**msg["w"].arrays, "idx": np.concatenate([idx[:1], idx[:-1]])}), DuplicateIndexError),
        (mutated(msg, arrays={**msg["w"].arrays, "idx": idx[::-1].copy()}), DuplicateIndexError),
        (mutated(msg, arrays={**msg["w"].arrays, "v.v": np.where(np.arange(vals.size) == 2, np.nan, vals)
                              .astype(np.float32)}), NonFiniteError),
        (mutated(msg, arrays={**msg["w"].arrays, "v.v": np.full_like(vals, np.inf)}), NonFiniteError),
        (mutated(msg, arrays={**msg["w"].arrays, "v.v": vals[:-1]}), TruncatedError),
        (mutated(msg, arrays={**msg["w"].arrays, "v.v": vals.astype(np.float64)}), DtypeError),
        (mutated(msg, arrays={**msg["w"].arrays, "v.v": vals.astype(object)}), DtypeError),
        (mutated(msg, arrays={"idx": idx}), CodecError),
        (mutated(msg, arrays={**msg["w"].arrays, "extra": vals}), CodecError),
        (mutated(msg, arrays={**msg["w"].arrays, "v.v": np.zeros(10 ** 6, np.float32)}), SizeError),
        (mutated(msg, meta={"seed": 1}), MetaError),
        ({"w": msg["w"]}, LayerSetError),
        ({**msg, "evil": msg["b"]}, LayerSetError),
        ({**msg, "w": "not a payload"}, CodecError),
    ]
    for bad, error in cases:
        with pytest.raises(error):
            decode_message(C, bad, SHAPES)


def test_seeded_and_quantised_header_errors():
    C, msg = valid({"name": "randk_seeded", "ratio": 0.1})
    for seed in (-1, 2 ** 63, 1.5, "7", True, None, np.array([1, 2])):
        with pytest.raises(MetaError):
            decode_message(C, mutated(msg, meta={"seed": seed}), SHAPES)
    C, msg = valid("qsgd")
    with pytest.raises(MetaError):
        decode_message(C, mutated(msg, meta={"levels": 3}), SHAPES)
    with pytest.raises(MetaError):
        decode_message(C, mutated(msg, arrays={**msg["w"].arrays, "v.norm": np.array([-1.0], np.float32)}), SHAPES)
    with pytest.raises(PayloadError):  # levels beyond s after unpacking
        decode_message(C, mutated(msg, arrays={**msg["w"].arrays, "v.q": np.full_like(msg["w"].arrays["v.q"], 255)}),
                       SHAPES)


def test_max_bytes_cap():
    C, msg = valid("identity")
    with pytest.raises(SizeError):
        decode_message(C, msg, SHAPES, max_bytes=100)


arrays_st = st.one_of(
    st.none(), st.integers(), st.text(max_size=3),
    st.builds(lambda n, dt, fill: np.full(n, fill).astype(dt),
              st.integers(0, 700),
              st.sampled_from(["float32", "float16", "float64", "int32", "uint8", "uint16", "int64", "bool"]),
              st.sampled_from([0, 1, -1, 599, 600, 255, np.nan, np.inf, 1e40])),
    st.builds(lambda n: np.arange(n), st.integers(0, 700)),
)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=st.sampled_from(SPECS), layer=st.sampled_from(["w", "b"]),
       codec=st.one_of(st.none(), st.sampled_from(["dense/fp32", "topk/fp32", "randk_seeded/fp32", "dense/qsgd",
                                                   "dense/natural", "svd/fp32", "topk/fp16", "dense/int2", "x",
                                                   "randk/fp64", "rsvd/fp32", "powersgd/fp32", "topk/int4"])),
       shape=st.one_of(st.none(), st.sampled_from([(30, 20), (30,), (20, 30), (600,), (-1, 5), ("a",)])),
       key=st.one_of(st.none(), st.sampled_from(["v.v", "idx", "v.scale", "v.q", "v.norm", "v.e", "v.sign", "zz"])),
       array=arrays_st,
       meta=st.one_of(st.none(), st.dictionaries(st.sampled_from(["seed", "levels", "k"]),
                                                 st.one_of(st.integers(-5, 2 ** 64), st.floats(), st.text(max_size=2)),
                                                 max_size=2)))
def test_fuzz_only_payload_errors_escape(spec, layer, codec, shape, key, array, meta):
    """Thousands of malformed payloads: decode either raises a PayloadError or returns finite tensors of the
    expected shapes; no other exception escapes."""
    C, msg = valid(spec)
    p = msg[layer]
    arrays = dict(p.arrays)
    if key is not None:
        arrays[key] = array
    bad = {**msg, layer: TensorPayload(codec if codec is not None else p.codec, shape if shape is not None else p.shape,
                                       arrays, meta if meta is not None else dict(p.meta))}
    try:
        out = decode_message(C, bad, SHAPES)
    except PayloadError:
        return
    for n, s in SHAPES.items():
        assert tuple(out[n].shape) == s and torch.isfinite(out[n]).all()
