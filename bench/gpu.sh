#!/usr/bin/env bash
# The GPU benchmark, for a GPU machine that cannot download anything (the project's lent H200 has torch,
# transformers, accelerate and peft, but no trl, deepspeed, datasets or wandb: shared/ENVIRONMENT.md).
#
#   bash bench/gpu.sh wheels        # here, with the package index: pure-Python wheels -> bench/wheels/ (~6 MB)
#   bash bench/gpu.sh run [ARGS]    # on the GPU machine, repository root, bench/wheels/ carried along:
#                                   # installs what is missing from bench/wheels, then runs bench/run.py
#
# `run` defaults to what fits a 10-minute device call at the Qwen2.5-1.5B shape: GRPO only, full vs
# rank 1, one repeat, 6 steps a process (4 training processes and the rollout test). Extra ARGS go to bench/run.py.
# Output: bench/results_gpu.json and bench/results_gpu.md.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=bench/wheels
# Pure-Python packages rl-lora needs that the GPU machine lacks (pinned as tested here).
# xxhash, pyyaml, msgpack and pydantic-core are binary wheels for this machine's Python (3.11, x86_64):
# a GPU machine on another Python must already have them (the check below installs only what is missing).
PACKAGES=(trl==1.16.0 datasets==5.2.0 dill multiprocess xxhash hjson deepspeed==0.19.8 py-cpuinfo msgpack
          einops pyyaml pydantic pydantic-core annotated-types typing-inspection)

case "${1:-}" in
  wheels)
    rm -rf "$WHEELS" && mkdir -p "$WHEELS"
    for pkg in "${PACKAGES[@]}"; do
      # deepspeed ships an sdist only: pip wheel builds it (pure Python; its ops compile just in time).
      python3 -m pip wheel -q --no-deps --wheel-dir "$WHEELS" "$pkg"
    done
    ls -l "$WHEELS"
    du -sh "$WHEELS"
    ;;
  run)
    shift
    PY=${PYTHON:-python3}
    # Install only what the machine lacks: its own torch/transformers/peft builds stay as they are.
    for pkg in "${PACKAGES[@]}"; do
      name=${pkg%%==*}
      module=${name//-/_}
      case $module in pyyaml) module=yaml ;; py_cpuinfo) module=cpuinfo ;; esac
      if ! "$PY" -c "import $module" 2>/dev/null; then
        "$PY" -m pip install -q --no-deps --no-index --find-links "$WHEELS" "$pkg"
      fi
    done
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
    "$PY" -c "import torch, trl, rl_lora; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'trl', trl.__version__)"
    WANDB_MODE=disabled "$PY" bench/run.py --algorithms grpo --ranks full,1 --repeats 1 --steps 6 \
      --out bench/results_gpu.json "$@" | tee bench/results_gpu.md
    ;;
  *)
    sed -n 2,11p "$0"
    exit 2
    ;;
esac
