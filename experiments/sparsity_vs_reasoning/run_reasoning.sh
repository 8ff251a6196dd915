#!/usr/bin/env bash
# The reasoning half of sparsity vs reasoning (issue 33), in one command: 48 runs
# (E {2,4,8,16} x k {1,2} x seeds {0,1,2} x budgets {800, 1600} steps), test-time
# compute and GRPO on the 1600-step runs, then the table and the figures.
# Two shards at once (one JAX process does not keep 2 cores busy at these sizes).
#
#     bash experiments/sparsity_vs_reasoning/run_reasoning.sh [SWEEP_DIR]   # default runs/sparsity_reason
#
# Resumable: rerunning skips finished points and resumes an interrupted one from its
# checkpoint (moe-lab sweep); nothing is written outside SWEEP_DIR and this folder's figures.
set -euo pipefail
cd "$(dirname "$0")/../.."
ML=${MOE_LAB:-.venv/bin/moe-lab}
PY=${PYTHON:-.venv/bin/python}
SWEEP=${1:-runs/sparsity_reason}
CFG=configs/sparsity_sweep.py:reason
mkdir -p "$(dirname "$SWEEP")"

$ML sweep --config "$CFG" --workdir "$SWEEP" --shard 0/2 > "$SWEEP.shard0.log" 2>&1 &
PID0=$!
$ML sweep --config "$CFG" --workdir "$SWEEP" --shard 1/2 2>&1 | tee "$SWEEP.shard1.log"
wait "$PID0"
$PY experiments/sparsity_vs_reasoning/plot_reasoning.py "$SWEEP"
MOE_LAB_RESULTS=$PWD/$SWEEP/results.jsonl MOE_LAB_FIGURES=$PWD/experiments/sparsity_vs_reasoning/reasoning \
  .venv/bin/jupyter-execute notebooks/sparsity_vs_reasoning.ipynb
