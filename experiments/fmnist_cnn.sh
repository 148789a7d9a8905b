#!/usr/bin/env bash
# Fashion-MNIST CNN: adamw, gluon and fedavg (dense, 40 rounds) against compressed variants (top-10% with EF21,
# 200 rounds) at equal uplink bits per client (int32 convention: a top-10% round costs 20% of a dense round).
# Every method's learning rate is tuned over a 3-point grid around its optimum (cosine decay to 0 over the run; FedAvg: its constant
# local learning rate, 5 local steps), 1 seed.
# Output: runs/fmnist/{dense,compressed}/..., runs/fmnist/dense/comparison.csv and runs/fmnist/accuracy.png.
# ~12 min on 2 cores (27 runs; a first pass over wider grids put every optimum at these grids' centres).
set -euo pipefail
cd "$(dirname "$0")/.."
TOPK="compressor: {name: topk, ratio: 0.1}"
COSINE="schedule: warmup_cosine, warmup: 0"
fedgluon tune experiments/fmnist_cnn.yaml "algorithm.lr=[0.1,0.3,1.0]" rounds=40 algorithm.total=40 \
  --name fmnist/dense --metric final_test_accuracy --mode max --parallel 2 --quiet --scheduler fifo \
  --algorithm "{name: gluon, beta: 0.9, $COSINE}"
fedgluon tune experiments/fmnist_cnn.yaml "algorithm.local_lr=[0.03,0.1,0.3]" rounds=40 \
  --name fmnist/dense-fedavg --metric final_test_accuracy --mode max --parallel 2 --quiet --scheduler fifo \
  --algorithm "{name: fedavg, local_steps: 5}"
fedgluon tune experiments/fmnist_cnn.yaml "algorithm.lr=[0.001,0.003,0.01]" rounds=40 algorithm.total=40 \
  --name fmnist/dense-adamw --metric final_test_accuracy --mode max --parallel 2 --quiet --scheduler fifo \
  --algorithm "{name: adamw, $COSINE}"
fedgluon tune experiments/fmnist_cnn.yaml "algorithm.lr=[0.1,0.3,1.0]" rounds=200 algorithm.total=200 \
  --name fmnist/compressed --metric final_test_accuracy --mode max --parallel 2 --quiet --scheduler fifo \
  --algorithm "{name: gluon-ef21, beta: 0.9, $TOPK, $COSINE}" \
  --algorithm "{name: gluon-ef21-mvr, beta: 0.9, $TOPK, $COSINE}"
fedgluon tune experiments/fmnist_cnn.yaml "algorithm.lr=[0.003,0.01,0.03]" rounds=200 algorithm.total=200 \
  --name fmnist/compressed-adamw --metric final_test_accuracy --mode max --parallel 2 --quiet --scheduler fifo \
  --algorithm "{name: adamw, $TOPK, $COSINE}"
python experiments/compare.py runs/fmnist/dense runs/fmnist/dense-fedavg runs/fmnist/dense-adamw runs/fmnist/compressed \
  runs/fmnist/compressed-adamw --baseline adamw@dense-adamw --slack 0.1 --plot runs/fmnist/accuracy.png
