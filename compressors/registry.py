"""Compressors by name: one registration per structure; any structure takes any value codec.

``make_compressor({"name": "topk", "ratio": 0.05, "values": "qsgd", "levels": 15})``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from compressors.operators import Compressor
from compressors.structures import Dense, PowerSGD, RandK, RandKSeeded, RandomizedSVD, Structure, SVDLowRank, TopK
from compressors.values import VALUE_CODECS, make_value_codec
from fedgluon.core.text import prefixed

COMPRESSORS: dict[str, tuple[Callable[..., Structure], tuple[str, ...], str]] = {
    # name: (structure factory, its options, default value codec)
    "identity": (lambda: Dense(), (), "fp32"),
    "qsgd": (lambda: Dense(), (), "qsgd"),
    "natural": (lambda: Dense(), (), "natural"),
    "int2": (lambda: Dense(), (), "int2"),
    "topk": (TopK, ("ratio", "min_k"), "fp32"),
    "randk": (RandK, ("ratio", "min_k"), "fp32"),
    "randk_seeded": (RandKSeeded, ("ratio", "min_k"), "fp32"),
    "svd": (SVDLowRank, ("rank", "min_compression_rate"), "fp32"),
    "rsvd": (RandomizedSVD, ("rank", "min_compression_rate", "oversample"), "fp32"),
    "powersgd": (PowerSGD, ("rank", "min_compression_rate", "warm_start"), "fp32"),
}

OPTION_KINDS = {"ratio": float, "min_k": int, "rank": int, "min_compression_rate": float, "oversample": int,
                "warm_start": bool, "levels": int}


def fixes_values(name: str) -> bool:
    """Whether compressor ``name`` is named after its value codec (``qsgd``: dense QSGD), which it then fixes."""
    return name in VALUE_CODECS


def is_number(v: Any) -> bool:
    """An int or float, not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


KINDS: dict[type, tuple[str, Callable[[Any], bool]]] = {  # a scalar option's type: (in words, its check)
    float: ("a number", is_number),
    int: ("an integer", lambda v: is_number(v) and isinstance(v, int)),
    bool: ("true or false", lambda v: isinstance(v, bool)),
    str: ("a string", lambda v: isinstance(v, str)),
}


def make_compressor(spec: str | Mapping[str, Any], where: str = "compressor") -> Compressor:
    """Build a compressor from a name or a mapping with ``name``, structure options, ``values`` and (with
    ``values`` qsgd) ``levels``.
    ``where`` names the mapping in error messages (``algorithm.compressor``, say): a bad field reads
    ``<where>.<field> must be ...``."""
    spec = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = spec.pop("name", None)
    if name not in COMPRESSORS:
        hint = (f"; {name!r} is a value codec: name identity (or any structure) with values {name}"
                if name in VALUE_CODECS else "")
        raise ValueError(f"{where}.name must be one of {sorted(COMPRESSORS)}, got {name!r}{hint}")
    factory, options, default_values = COMPRESSORS[name]
    values = spec.pop("values", default_values)
    if values not in VALUE_CODECS:
        raise ValueError(f"{where}.values must be one of {list(VALUE_CODECS)}, got {values!r}")
    levels = spec.pop("levels", None)
    unknown = set(spec) - set(options)
    if unknown:
        raise ValueError(f"{where} {name!r} takes options {sorted(options) + ['levels', 'values']}, "
                         f"got unknown {sorted(unknown)}")
    if fixes_values(name) and values != default_values:
        raise ValueError(f"{where} {name!r} fixes values={default_values!r}")
    if levels is not None and values != "qsgd":  # the one codec with levels: never silently ignored
        raise ValueError(f"{where}.levels applies to values qsgd only (the compressor named qsgd, or values: qsgd), "
                         f"got values {values!r}")
    for key, value in (spec if levels is None else {**spec, "levels": levels}).items():
        words, ok = KINDS[OPTION_KINDS[key]]
        if not ok(value):
            raise ValueError(f"{where}.{key} must be {words}, got {value!r}")
    with prefixed(where, (*options, "levels")):  # the structure's or codec's own check, which names its field
        codec = make_value_codec(values) if levels is None else make_value_codec(values, levels)
        return Compressor(factory(**spec), codec, name=name)
