#!/usr/bin/env bash
# T6 of docs/ALGORITHMS.md §13 (scaled down): EF21-Muon with both directions compressed vs uncompressed Gluon,
# on the T3 model (digits, multinomial logistic regression) with 4 clients. Uplink top-k 10% / 5% / 1%
# with EF21, downlink top-k 10% of the model shift with EF21-P; EF21-Muon's beta_paper = 0.1 is our beta = 0.9.
# Radius tuned over lr in {0.3, 1, 3} (t_k = lr (k+1)^-1/2), 2 seeds.  ~3 min on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
fedgluon tune experiments/t3_digits.yaml task.num_clients=4 "algorithm.lr=[0.3,1.0,3.0]" algorithm.schedule=polynomial \
  algorithm.power=0.5 "seed=[0,1]" --name t6 --metric final_test_loss --parallel 2 --quiet --scheduler fifo \
  --algorithm "{name: gluon, beta: 0.9}" \
  --algorithm "{name: ef21-muon-bidir, beta: 0.9, compressor: {name: topk, ratio: 0.1}, downlink: {name: topk, ratio: 0.1}}" \
  --algorithm "{name: ef21-muon-bidir, beta: 0.9, compressor: {name: topk, ratio: 0.05}, downlink: {name: topk, ratio: 0.1}}" \
  --algorithm "{name: ef21-muon-bidir, beta: 0.9, compressor: {name: topk, ratio: 0.01}, downlink: {name: topk, ratio: 0.1}}"
