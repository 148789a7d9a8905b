"""Compress + decompress throughput per operator, as ratios against ``torch.topk`` and a dense copy.

For each size d (1M and 10M float32 elements; low-rank operators see the tensor as a near-square
matrix) we time ``decompress(compress(x))`` and print its time, throughput, and the ratios
``time / torch.topk(|x|, k)`` (same k) and ``time / x.clone()``. ``exact SVD`` runs at 1M only.

Run: ``python -m benchmarks.bench_compressors [--quick]``.
"""

from __future__ import annotations

import argparse
import math

import torch

from benchmarks.common import best_time, machine
from compressors import make_compressor
from compressors.structures import Context, topk_indices

SPECS = [
    ("identity", "identity"),
    ("top-k 1%", {"name": "topk", "ratio": 0.01}),
    ("rand-k 1%", {"name": "randk", "ratio": 0.01}),
    ("rand-k 1% seeded", {"name": "randk_seeded", "ratio": 0.01}),
    ("top-k 1% + fp16", {"name": "topk", "ratio": 0.01, "values": "fp16"}),
    ("top-k 1% + qsgd(15)", {"name": "topk", "ratio": 0.01, "values": "qsgd"}),
    ("qsgd(15)", "qsgd"),
    ("natural", "natural"),
    ("powersgd rank 4", {"name": "powersgd", "rank": 4}),
    ("rsvd rank 4", {"name": "rsvd", "rank": 4}),
    ("exact SVD rank 4", {"name": "svd", "rank": 4}),
]


def reference_times(x: torch.Tensor, k: int, repeat: int) -> tuple[float, float, float]:
    """Best times of ``torch.topk(|x|, k)``, a dense copy of ``x`` and our top-k selection."""
    return (best_time(lambda: torch.topk(x.abs(), k, sorted=False), repeat=repeat),
            best_time(lambda: x.clone(), repeat=repeat),
            best_time(lambda: topk_indices(x, k), repeat=repeat))


def roundtrip_time(C, inp: torch.Tensor, repeat: int) -> float:
    """Best time of ``C.decompress(C.compress(inp))``."""
    def run():
        p, _ = C.compress(inp, Context(seed=1))
        C.decompress(p, shape=tuple(inp.shape))
    return best_time(run, repeat=repeat)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1M only, fewer repeats")
    args = ap.parse_args(argv)
    repeat = 2 if args.quick else 3
    print(f"machine: {machine()}")
    for d in ((10 ** 6,) if args.quick else (10 ** 6, 10 ** 7)):
        side = int(math.isqrt(d))
        x = torch.randn(d)
        m = x[: side * side].reshape(side, side)
        k = d // 100
        t_topk, t_copy, t_sel = reference_times(x, k, repeat)
        print(f"\n[d = {d:,}] torch.topk(k={k:,}) {t_topk*1e3:.1f} ms, dense copy {t_copy*1e3:.2f} ms, "
              f"our top-k selection {t_sel*1e3:.1f} ms ({t_topk / t_sel:.1f}x faster than torch.topk)")
        print(f"  {'operator':22s} {'ms':>9s} {'M elem/s':>9s} {'/torch.topk':>12s} {'/dense copy':>12s}")
        for label, spec in SPECS:
            if label.startswith("exact SVD") and d > 10 ** 6:
                continue
            C = make_compressor(spec)
            inp = m if label.split()[0] in ("powersgd", "rsvd", "exact") else x
            t = roundtrip_time(C, inp, repeat)
            print(f"  {label:22s} {t*1e3:9.1f} {inp.numel() / t / 1e6:9.1f} {t / t_topk:12.2f} {t / t_copy:12.1f}")


if __name__ == "__main__":
    main()
