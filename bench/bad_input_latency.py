"""How long each bad input takes to be refused, as a user sees it: one fresh ``rl-lora run`` process per case
of the bad-input corpus (tests/test_bad_input.py), timed from start to exit.

    python bench/bad_input_latency.py            # every case; prints a table and the slowest case

Cases that fail only after the model loads (a reward raising at the first step) are listed apart: their
time is a run's start-up, not a check's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from test_bad_input import CASES  # noqa: E402  (the corpus, with its setup functions)


def time_case(case: object) -> tuple[float, int, str]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        raw, overrides = case.setup(folder)
        recipe = folder / "recipe.yaml"
        recipe.write_text(json.dumps(raw))
        overrides = [o.replace("{t}", str(folder)) for o in overrides]
        env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "PYTHONPATH": str(REPO / "tests"), "RL_LORA_CACHE": str(folder / "cache")}
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "rl_lora.cli", "run", str(recipe), *overrides], env=env,
                              capture_output=True, text=True, cwd=REPO)
        seconds = time.perf_counter() - started
        line = next((x for x in done.stderr.splitlines() if x.startswith("rl-lora: error:")), "")
        return seconds, done.returncode, line


def main() -> None:
    rows = []
    for case in CASES:
        if any(getattr(m, "name", "") == "skipif" and m.args and m.args[0] for m in case.marks):
            continue  # skipped here as in the tests (e.g. permission cases as root)
        seconds, code, line = time_case(case)
        rows.append((case.id, case.early, seconds, code))
        print(f"{case.id:40s} {'early' if case.early else 'after load':10s} {seconds:6.2f} s  exit {code}  "
              f"{line[:90]}", flush=True)
    early = [r for r in rows if r[1]]
    slowest = max(early, key=lambda r: r[2])
    print(f"\n{len(early)} early cases: slowest {slowest[0]} {slowest[2]:.2f} s; "
          f"median {sorted(r[2] for r in early)[len(early) // 2]:.2f} s")


if __name__ == "__main__":
    main()
