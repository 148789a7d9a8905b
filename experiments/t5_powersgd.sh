#!/usr/bin/env bash
# T5: PowerSGD inside the FL loop. SGD + Nesterov 0.9 on the clients' decoded gradients: dense, and PowerSGD
# rank {1, 2, 4} warm-started with EF14 (the paper's recipe), rank 2 without warm start, rank 2 without error
# feedback, rank 2 with EF21; then the same compressor in the LMO pipeline (gluon-ef21, rank {1, 2, 4}) against
# dense Gluon. Learning rates: the dense baselines' best of a small grid (see experiments/README.md), kept for
# every compressed variant. 2 seeds, 150 rounds. Output: runs/t5/ and runs/t5/t5.{csv,png}.  1.5-4 min on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
SGD_LR=${SGD_LR:-0.1}
GLUON_LR=${GLUON_LR:-0.05}
sgd() { echo "{name: sgd, lr: $SGD_LR, momentum: 0.9, nesterov: true, schedule: constant, $1}"; }
psgd() { echo "compressor: {name: powersgd, rank: $1, warm_start: $2}, error_feedback: $3"; }
gluon_ef21() { echo "{name: gluon-ef21, lr: $GLUON_LR, beta: 0.9, schedule: constant, compressor: {name: powersgd, rank: $1}}"; }
ALGS="[$(sgd "compressor: {name: identity}"), \
$(sgd "$(psgd 1 true ef14)"), $(sgd "$(psgd 2 true ef14)"), $(sgd "$(psgd 4 true ef14)"), \
$(sgd "$(psgd 2 false ef14)"), $(sgd "$(psgd 2 true none)"), $(sgd "$(psgd 2 true ef21)"), \
{name: gluon, lr: $GLUON_LR, beta: 0.9, schedule: constant}, \
$(gluon_ef21 1), $(gluon_ef21 2), $(gluon_ef21 4)]"
fedgluon sweep experiments/t5_powersgd.yaml "algorithm=$ALGS" "seed=[0,1]" --name t5 --parallel 2 --quiet
python experiments/t5_report.py runs/t5
