#!/usr/bin/env bash
# The strategy-selection study of README.md ("2026-12-07"), in one command (~20 min of
# wall on 2 CPU cores): the base, its test-time compute, GRPO at lr 1e-4 and 3e-4 with
# three seeds each (the three seeds of an arm at once), the table and the figures.
#
#     bash experiments/grpo_arith/run_strategies.sh [RUNS_DIR]      # default runs/grpo_arith
#
# Resumable: a finished base or GRPO run is skipped (moe-lab train / rl resume where a
# run stopped), and nothing is written outside RUNS_DIR and this folder's figures.
set -euo pipefail
cd "$(dirname "$0")/../.."
ML=${MOE_LAB:-.venv/bin/moe-lab}
PY=${PYTHON:-.venv/bin/python}
RUNS=${1:-runs/grpo_arith}
BASE=$RUNS/strategies
mkdir -p "$RUNS"

$ML train --config configs/arith_strategies.py --workdir "$BASE"
$ML eval --workdir "$BASE" --ttc --ttc-n 16 --ttc-prompts 256 --ttc-waits 0,1,2,4

arm() {  # $1: suffix of the run names, then extra flags for moe-lab rl
  local suffix=$1; shift
  for s in 0 1 2; do
    $ML rl --from "$BASE" --to "$RUNS/strategies_grpo${suffix}_s$s" \
      --config configs/grpo.py:strategies --config.seed=$s "$@" &
  done
  wait
}
arm _lr1e-4 --config.lr=1e-4
arm "" # configs/grpo.py:strategies' own lr, 3e-4

TTC=$(ls "$BASE"/eval/*-ttc.json | sort -V | tail -1)
$PY experiments/grpo_arith/plot_direct.py --ttc "$TTC" \
  --grpo "$RUNS"/strategies_grpo_lr1e-4_s{0,1,2}
$PY experiments/grpo_arith/plot_direct.py --ttc "$TTC" \
  --grpo "$RUNS"/strategies_grpo_s{0,1,2} --out "$RUNS"   # the 3e-4 arm: table, figure in RUNS
(cd notebooks && MOE_LAB_TTC="$(cd .. && realpath "$TTC")" \
  MOE_LAB_GRPO="$(cd .. && realpath "$RUNS/strategies_grpo_lr1e-4_s0")" \
  MOE_LAB_FIGURES=../experiments/grpo_arith/strategies \
  ../.venv/bin/jupyter-execute test_time_compute.ipynb)
