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
#      short-run step);
#   5. adapter types (docs/adapters.md): full, LoRA r16 and r1, DoRA r1, VeRA r256, TinyLoRA at PEFT's default
#      (1,792 parameters here) and tied (64), each over its own grid on selection seeds 1,2, then seeds 3-6 at
#      each best LR. Full, r16 and r1 get 3 LRs around experiment 1's best; the other types 4-5 LRs (2x apart)
#      placed where nothing measured says their best lies: DoRA LoRA's range, VeRA and TinyLoRA higher (the
#      published folder was swept in two steps, manifests/ keeps both: VeRA's best sat at its grid's top and
#      TinyLoRA's at its bottom, so a second sweep into the folder added VeRA 3.2e-2, 6.4e-2 and TinyLoRA
#      2.5e-4, 5e-4; the grids below are the union, and rerun they give the same runs);
#   6. the regime test (claim 1): ranks 1, 4 and full at three episode budgets (75, 300 and 900 steps of 64:
#      4,800, 19,200 and 57,600 episodes) with the study's settings (constant LR, mean-centred advantages:
#      train.lr_scheduler=constant grpo.scale_rewards=none), each over its LR grid on selection seeds 1,2, then
#      seeds 3-6 at its best; bench/regime_report.py puts the three together (gap against trainable parameters
#      per episode-bit). 75 and 300 steps: 5-LR grids (full 2.5e-5..4e-4, r1 6.25e-5..1e-3, r4 1.25e-4..2e-3;
#      a first try with the top three points put every best at the low edge at 300 steps: the constant LR moves
#      the optimum down). 900 steps: 3-LR grids a step below 300 steps' bests (which halved from 75 to 300
#      steps), topped by those bests: full 1.25e-5..5e-5, r1 and r4 6.25e-5..2.5e-4; full's and r1's bests sat
#      at their grids' top, so a second sweep into the folder added full 1e-4 and r1 5e-4 (manifests/ keeps
#      both; the grids below are the union, and rerun they give the same runs);
#   7. the batch test redone (claim 3): ranks 1, 16 and full at batch 16 (1,200 steps) and 256 (75 steps), the
#      same 19,200 episodes, each (method, batch size) over its own 3-LR grid on seeds 1,2, then seeds 3-6: two
#      sweeps into one folder, one per batch size, each grid (2x steps) centred where the square-root rule
#      (LR x sqrt(batch / 64)) moves part 1's best at batch 64 (full 2e-4, r1 5e-4, r16 1e-3): batch 16 full
#      5e-5..2e-4, r1 1.25e-4..5e-4, r16 2.5e-4..1e-3; batch 256 full 2e-4..8e-4, r1 5e-4..2e-3, r16 1e-3..4e-3.
#      Four LoRA bests sat at a grid edge, so a second sweep per batch size into the folder added a step: batch 16
#      r1 1e-3 and r16 2e-3 (both at the top), batch 256 r1 4e-3 (top) and r16 5e-4 (bottom); rank 1's best then
#      sat at the new top at both sizes, and a third sweep added r1 2e-3 (batch 16) and 8e-3 (256). The grids
#      below are the union, and rerun they give the same runs.
#   8. the kernel recheck of parts 6 and 7: each arm's confirmation (seeds 3-6, one selection seed) at its
#      AVX2 best LR again under ATEN_CPU_CAPABILITY=default, as study_*_default_kernels did for parts 1 and 5
#      (about 45 min on 2 cores).
#   9. the AVX-512 recheck of parts 1, 5, 6 and 7: each arm's confirmation (seeds 3-6, one selection seed) at its
#      AVX2 best LR under ATEN_CPU_CAPABILITY=avx512, into study_*_avx512; refused on a CPU without AVX-512
#      (torch would quietly run its best kernels instead). About 55 min on 2 cores with AVX-512.
#
# Usage: bash bench/study_sweeps.sh [1|2|3|4|5|6|7|8|9 ...]   (default: all; about four hours on 2 CPU cores)
# Reports land in sweeps/study_*/report.md and are copied to docs/experiments/. PYTHON picks the interpreter
# (default: python on PATH, e.g. the activated .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
RL=("${PYTHON:-python}" -m rl_lora.cli sweep recipes/grpo_arithmetic.yaml logging.wandb=false --output-dir sweeps --jobs 2)
GRID=(--lrs auto --selection-seeds 1,2 --seeds 3,4,5,6)

publish() {  # copy a sweep's report, plots and records (runs.csv, manifests, LR choices, failures) into docs/experiments/<name>/
  mkdir -p "docs/experiments/$1"
  cp "sweeps/$1"/report.md "sweeps/$1"/*.png "sweeps/$1"/sweep.json "sweeps/$1"/runs.csv "docs/experiments/$1/"
  cp -r "sweeps/$1"/manifests "docs/experiments/$1/"
  for f in selection.json failures.jsonl; do
    [ -f "sweeps/$1/$f" ] && cp "sweeps/$1/$f" "docs/experiments/$1/"
  done
  return 0
}

for part in "${@:-1 2 3 4 5 6 7 8}"; do
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
      5) "${RL[@]}" --adapters full,lora-r16,lora-r1,dora-r1,vera-r256,tinylora,tinylora-tied \
           --lrs "full=1e-4,2e-4,4e-4;r16=5e-4,1e-3,2e-3;r1=2.5e-4,5e-4,1e-3;dora=2.5e-4,5e-4,1e-3,2e-3;vera=1e-3,2e-3,4e-3,8e-3,1.6e-2,3.2e-2,6.4e-2;tinylora-r2=2.5e-4,5e-4,1e-3,2e-3,4e-3,8e-3,1.6e-2;tinylora-r2-weight_tying1.0=2e-3,4e-3,8e-3,1.6e-2,3.2e-2" \
           --selection-seeds 1,2 --seeds 3,4,5,6 --name study_adapters
         publish study_adapters ;;
      6) for steps in 75 300 900; do
           lrs="full=2.5e-5,5e-5,1e-4,2e-4,4e-4;r1=6.25e-5,1.25e-4,2.5e-4,5e-4,1e-3;r4=1.25e-4,2.5e-4,5e-4,1e-3,2e-3"
           [ "$steps" = 900 ] && lrs="full=1.25e-5,2.5e-5,5e-5,1e-4;r1=6.25e-5,1.25e-4,2.5e-4,5e-4;r4=6.25e-5,1.25e-4,2.5e-4"
           "${RL[@]}" --ranks 1,4,full --lrs "$lrs" \
             --selection-seeds 1,2 --seeds 3,4,5,6 --name "study_regime_e$((steps * 64))" \
             train.lr_scheduler=constant grpo.scale_rewards=none train.steps=$steps \
             train.eval_every=$((steps / 6))
           publish "study_regime_e$((steps * 64))"
         done
         "${PYTHON:-python}" bench/regime_report.py sweeps docs/experiments/study_regime ;;
      7) for batch in 16 256; do
           lrs="full=5e-5,1e-4,2e-4;r1=1.25e-4,2.5e-4,5e-4,1e-3,2e-3;r16=2.5e-4,5e-4,1e-3,2e-3"
           [ "$batch" = 256 ] && lrs="full=2e-4,4e-4,8e-4;r1=5e-4,1e-3,2e-3,4e-3,8e-3;r16=5e-4,1e-3,2e-3,4e-3"
           "${RL[@]}" --ranks 1,16,full --batch-sizes $batch --lrs "$lrs" \
             --selection-seeds 1,2 --seeds 3,4,5,6 --name study_batch_lr
         done
         publish study_batch_lr ;;
      8) for pair in "75 full=1e-4;r1=5e-4;r4=1e-3" "300 full=5e-5;r1=2.5e-4;r4=2.5e-4" \
                     "900 full=5e-5;r1=2.5e-4;r4=1.25e-4"; do
           steps=${pair%% *}
           ATEN_CPU_CAPABILITY=default "${RL[@]}" --ranks 1,4,full --lrs "${pair#* }" --selection-seeds 1 \
             --seeds 3,4,5,6 --name "study_regime_e$((steps * 64))_default_kernels" train.lr_scheduler=constant \
             grpo.scale_rewards=none train.steps=$steps train.eval_every=$((steps / 6))
           publish "study_regime_e$((steps * 64))_default_kernels"
         done
         for pair in "16 full=1e-4;r1=1e-3;r16=1e-3" "256 full=4e-4;r1=4e-3;r16=1e-3"; do
           ATEN_CPU_CAPABILITY=default "${RL[@]}" --ranks 1,16,full --batch-sizes "${pair%% *}" --lrs "${pair#* }" \
             --selection-seeds 1 --seeds 3,4,5,6 --name study_batch_lr_default_kernels
         done
         publish study_batch_lr_default_kernels ;;
      9) ATEN_CPU_CAPABILITY=avx512 "${PYTHON:-python}" -c "import sys, torch
sys.exit(0 if torch.backends.cpu.get_cpu_capability() == 'AVX512' else 'part 9 needs a CPU with AVX-512')"
         export ATEN_CPU_CAPABILITY=avx512
         "${RL[@]}" --ranks 1,16,full --lrs "full=2e-4;r1=5e-4;r16=1e-3" --selection-seeds 1 --seeds 3,4,5,6 \
           --name study_best_lr_avx512
         publish study_best_lr_avx512
         "${RL[@]}" --adapters full,lora-r16,lora-r1,dora-r1,vera-r256,tinylora,tinylora-tied \
           --lrs "full=2e-4;r16=1e-3;r1=5e-4;dora=1e-3;vera=3.2e-2;tinylora-r2=5e-4;tinylora-r2-weight_tying1.0=8e-3" \
           --selection-seeds 1 --seeds 3,4,5,6 --name study_adapters_avx512
         publish study_adapters_avx512
         for pair in "75 full=1e-4;r1=5e-4;r4=1e-3" "300 full=5e-5;r1=2.5e-4;r4=2.5e-4" \
                     "900 full=5e-5;r1=2.5e-4;r4=1.25e-4"; do
           steps=${pair%% *}
           "${RL[@]}" --ranks 1,4,full --lrs "${pair#* }" --selection-seeds 1 --seeds 3,4,5,6 \
             --name "study_regime_e$((steps * 64))_avx512" train.lr_scheduler=constant grpo.scale_rewards=none \
             train.steps=$steps train.eval_every=$((steps / 6))
           publish "study_regime_e$((steps * 64))_avx512"
         done
         for pair in "16 full=1e-4;r1=1e-3;r16=1e-3" "256 full=4e-4;r1=4e-3;r16=1e-3"; do
           "${RL[@]}" --ranks 1,16,full --batch-sizes "${pair%% *}" --lrs "${pair#* }" \
             --selection-seeds 1 --seeds 3,4,5,6 --name study_batch_lr_avx512
         done
         publish study_batch_lr_avx512
         unset ATEN_CPU_CAPABILITY ;;
      *) echo "unknown part '$p' (1-9)" >&2; exit 2 ;;
    esac
  done
done
