"""Helpers for benchmarks: the benchmarks' run spec, wall times after a warm-up, and a header naming the machine."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable

import torch


def spec_for(n: int, rounds: int, block_size: int = 1, hidden: int = 64, client_device: str = "cpu") -> dict:
    """The benchmarks' run: ``n`` clients of the synthetic task (MLP 60→``hidden``→10), gluon-ef21 with top-5%."""
    return {"task": {"name": "synthetic", "num_clients": n, "hidden": [hidden], "mean_samples": 80},
            "algorithm": {"name": "gluon-ef21", "lr": 0.05, "compressor": {"name": "topk", "ratio": 0.05}},
            "rounds": rounds, "seed": 0, "eval_every": 10 ** 6, "node_timeout": 600.0, "round_timeout": 600.0,
            "block_size": block_size, "client_device": client_device}


def per_round(history: list[dict], skip: int = 1, key: str = "wall_time") -> float:
    """Mean of ``key`` (seconds) over the rounds after the first ``skip``."""
    rows = history[skip:] or history
    return sum(r[key] for r in rows) / len(rows)


def timings(fn: Callable[[], object], repeat: int, warmup: int = 0) -> list[float]:
    """Wall-clock seconds of each of ``repeat`` calls after ``warmup`` calls (CUDA-synchronised)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return out


def best_time(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """Best wall-clock seconds of ``repeat`` calls after ``warmup`` calls (CUDA-synchronised)."""
    return min(timings(fn, repeat, warmup))


def cpu_description() -> str:
    """CPU model, the SIMD level torch dispatches to, and whether the CPU has native bf16 arithmetic
    (AVX-512 BF16 or AMX): bf16 matmuls are ~100x slower than fp32 without it and faster with it, which
    decides comparisons against bf16 Newton-Schulz (torch.optim.Muon)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    bf16 = "native bf16" if flags & {"avx512_bf16", "amx_bf16"} else "no native bf16"
    return f"{model}, {torch.backends.cpu.get_cpu_capability()}, {bf16}"


def machine() -> str:
    from fedgluon.runtime.allocator import applied

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    malloc = "malloc keeps freed memory" if applied() else "malloc defaults"
    return (f"{cpu_description()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {gpu}, {malloc}")
