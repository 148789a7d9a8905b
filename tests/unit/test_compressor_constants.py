"""Compressors against formulas and statistics written here, not against the library's own ``properties()``:
each declared ω or α equals its paper's formula; unbiasedness is a per-coordinate χ² test; rand-k draws
uniform k-subsets; the rounding and integer codecs meet their error bounds; the randomized SVD meets the
Halko–Martinsson–Tropp bound; PowerSGD converges to the truncated SVD computed by torch here."""

import itertools
import math

import pytest
import torch

from compressors import make_compressor
from compressors.operators import Context
from compressors.structures import randk_indices

SHAPE, D = (40, 25), 1000
U16 = 2.0 ** -11  # fp16's unit roundoff


def k_of(ratio: float, d: int = D, min_k: int = 1) -> int:
    """Values a sparsifier sends: ``clamp(⌈ratio·d⌉, min_k, d)``."""
    return min(d, max(min_k, math.ceil(ratio * d)))


def qsgd_omega(n: int, s: int) -> float:
    """Alistarh et al. 2017, Lemma 3.1: ``min(n/s², √n/s)``."""
    return min(n / s ** 2, math.sqrt(n) / s)


def rounding_alpha(alpha: float, u: float) -> float:
    """A contraction α followed by a relative error u: ``‖R(C(x)) − x‖ ≤ (√(1−α) + u(1 + √(1−α)))‖x‖``."""
    root = math.sqrt(1 - alpha)
    return 1 - (root + u * (1 + root)) ** 2


EXPECTED = [  # (spec, "omega" | "alpha", value from the formula)
    ({"name": "randk", "ratio": 0.1}, "omega", D / k_of(0.1) - 1),
    ({"name": "randk", "ratio": 0.5}, "omega", D / k_of(0.5) - 1),
    ({"name": "randk", "ratio": 0.001, "min_k": 5}, "omega", D / 5 - 1),
    ({"name": "randk_seeded", "ratio": 0.05}, "omega", D / k_of(0.05) - 1),
    ({"name": "qsgd", "levels": 4}, "omega", qsgd_omega(D, 4)),
    ({"name": "qsgd", "levels": 100}, "omega", qsgd_omega(D, 100)),
    ({"name": "natural"}, "omega", 1 / 8),  # Horváth et al. 2019, Theorem 3
    ({"name": "randk", "ratio": 0.2, "values": "qsgd", "levels": 8}, "omega",
     (1 + D / k_of(0.2) - 1) * (1 + qsgd_omega(k_of(0.2), 8)) - 1),  # independent unbiased stages
    ({"name": "randk", "ratio": 0.2, "values": "natural"}, "omega", (D / k_of(0.2)) * (1 + 1 / 8) - 1),
    ({"name": "topk", "ratio": 0.05}, "alpha", k_of(0.05) / D),
    ({"name": "topk", "ratio": 0.2, "values": "qsgd", "levels": 2}, "alpha",
     (k_of(0.2) / D) / (1 + qsgd_omega(k_of(0.2), 2))),  # Beznosikov et al.: C ∘ Q/(1+ω)
    ({"name": "svd", "rank": 3}, "alpha", 3 / min(SHAPE)),
    ({"name": "topk", "ratio": 0.1, "values": "fp16"}, "alpha", rounding_alpha(k_of(0.1) / D, U16)),
    ({"name": "identity", "values": "int8"}, "alpha", 1 / D),
    ({"name": "identity", "values": "int4"}, "alpha", 1 / D),
    ({"name": "svd", "rank": 5, "values": "fp16"}, "alpha", rounding_alpha(5 / min(SHAPE), U16)),
    # int-b's α = 1/n is too weak to survive top-k's error: the bound exceeds 1 and no constant is claimed
    ({"name": "topk", "ratio": 0.5, "values": "int8"}, "alpha", None),
]


@pytest.mark.parametrize("spec, constant, value", EXPECTED, ids=lambda v: str(v) if not isinstance(v, dict) else
                         "-".join(map(str, v.values())))
def test_declared_constants_equal_the_papers_formulas(spec, constant, value):
    props = make_compressor(spec).properties(SHAPE)
    if value is None:
        assert props.kind == "biased" and props.alpha is None and props.omega is None
        assert rounding_alpha(k_of(spec["ratio"]) / D, math.sqrt(1 - 1 / k_of(spec["ratio"]))) <= 0
    else:
        assert getattr(props, constant) == pytest.approx(value, rel=1e-12)


UNBIASED = [{"name": "randk", "ratio": 0.1}, {"name": "randk", "ratio": 0.5}, {"name": "randk_seeded", "ratio": 0.05},
            {"name": "qsgd", "levels": 4}, {"name": "natural"},
            {"name": "randk", "ratio": 0.2, "values": "qsgd", "levels": 8},
            {"name": "randk", "ratio": 0.2, "values": "natural"}]


def draws(C, x, n):
    rows, _ = C.encode(x.expand(n, *x.shape), [Context(seed=s) for s in range(n)])
    return C.decode_rows(rows, shape=tuple(x.shape), dtype=x.dtype)


@pytest.mark.parametrize("spec", UNBIASED, ids=lambda s: "-".join(map(str, s.values())))
def test_unbiased_per_coordinate_chi_square(spec):
    """E[Q(x)]_i = x_i for every coordinate: ``T = Σ_i N(mean_i − x_i)²/var_i`` is ≈ χ² with d degrees
    of freedom (mean d, sd √(2d)); we require T < d + 6√(2d). A bias of a few percent in every coordinate
    (a decoder scaled by 0.95, say) puts T near 2d for these sizes. Coordinates that never varied in N
    draws (QSGD's smallest entries rarely leave 0) are left out; they must be few."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(*SHAPE, generator=gen, dtype=torch.float64)
    N = 3000
    Q = draws(make_compressor(spec), x, N).flatten(1)
    mean, var, xf = Q.mean(0), Q.var(0), x.flatten()
    varies = var > 0
    d = int(varies.sum())
    assert d >= 0.99 * D, d
    T = float((N * (mean - xf)[varies] ** 2 / var[varies]).sum())
    assert T < d + 6 * math.sqrt(2 * d), (T, d)


@pytest.mark.parametrize("d, k", [(8, 2), (40, 3), (6, 2), (10, 7)])  # the first two: the sequential branch
def test_randk_draws_uniform_k_subsets(d, k):
    """Every k-subset of range(d) is equally likely (both branches of :func:`randk_indices`): Pearson's χ²
    over the subsets (when there are few) or over the per-index counts (each Binomial(N, k/d), summing to
    Nk, so the statistic with the (1 − k/d) factor is ≈ χ² with d − 1 degrees of freedom)."""
    N = 6000
    drawn = [tuple(randk_indices(d, k, torch.Generator().manual_seed(s)).tolist()) for s in range(N)]
    assert all(len(set(t)) == k and list(t) == sorted(t) and 0 <= t[0] and t[-1] < d for t in drawn)
    subsets = list(itertools.combinations(range(d), k))
    if len(subsets) <= 60:
        counts = torch.tensor([drawn.count(c) for c in subsets], dtype=torch.float64)
        e, df = N / len(subsets), len(subsets) - 1
        T = float(((counts - e) ** 2 / e).sum())
    else:
        counts = torch.bincount(torch.tensor([i for t in drawn for i in t]), minlength=d).double()
        e, df = N * k / d, d - 1
        T = float(((counts - e) ** 2 / (e * (1 - k / d))).sum())
    assert T < df + 6 * math.sqrt(2 * df), (T, df)


def codec_inputs():
    gen = torch.Generator().manual_seed(5)
    yield torch.randn(*SHAPE, generator=gen, dtype=torch.float64)
    yield torch.randn(*SHAPE, generator=gen, dtype=torch.float64) * torch.logspace(-3, 3, SHAPE[1], dtype=torch.float64)
    yield 1e-30 * torch.randn(*SHAPE, generator=gen, dtype=torch.float64)
    yield 1e30 * torch.randn(*SHAPE, generator=gen, dtype=torch.float64)


def test_fp16_relative_error_is_at_most_its_unit_roundoff():
    """Scaled half precision: ‖Q(x) − x‖ ≤ 2⁻¹¹‖x‖, and entries within 2¹⁴ of the largest are each
    within 2⁻¹¹ relative (normal fp16 numbers after scaling by max|x|/2¹⁴)."""
    C = make_compressor({"name": "identity", "values": "fp16"})
    for x in codec_inputs():
        x = x.float().double()  # fp16 starts from the float32 wire value
        q = C(x)
        assert float((q - x).norm()) <= U16 * float(x.norm()) * (1 + 1e-6)
        normal = x.abs() >= x.abs().max() * 2.0 ** -14
        assert bool(((q - x).abs() <= U16 * x.abs() * (1 + 1e-6))[normal].all())
        assert float((q - x).abs().max()) > 0 or bool((x == q).all())


@pytest.mark.parametrize("codec, top", [("int4", 7), ("int8", 127)])
def test_integer_codecs_round_to_the_nearest_level_and_contract(codec, top):
    """``Q(v)_l = s·round(L v_l/s)/L`` with ``s = max|v|`` (as float32), L = 2^{b−1} − 1: each entry within
    s/(2L) of its value, the largest exact, and ‖Q(v) − v‖² ≤ (1 − 1/n)‖v‖²."""
    C = make_compressor({"name": "identity", "values": codec})
    for x in codec_inputs():
        q = C(x)
        s = float(torch.tensor(float(x.abs().max()), dtype=torch.float32))
        torch.testing.assert_close(q, s * torch.round(x * (top / s)).clamp(-top, top) / top, rtol=1e-12, atol=0)
        assert float((q - x).abs().max()) <= s / (2 * top) * (1 + 1e-6)
        assert float((q - x).pow(2).sum()) <= (1 - 1 / D) * float(x.pow(2).sum()) * (1 + 1e-6)


@pytest.mark.parametrize("spec, alpha", [({"name": "topk", "ratio": 0.1, "values": "fp16"},
                                           rounding_alpha(k_of(0.1) / D, U16)),
                                          ({"name": "svd", "rank": 5, "values": "fp16"},
                                           rounding_alpha(5 / min(SHAPE), U16))],
                         ids=["topk-fp16", "svd-fp16"])
def test_composed_contractions_meet_their_formula(spec, alpha):
    """top-k or a truncated SVD, then half precision: ‖C(x) − x‖² ≤ (1 − α)‖x‖² with α from
    :func:`rounding_alpha`, on inputs of every scale."""
    C = make_compressor(spec)
    for x in codec_inputs():
        x = x.float().double()
        assert float((C(x) - x).pow(2).sum()) <= (1 - alpha) * float(x.pow(2).sum()) * (1 + 1e-6)


def truncated_svd_error(M: torch.Tensor, r: int) -> float:
    """‖M − M_r‖²_F = Σ_{j>r} σ_j², by torch's SVD."""
    return float(torch.linalg.svdvals(M)[r:].pow(2).sum())


def test_randomized_svd_meets_the_halko_martinsson_tropp_bound():
    """rsvd of rank r with p = ``oversample`` extra sketch columns, then truncated to rank r:
    E‖M − rsvd(M)‖² ≤ E‖M − QQᵀM‖² + τ_r² ≤ (1 + r/(p − 1))τ_r² + τ_r² (HMT 2011, Thm 10.5, and σ_j(QᵀM)
    ≤ σ_j(M)), τ_r² the truncated SVD's error; measured over 200 sketches of a matrix with a slowly
    decaying spectrum, and never above ‖M‖²."""
    gen = torch.Generator().manual_seed(7)
    U, _ = torch.linalg.qr(torch.randn(60, 40, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(40, 40, generator=gen, dtype=torch.float64))
    M = U * (1.0 / torch.arange(1, 41, dtype=torch.float64)) @ V.T
    r, p = 4, 3
    C = make_compressor({"name": "rsvd", "rank": r, "oversample": p, "values": "fp64"})
    errs = torch.tensor([float((C(M, Context(seed=s)) - M).pow(2).sum()) for s in range(200)])
    tau2 = truncated_svd_error(M, r)
    assert float(errs.max()) <= float(M.pow(2).sum())
    assert float(errs.min()) >= tau2 * (1 - 1e-9)  # nothing of rank r beats the truncated SVD
    assert float(errs.mean()) <= (2 + r / (p - 1)) * tau2


def test_powersgd_warm_start_reaches_the_truncated_svd():
    """Warm-started PowerSGD is subspace iteration: on a fixed low-rank-plus-noise matrix its error after 10
    rounds is within 2% of the rank-4 truncated SVD's (torch.linalg.svd here)."""
    gen = torch.Generator().manual_seed(2)
    M = (torch.randn(60, 4, generator=gen) @ torch.randn(4, 40, generator=gen)
         + 0.3 * torch.randn(60, 40, generator=gen)).double()
    C = make_compressor({"name": "powersgd", "rank": 4, "warm_start": True, "values": "fp64"})
    state = None
    for rnd in range(10):
        payload, state = C.compress(M, Context(seed=rnd, state=state))
    err = float((C.decompress(payload, shape=(60, 40), dtype=torch.float64) - M).pow(2).sum())
    tau2 = truncated_svd_error(M, 4)
    assert tau2 * (1 - 1e-9) <= err <= 1.02 * tau2  # equal at convergence up to float64 rounding


@pytest.mark.parametrize("name", ["svd", "rsvd", "powersgd"])
@pytest.mark.parametrize("values, slack", [("fp16", 1e-3), ("int8", 0.02)])
def test_low_rank_factors_survive_a_codec_with_one_scale(name, values, slack):
    """The factors are balanced before the value codec (one scale for both): the error of low rank with
    fp16 or int8 stays within ``slack`` of low rank with float64, at gradient scales from 1 to 1e-30
    (unbalanced, ``U·S`` beside a unit ``V``, int8 sent nothing at 1e-3 and fp16 nothing at 1e-20)."""
    gen = torch.Generator().manual_seed(9)
    for scale in (1.0, 1e-3, 1e-8, 1e-20, 1e-30):
        x = (scale * torch.randn(*SHAPE, generator=gen, dtype=torch.float64)).float().double()
        exact = make_compressor({"name": name, "rank": 5, "values": "fp64"})(x, Context(seed=1))
        coded = make_compressor({"name": name, "rank": 5, "values": values})(x, Context(seed=1))
        rel = float((coded - x).norm() / x.norm())
        assert rel <= float((exact - x).norm() / x.norm()) + slack, (scale, rel)
