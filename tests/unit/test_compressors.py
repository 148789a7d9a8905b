"""Compressors: unbiasedness and ω, contraction and α (measured), round trips, bits."""

import io
import math

import numpy as np
import pytest
import torch

from compressors import TensorPayload, compress_message, decode_message, make_compressor
from compressors.operators import Context
from compressors.payload import PayloadRows

UNBIASED = [{"name": "randk", "ratio": 0.1}, {"name": "randk_seeded", "ratio": 0.05},
            {"name": "qsgd", "levels": 4}, {"name": "natural"},
            {"name": "randk", "ratio": 0.2, "values": "qsgd", "levels": 8},
            {"name": "randk", "ratio": 0.2, "values": "natural"}]


def draws(C, x, n):
    """``C(x)`` with seeds 0, …, n − 1: one encode of n copies of ``x`` (row i draws from its own context alone,
    tests/unit/test_error_feedback.py), decoded through the validating path."""
    rows, _ = C.encode(x.expand(n, *x.shape), [Context(seed=s) for s in range(n)])
    return C.decode_rows(rows, shape=tuple(x.shape), dtype=x.dtype)


@pytest.mark.parametrize("spec", UNBIASED, ids=lambda s: "-".join(map(str, s.values())))
def test_unbiased_mean_and_variance_ratio(spec):
    """Empirical mean → x and E‖Q(x)−x‖²/‖x‖² ≤ ω (rand-k: = ω exactly in expectation)."""
    C = make_compressor(spec)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 25, generator=gen, dtype=torch.float64)
    N = 3000
    Q = draws(C, x, N)
    omega = C.properties(tuple(x.shape)).omega
    sq = x.pow(2).sum()
    err = (Q - x).pow(2).flatten(1).sum(1) / sq  # per-draw relative squared error
    mean_err = float(err.mean())
    # E‖mean − x‖² = E‖Q − x‖²/N ≤ ω‖x‖²/N; allow 3x for the fluctuation of a 1000-dim average
    assert float((Q.mean(0) - x).pow(2).sum() / sq) <= 3 * mean_err / N + 1e-12
    se = float(err.std()) / math.sqrt(N)
    assert mean_err <= omega + 4 * se, (mean_err, omega)
    if spec["name"].startswith("randk") and spec.get("values", "fp32") == "fp32":
        assert abs(mean_err - omega) <= 4 * se, (mean_err, omega)  # exact: (d/k − 1)‖x‖²


def adversarial_inputs():
    gen = torch.Generator().manual_seed(1)
    yield "gaussian", torch.randn(30, 20, generator=gen, dtype=torch.float64)
    yield "rank1", torch.outer(torch.randn(30, generator=gen, dtype=torch.float64),
                               torch.randn(20, generator=gen, dtype=torch.float64))
    yield "ties", torch.ones(30, 20, dtype=torch.float64)
    yield "one-hot", torch.zeros(30, 20, dtype=torch.float64).index_put_((torch.tensor([3]), torch.tensor([7])),
                                                                         torch.tensor([5.0], dtype=torch.float64))
    yield "tiny", 1e-30 * torch.randn(30, 20, generator=gen, dtype=torch.float64)
    yield "huge", 1e30 * torch.randn(30, 20, generator=gen, dtype=torch.float64)
    yield "heavy-tail", torch.distributions.StudentT(1.0).sample((30, 20)).double()


@pytest.mark.parametrize("spec", [{"name": "topk", "ratio": 0.05}, {"name": "topk", "ratio": 0.3},
                                  {"name": "svd", "rank": 1}, {"name": "svd", "rank": 4}],
                         ids=lambda s: "-".join(map(str, s.values())))
def test_contractive_bound_adversarial(spec):
    C = make_compressor({**spec, "values": "fp64"})
    for label, x in adversarial_inputs():
        alpha = C.properties(tuple(x.shape)).alpha
        err = float((C(x) - x).pow(2).sum())
        assert err <= (1 - alpha) * float(x.pow(2).sum()) * (1 + 1e-12), (label, err, alpha)


def test_contractive_composition_measured():
    """top-k followed by QSGD, shrunk by 1/(1+ω): E‖C(x)−x‖² ≤ (1 − α/(1+ω))‖x‖²."""
    C = make_compressor({"name": "topk", "ratio": 0.2, "values": "qsgd", "levels": 2})
    x = torch.randn(30, 20, dtype=torch.float64)
    alpha = C.properties(tuple(x.shape)).alpha
    errs = (draws(C, x, 2000) - x).pow(2).flatten(1).sum(1) / x.pow(2).sum()
    assert float(errs.mean()) <= 1 - alpha + 4 * float(errs.std()) / math.sqrt(2000)


def test_int2_is_a_contraction_with_alpha_one_over_n_measured():
    """MuLoCo's 2-bit quantiser: every entry goes to a level of {−s, 0, s} no farther than 0 and the largest
    is exact, so ‖Q(x) − x‖² ≤ ‖x‖² − s² ≤ (1 − 1/n)‖x‖² (up to the float32 scale); near-tight on entries
    just below s/2."""
    C = make_compressor("int2")
    n = 600
    assert C.properties((30, 20)).kind == "contractive" and C.properties((30, 20)).alpha == pytest.approx(1 / n)
    for label, x in adversarial_inputs():
        err, norm2, s2 = float((C(x) - x).pow(2).sum()), float(x.pow(2).sum()), float(x.abs().max()) ** 2
        assert err <= (norm2 - s2) + 1e-6 * s2, label
        assert err <= (1 - 1 / n) * norm2 * (1 + 1e-6), label
    x = torch.full((n,), 0.499, dtype=torch.float64)
    x[0] = 1.0
    ratio = float((C(x) - x).pow(2).sum() / x.pow(2).sum())
    assert 1 - 5 / n < ratio <= 1 - 1 / n  # the constant α = 1/n is nearly attained
    int8 = make_compressor({"name": "identity", "values": "int8"})
    assert C.properties((100,)).alpha == int8.properties((100,)).alpha  # the bound only needs 0 and ±s as levels


def test_int2_is_deterministic_hence_biased():
    """No draws: every seed gives the same payload, so E[Q(x)] = Q(x) ≠ x (biased; no ω is claimed)."""
    C = make_compressor("int2")
    x = torch.randn(8, 5, dtype=torch.float64)
    assert not C.draws
    same = draws(C, x, 4)
    assert all(torch.equal(same[0], d) for d in same)
    assert C.properties(tuple(x.shape)).omega is None
    v = torch.tensor([1.0, 0.4, -0.7, 0.0], dtype=torch.float64)
    assert C(v).tolist() == [1.0, 0.0, -1.0, 0.0]  # 0.4 → 0, −0.7 → −s: E[Q(v)] ≠ v


def test_int_codecs_count_b_bits_per_value_and_one_scale_per_tensor():
    x = {"w": torch.randn(30, 20), "b": torch.randn(7)}
    for name, b in [("int2", 2), ("int4", 4), ("int8", 8)]:
        C = make_compressor({"name": "identity", "values": name})
        msg, _ = compress_message(C, x, (1, 2, 3))
        assert C.message_bits(msg).total("int32") == b * 607 + 2 * 32
    topk = make_compressor({"name": "topk", "ratio": 0.1, "values": "int2"})
    bits = topk.bits(topk.compress(torch.randn(1000))[0])
    assert (bits.value_bits, bits.scalar_bits, bits.n_indices) == (2 * 100, 32, 100)


def test_int2_payload_with_an_unused_code_or_negative_scale_is_rejected():
    from compressors import PayloadError
    C = make_compressor("int2")
    x = {"w": torch.randn(4, 3)}
    msg, _ = compress_message(C, x, (1, 2, 3))
    for key, value in [("v.q", np.full_like(msg["w"].arrays["v.q"], 0xFF)),  # code 3: level 2 > 1
                       ("v.scale", np.array([-1.0], dtype=np.float32))]:
        bad = {"w": TensorPayload(msg["w"].codec, msg["w"].shape, {**msg["w"].arrays, key: value}, msg["w"].meta)}
        with pytest.raises(PayloadError):
            decode_message(C, bad, {"w": (4, 3)})


def test_powersgd_warm_start_measured():
    """One-shot PowerSGD is not contractive by theory; measured here on a fixed low-rank-plus-noise
    matrix, the warm-started error converges to the rank-r SVD optimum within 2% after 10 rounds,
    while cold starts stay worse (both printed)."""
    gen = torch.Generator().manual_seed(2)
    M = (torch.randn(60, 4, generator=gen) @ torch.randn(4, 40, generator=gen)
         + 0.3 * torch.randn(60, 40, generator=gen)).double()
    best = float(torch.linalg.svdvals(M)[4:].pow(2).sum() / M.pow(2).sum())  # the truncated SVD's, by torch
    for warm in (True, False):
        C = make_compressor({"name": "powersgd", "rank": 4, "warm_start": warm, "values": "fp64"})
        state, errs = None, []
        for rnd in range(10):
            payload, state = C.compress(M, Context(seed=rnd, state=state))
            errs.append(float((C.decompress(payload, shape=(60, 40), dtype=torch.float64) - M).pow(2).sum()
                              / M.pow(2).sum()))
        print(f"powersgd warm_start={warm}: relative error per round {np.round(errs, 4).tolist()}, svd {best:.4f}")
        if warm:
            assert errs[-1] <= best * 1.02 and errs[-1] < errs[0]
            warm_final = errs[-1]
        else:
            assert min(errs) > warm_final


def test_low_rank_sends_small_and_vector_tensors_dense():
    C = make_compressor({"name": "powersgd", "rank": 4})
    msg, _ = compress_message(C, {"b": torch.randn(10), "w": torch.randn(6, 5), "big": torch.randn(50, 40)}, (0,))
    assert msg["b"].codec == "dense/fp32" and msg["w"].codec == "dense/fp32"
    assert msg["big"].codec == "powersgd/fp32"
    assert C.message_bits(msg).dense_fallbacks == 2


def wire(payload: TensorPayload) -> TensorPayload:
    """Serialise each array as .npy bytes without pickle and read it back (what a wire does)."""
    arrays = {}
    for k, a in payload.arrays.items():
        buf = io.BytesIO()
        np.save(buf, a, allow_pickle=False)
        arrays[k] = np.load(io.BytesIO(buf.getvalue()), allow_pickle=False)
    return TensorPayload(str(payload.codec), tuple(payload.shape), arrays, dict(payload.meta))


ALL = ["identity", "qsgd", "natural", {"name": "topk", "ratio": 0.1}, {"name": "randk", "ratio": 0.1},
       {"name": "randk_seeded", "ratio": 0.1}, {"name": "svd", "rank": 2}, {"name": "rsvd", "rank": 2},
       {"name": "powersgd", "rank": 2}, {"name": "topk", "ratio": 0.1, "values": "fp16"},
       {"name": "topk", "ratio": 0.1, "values": "qsgd", "levels": 3}, {"name": "randk", "ratio": 0.1,
                                                                        "values": "natural"},
       "int2", {"name": "topk", "ratio": 0.1, "values": "int4"}, {"name": "randk", "ratio": 0.1, "values": "fp64"},
       {"name": "svd", "rank": 2, "values": "int8"}]


def test_the_list_covers_every_registered_compressor_and_value_codec():
    """A new compressor or value codec joins ``ALL`` (and with it the tests below)."""
    from compressors.registry import COMPRESSORS
    from compressors.values import VALUE_CODECS

    built = [make_compressor(spec) for spec in ALL]
    assert not set(COMPRESSORS) - {C.name for C in built}
    assert not set(VALUE_CODECS) - {C.values.name for C in built}


@pytest.mark.parametrize("spec", ALL, ids=str)
def test_options_state_every_setting_and_build_the_same_compressor(spec):
    C = make_compressor(spec)
    options = C.options()
    assert make_compressor(options).options() == options
    assert {"name", "values"} <= set(options) and ("levels" in options) == (options["values"] == "qsgd")
    if C.name in ("topk", "randk"):
        assert options["min_k"] == 1  # a default the spec did not write


@pytest.mark.parametrize("spec", ALL, ids=str)
def test_round_trip_lossless(spec):
    C = make_compressor(spec)
    x = {"w": torch.randn(40, 30), "b": torch.randn(40), "c": torch.randn(8, 3, 3, 3)}
    shapes = {k: tuple(v.shape) for k, v in x.items()}
    msg, _ = compress_message(C, x, (7, 1, 3))
    direct = decode_message(C, msg, shapes)
    via_wire = decode_message(C, {k: wire(p) for k, p in msg.items()}, shapes)
    for k in x:
        assert torch.equal(direct[k], via_wire[k])
    again, _ = compress_message(C, x, (7, 1, 3))  # same seed parts → the same payload
    for k in x:
        assert torch.equal(decode_message(C, again, shapes)[k], direct[k])


@pytest.mark.parametrize("spec", ALL, ids=str)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_add_decoded_equals_the_dense_sum(spec, sign):
    """Error feedback's ``base ± C(x)`` (sparse payloads added at their indices) equals the dense sum."""
    C = make_compressor(spec)
    gen = torch.Generator().manual_seed(1)
    x = {"w": torch.randn(40, 30, generator=gen), "b": torch.randn(40, generator=gen)}
    base = {k: torch.randn(v.shape, generator=gen) for k, v in x.items()}
    msg, _ = compress_message(C, x, (7, 1, 3))
    decoded = decode_message(C, msg, {k: tuple(v.shape) for k, v in x.items()})
    for k in x:
        got = C.add_decoded_(base[k].clone().unsqueeze(0), PayloadRows.of(msg[k]), sign)[0]  # a block of one
        assert torch.equal(got, base[k] + sign * decoded[k])
        assert not torch.equal(got, base[k])  # something was added


def test_identity_and_fp64_are_exact():
    x = torch.randn(20, 7, dtype=torch.float64)
    assert torch.equal(make_compressor({"name": "identity", "values": "fp64"})(x), x)
    y = torch.randn(20, 7)
    assert torch.equal(make_compressor("identity")(y), y)


def test_bit_conventions_from_counts():
    C = make_compressor({"name": "topk", "ratio": 0.01})
    d, k = 100_000, 1000
    b = C.bits(C.compress(torch.randn(d))[0])
    assert b.total("values") == 32 * k
    assert b.total("int32") == 64 * k
    assert b.total("log2d") == 32 * k + 17 * k
    assert b.total("coo64") == 32 * k + 64 * k
    assert b.total("bitmask") == 32 * k + d
    s = make_compressor({"name": "randk_seeded", "ratio": 0.01})
    assert s.bits(s.compress(torch.randn(d))[0]).total("int32") == 32 * k + 64
    q = make_compressor({"name": "qsgd", "levels": 7})  # 15 codes -> 4 bits
    assert q.bits(q.compress(torch.randn(d))[0]).total("values") == 4 * d + 32
    lr = make_compressor({"name": "svd", "rank": 3})
    assert lr.bits(lr.compress(torch.randn(50, 40))[0]).total("int32") == 32 * 3 * 90


@pytest.mark.parametrize("spec", ALL, ids=str)
def test_bits_match_bytes_on_the_wire(spec):
    """The counted value/scalar/seed bits equal the bytes our encoding really uses (packing pads < 8 bits
    per packed array); indices are sent in the smallest dtype, at most the int32 convention."""
    C = make_compressor(spec)
    payload, _ = C.compress(torch.randn(40, 30), Context(seed=3))
    b = C.bits(payload)
    value_bytes = sum(a.nbytes for k, a in payload.arrays.items() if k.startswith("v."))
    assert 0 <= 8 * value_bytes - (b.value_bits + b.scalar_bits) < 8 * 2
    if "idx" in payload.arrays:
        assert 8 * payload.arrays["idx"].nbytes <= 32 * b.n_indices


def test_bad_compressor_configs():
    with pytest.raises(ValueError, match="compressor.name must be one of"):
        make_compressor("gzip")
    with pytest.raises(ValueError, match="ratio must be in"):
        make_compressor({"name": "topk", "ratio": -0.1})
    with pytest.raises(ValueError, match="compressor.values must be one of"):
        make_compressor({"name": "topk", "values": "int3"})
    with pytest.raises(ValueError, match="unknown"):
        make_compressor({"name": "topk", "rank": 2})
    for spec in ({"name": "topk", "ratio": 0.1, "levels": 3}, {"name": "int2", "levels": 3},
                 {"name": "identity", "values": "int8", "levels": 3}):  # levels would be ignored: refused
        with pytest.raises(ValueError, match=r"compressor.levels applies to values qsgd only .* got values 'int"
                                             r"|compressor.levels applies to values qsgd only .* got values 'fp32'"):
            make_compressor(spec)
    assert make_compressor({"name": "randk", "ratio": 0.1, "values": "qsgd", "levels": 3}).values.levels == 3


def _reference_topk(X: np.ndarray, k: int) -> np.ndarray:
    """Independent reference: NaN first, then by (−|x|, index), first k, sorted."""
    out = []
    for row in X:
        a = np.abs(row.astype(np.float64))
        nan = np.isnan(a)
        out.append(np.sort(np.lexsort((np.arange(a.size), -np.where(nan, 0.0, a), ~nan))[:k]))
    return np.array(out)


@pytest.mark.parametrize("B, d, k", [(5, 100, 7), (3, 10_000, 500), (2, 200_000, 2_000), (3, 50_000, 1),
                                     (3, 50_000, 49_999), (4, 20_000, 1_000)])
@pytest.mark.parametrize("kind", ["normal", "ties", "sparse", "nonfinite", "adversarial"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_topk_selection_is_exact_with_ties_to_lower_indices(B, d, k, kind, dtype):
    """The selection (compressors.selection) equals a sort-based reference, row by row and for the block,
    by both thresholds (exact and sampled) where rows may be sampled, including ties, NaN above inf, and
    rows whose sample overshoots (the exact fallback)."""
    from compressors.selection import _plan, _sample_positions, _sample_size, _select_rows, topk_rows_numpy

    rng = np.random.default_rng(d + k)
    X = rng.standard_normal((B, d)).astype(dtype)
    if kind == "ties":
        X = rng.integers(-3, 4, (B, d)).astype(np.float32)
    elif kind == "sparse":
        X = np.zeros((B, d), np.float32)
        X[0, 5] = 1
    elif kind == "nonfinite":
        X[0, 3], X[-1, 7], X[-1, 9], X[-1, 11] = np.nan, np.inf, -np.inf, -np.nan
    elif kind == "adversarial":  # the sampled positions hold the largest values: too few reach the threshold
        s = max(2048, -(-100 * d // k))
        if 4 * s <= d:
            X[0, _sample_positions(d, s)] = 10 + np.arange(s) % 1000
    want = _reference_topk(X, k)
    got = topk_rows_numpy(X, k)
    assert np.array_equal(got, want)
    for i in range(B):
        assert np.array_equal(topk_rows_numpy(X[i:i + 1], k)[0], got[i])
    s = _sample_size(d, k)
    assert _plan(d, k, X.dtype) in {s, None}
    for plan in {s, None}:  # both thresholds, whichever the plan picked on this machine
        out = np.empty((B, k), np.int64)
        _select_rows(X, k, out, plan)
        assert np.array_equal(out, want)
