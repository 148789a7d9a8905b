#!/usr/bin/env bash
# T3: uncompressed Gluon vs compressed variants (EF21 without VR, EF21-SARAH, EF21-MVR, MARINA, DASHA-MVR),
# each with its radius tuned over lr in {0.3, 1, 3, 10} (polynomial decay t_k = lr (k+1)^-1/2), 2 seeds.
# Every trial runs all rounds (--scheduler fifo: the full grid; BENCHMARKS.md "Tuning with ASHA" for early stopping).
# Output: runs/t3/tuned.csv (one row per trial), runs/t3/best.json, runs/t3/<algorithm>/{best.yaml,runs/<trial>/}.
# ~3 min on 2 idle cores.
set -euo pipefail
cd "$(dirname "$0")/.."
fedgluon tune experiments/t3_digits.yaml "algorithm.lr=[0.3,1.0,3.0,10.0]" algorithm.schedule=polynomial \
  algorithm.power=0.5 "seed=[0,1]" --name t3 --metric final_test_loss --parallel 2 --quiet --scheduler fifo \
  --algorithm "{name: gluon, beta: 0.9}" \
  --algorithm "{name: gluon-ef21, compressor: {name: topk, ratio: 0.05}}" \
  --algorithm "{name: gluon-ef21-sarah, refresh_prob: 0.05, compressor: {name: topk, ratio: 0.05}}" \
  --algorithm "{name: gluon-ef21-mvr, compressor: {name: topk, ratio: 0.05}}" \
  --algorithm "{name: gluon-marina, refresh_prob: 0.05, compressor: {name: randk_seeded, ratio: 0.05}}" \
  --algorithm "{name: gluon-dasha-mvr, compressor: {name: randk_seeded, ratio: 0.05}}"
