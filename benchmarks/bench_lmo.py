"""LMO step time against its matmul bound and against torch.optim.Muon, printed as ratios.

* Bound: Newton–Schulz with 5 steps is 15 matmuls per matrix (X Xᵀ, A·A, B·X per step). We time
  exactly those 15 matmuls on the same shapes, batched per shape as the LMO batches them, with nothing
  else, and report
  ``efficiency = bound / LMO time`` (1.0 = the LMO costs nothing beyond its matmuls).
* torch.optim.Muon (torch ≥ 2.9) always orthogonalises in bf16, 70–180× slower than fp32 on AVX2
  CPUs without native bf16 (so it is compared on small matrices only) but *faster* than fp32 on CPUs
  with AVX-512 BF16 or AMX; the machine line says which this is. fedgluon's default runs NS in fp32
  on CPU; its ``ns_dtype="bfloat16"`` row shows what asking for bf16 gives.
* ``ns_compile`` (``torch.compile`` of the NS iterations): a row on CUDA, and on CPU with ``--compile``
  (its first call compiles, ≈ 20 s here, and is left out of the time as a warm-up).

Run: ``python -m benchmarks.bench_lmo [--quick] [--compile] [--dim D ...]``.
"""

from __future__ import annotations

import argparse
from collections import Counter
from functools import partial

import torch

from benchmarks.common import best_time, machine
from fedgluon.lmo.geometry import Geometry
from fedgluon.lmo.optim import Gluon


def ns_matmul_bound(shapes: dict[str, tuple[int, int]], device: str, dtype: torch.dtype) -> float:
    """Best time of NS5's 15 matmuls alone on the LMO's own operands: same-shape matrices stacked into one
    batch, as the geometry stacks them, each in its wide orientation (X: m×n with m ≤ n, A = X Xᵀ)."""
    mats = [torch.randn(count, *(s if s[0] <= s[1] else s[::-1]), device=device, dtype=dtype)
            for s, count in Counter(shapes.values()).items()]
    grams = [m @ m.mT for m in mats]

    def run():
        for X, A in zip(mats, grams):
            for _ in range(5):
                X @ X.mT
                A @ A
                A @ X
    return best_time(run)


def bench_block(device: str, repeat: int, compile: bool = False, d: int = 768) -> None:
    shapes = {f"attn.{k}": (d, d) for k in "qkvo"} | {"mlp.fc": (4 * d, d), "mlp.proj": (d, 4 * d)}
    grads = {n: torch.randn(*s, device=device) for n, s in shapes.items()}
    work = torch.bfloat16 if device == "cuda" else torch.float32
    bound = ns_matmul_bound(shapes, device, work)
    print(f"\n[transformer block, d={d}: 4x{d}x{d} + {4*d}x{d} + {d}x{4*d}, device={device}, NS in {work}]")
    rows = [("NS5 quintic (batched)", {}), ("Polar Express 5", {"ns_coefficients": "polar_express"}),
            ("exact SVD", {"spectral_method": "svd"})]
    if compile:
        rows.insert(1, ("NS5, torch.compile", {"ns_compile": True}))
    for label, kw in rows:
        geom = Geometry.from_shapes(shapes, preset="muon", lmo_device="same", **kw)  # where the tensors are
        t = best_time(partial(geom.lmo, grads), repeat=repeat)
        print(f"  {label:24s} {t*1e3:8.1f} ms   bound/time = {bound / t:5.2f}")
    print(f"  {'15 matmuls (bound)':24s} {bound*1e3:8.1f} ms")


def bench_vs_torch_muon(n: int, repeat: int) -> None:
    if not hasattr(torch.optim, "Muon"):
        print("torch.optim.Muon not available in this torch")
        return
    w1 = torch.nn.Parameter(torch.randn(n, n))
    w2 = torch.nn.Parameter(w1.detach().clone())
    ref = torch.optim.Muon([w1], lr=0.02, momentum=0.95, nesterov=True)
    w3 = torch.nn.Parameter(w1.detach().clone())
    ours = Gluon([("w", w2)], lr=0.02, method="muon", lmo_device="same")  # on the CPU, GPU or not
    ours_bf16 = Gluon([("w", w3)], lr=0.02, method="muon", ns_dtype="bfloat16", lmo_device="same")
    g = torch.randn(n, n)

    def step(opt, w):
        w.grad = g
        opt.step()
    t_ref = best_time(lambda: step(ref, w1), repeat=max(1, repeat // 2))
    t_ours = best_time(lambda: step(ours, w2), repeat=repeat)
    t_bf16 = best_time(lambda: step(ours_bf16, w3), repeat=repeat)
    print(f"  {n}x{n}: torch.optim.Muon {t_ref*1e3:8.1f} ms   fedgluon Gluon(muon), fp32 NS (default) "
          f"{t_ours*1e3:7.1f} ms: speed-up {t_ref / t_ours:6.1f}x   with ns_dtype=bfloat16 {t_bf16*1e3:7.1f} ms: "
          f"{t_ref / t_bf16:5.1f}x")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and smaller Muon comparison")
    ap.add_argument("--compile", action="store_true", help="also time ns_compile on CPU (it always runs on CUDA)")
    ap.add_argument("--dim", type=int, nargs="+", default=[768],
                    help="model widths d of the transformer blocks timed (default 768)")
    args = ap.parse_args(argv)
    if min(args.dim) < 1:
        ap.error(f"--dim must be positive, got {args.dim}")
    repeat = 2 if args.quick else 5
    print(f"machine: {machine()}")
    for d in args.dim:
        bench_block("cpu", repeat, compile=args.compile, d=d)
        if torch.cuda.is_available():
            bench_block("cuda", repeat, compile=True, d=d)
    print("\n[one optimizer step on an n x n matrix vs torch.optim.Muon (bf16 NS), CPU]")
    for n in ((128, 256) if args.quick else (128, 256, 512)):
        bench_vs_torch_muon(n, repeat)


if __name__ == "__main__":
    main()
