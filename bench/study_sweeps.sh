#!/usr/bin/env bash
# The study's comparisons on the built-in default task (docs/findings.md, "Measured on the built-in task"):
#
#   1. rank 1, rank 16 and full, each over its own 5-LR grid on selection seeds 1,2, then confirmation
#      seeds 3-6 at each one's best LR (claims 1 and 5);
#   2. attention-only against MLP-only LoRA at matched trainable parameters (attention rank 3 and MLP rank 2:
#      12,288 each), same protocol, in the same sweep folder so the full-parameter runs are shared (claim 4);
#   3. batch 16 against batch 256 at the recipe's 19,200 episodes, LR pinned (LoRA 1e-3, full 1e-4),
#      seeds 1-4 (claim 3);
#   4. the LR ratio of short runs: rank 1 and full over 7-LR grids (1.5x apart) at 60 steps (the LR rule's
#      short-run step).
#
# Usage: bash bench/study_sweeps.sh [1|2|3|4 ...]   (default: all; about an hour on 2 CPU cores)
# Reports land in sweeps/study_*/report.md and are copied to docs/experiments/. PYTHON picks the interpreter
# (default: python on PATH, e.g. the activated .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
RL=("${PYTHON:-python}" -m rl_lora.cli sweep recipes/grpo_arithmetic.yaml logging.wandb=false --output-dir sweeps --jobs 2)
GRID=(--lrs auto --selection-seeds 1,2 --seeds 3,4,5,6)

publish() {  # copy a sweep's report and plots into docs/experiments/<name>/
  mkdir -p "docs/experiments/$1"
  cp "sweeps/$1"/report.md "sweeps/$1"/*.png "sweeps/$1"/sweep.json "docs/experiments/$1/"
  [ -f "sweeps/$1/selection.json" ] && cp "sweeps/$1/selection.json" "docs/experiments/$1/"
  return 0
}

for part in "${@:-1 2 3 4}"; do
  for p in $part; do
    case $p in
      1) "${RL[@]}" --ranks 1,16,full "${GRID[@]}" --name study_best_lr; publish study_best_lr ;;
      2) "${RL[@]}" --ranks 3,full --targets attention,mlp --match-params "${GRID[@]}" --name study_best_lr
         publish study_best_lr ;;
      3) "${RL[@]}" --ranks 1,full --batch-sizes 16,256 --seeds 1,2,3,4 --name study_batch lora.lr_multiplier=10
         publish study_batch ;;
      4) "${RL[@]}" --ranks 1,full "${GRID[@]}" --lr-points 7 --lr-step 1.5 --seeds 3,4 --name study_short \
           train.steps=60 train.eval_every=10
         publish study_short ;;
      *) echo "unknown part '$p' (1-4)" >&2; exit 2 ;;
    esac
  done
done
