#!/usr/bin/env bash
# T2: MARINA vs DASHA (full gradients, so DASHA-MVR is DASHA) with gradient-descent steps gamma in {1, 0.5, 0.25}
# (L0 = 1/gamma), Rand-10 of d = 30, MARINA's refresh probability p = K/d = 1/3, DASHA's a = 1/(2 omega + 1) = 1/5.
# Output: runs/t2/<algorithm>/... and runs/t2/t2.png, runs/t2/t2.csv.  ~6 min on 2 cores (ROUNDS=10000).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-10000}
RANDK="{name: randk_seeded, ratio: 0.01, min_k: 10, values: fp64}"
fedgluon tune experiments/t2_marina_dasha.yaml "algorithm.adaptive.L0=[1.0,2.0,4.0]" rounds="$ROUNDS" \
  --name t2 --metric final_grad_dual_norm --parallel 2 --quiet --scheduler fifo \
  --algorithm "{name: gluon-marina, values: fp64, adaptive: {L0: 2.0, L1: 0.0}, refresh_prob: 0.3333, compressor: $RANDK}" \
  --algorithm "{name: gluon-dasha-mvr, values: fp64, adaptive: {L0: 2.0, L1: 0.0}, compressor: $RANDK}"
python experiments/t2_report.py runs/t2
