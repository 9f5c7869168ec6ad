"""Seconds from ``rl-lora run`` to the first training step, as a user's first run sees it (empty model cache).

    python bench/first_step_time.py recipes/grpo_sums_smollm2.yaml      # prints one line per repeat

Each repeat is a fresh process with a fresh ``RL_LORA_CACHE`` (so a GGUF policy is read and dequantized
again), timed until the run's metrics.jsonl holds its first training record; the run is then stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def first_step_seconds(recipe: Path, overrides: list[str], timeout: float) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "runs"
        env = {**os.environ, "RL_LORA_CACHE": str(Path(tmp) / "cache"), "WANDB_MODE": "disabled"}
        command = [sys.executable, "-m", "rl_lora.cli", "run", str(recipe), "logging.wandb=false",
                   "logging.progress=false", f"logging.output_dir={out}", *overrides]
        started = time.perf_counter()
        proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        try:
            while time.perf_counter() - started < timeout:
                for metrics in out.glob("*/metrics.jsonl"):
                    lines = metrics.read_text().splitlines()
                    if any("loss" in json.loads(x) for x in lines if x.strip()):
                        return time.perf_counter() - started
                if proc.poll() is not None:
                    raise RuntimeError(f"the run ended before a training step:\n{proc.stderr.read()[-2000:]}")
                time.sleep(0.2)
            raise TimeoutError(f"no training step within {timeout:.0f} s")
        finally:
            proc.kill()
            proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args()
    for i in range(args.repeats):
        seconds = first_step_seconds(args.recipe, args.overrides, args.timeout)
        print(f"repeat {i + 1}: {seconds:.1f} s from command to the first training step", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
