"""Run the default recipe over seeds x thread counts x CPU kernel settings and check every run's band.

The default recipe's outcome must not depend on the machine: every run gains at least ``--min-gain``
held-out points and falls back at most ``--max-drop`` points between its best evaluation and its last.
Each run is a fresh ``rl-lora run`` subprocess with its own environment: ``ATEN_CPU_CAPABILITY`` forces
the kernels torch would pick on another CPU (``default``, ``avx2``, ``avx512``; only those this CPU can
run are used), ``OMP_NUM_THREADS`` and ``train.threads`` set the thread count. Runs go one at a time
into a fresh model cache, so the built-in model is the shipped one, not an old local build.

    python bench/default_robustness.py                       # seeds 1-5 x threads 1,2,4 x every kernel
    python bench/default_robustness.py --seeds 1 --threads 2 train.steps=100   # a quick look, with overrides

Writes ``--out`` (JSON rows, rewritten after every run; ``--resume`` keeps finished rows) and a Markdown
table beside it (same name, ``.md``); exits 1 if any run is outside the band.
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
RECIPE = REPO / "recipes" / "grpo_arithmetic.yaml"


def available_kernels() -> list[str]:
    """The ATEN_CPU_CAPABILITY values this CPU runs: 'default' plus every x86 level up to the best."""
    probe = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    best = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    best_name = best.stdout.strip().lower()
    ladder = ["default", "avx2", "avx512"]
    if best_name in ladder:
        return ladder[: ladder.index(best_name) + 1]
    return ["default", best_name]  # another architecture: its own best level (e.g. sve256) and the fallback


def eval_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, held-out accuracy) of every evaluation in the run's metrics.jsonl, step 0 included."""
    curve = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        value = row.get("eval/accuracy", row.get("accuracy"))
        if value is not None:
            curve.append((int(row["step"]), float(value)))
    return curve


def run_one(recipe: Path, seed: int, threads: int, kernel: str, overrides: list[str], cache: Path,
            scratch: Path) -> dict:
    """One ``rl-lora run`` in a subprocess; returns its row (accuracies as fractions, wall time in s)."""
    out = Path(tempfile.mkdtemp(prefix=f"s{seed}-t{threads}-{kernel}-", dir=scratch))
    env = {**os.environ, "ATEN_CPU_CAPABILITY": kernel, "OMP_NUM_THREADS": str(threads),
           "RL_LORA_CACHE": str(cache), "WANDB_MODE": "disabled"}
    command = [sys.executable, "-m", "rl_lora.cli", "run", str(recipe), "logging.wandb=false",
               "logging.progress=false", f"logging.output_dir={out}", f"train.seed={seed}",
               f"train.threads={threads}", *overrides]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"run seed={seed} threads={threads} kernel={kernel} failed:\n{done.stderr[-3000:]}")
    run_dir = next(p for p in out.iterdir() if (p / "summary.json").is_file())
    summary = json.loads((run_dir / "summary.json").read_text())
    curve = eval_curve(run_dir)
    best_step, best = max(curve, key=lambda point: point[1])
    start, end = summary["start_accuracy"], summary["final_accuracy"]
    return {"seed": seed, "threads": threads, "kernel": kernel, "start": start, "best": best,
            "best_step": best_step, "end": end, "gain": end - start, "drop": best - end,
            "wall_s": round(wall, 1), "curve": curve, "run_dir": str(run_dir)}


def in_band(row: dict, min_gain: float, max_drop: float) -> bool:
    return row["gain"] * 100 >= min_gain and row["drop"] * 100 <= max_drop


def table(rows: list[dict], min_gain: float, max_drop: float) -> str:
    """Markdown: one line per run, then min-max lines."""
    lines = ["| seed | threads | kernel | start | best (step) | end | gain (points) | best-to-end drop | wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        flag = "" if in_band(r, min_gain, max_drop) else " **out of band**"
        lines.append(f"| {r['seed']} | {r['threads']} | {r['kernel']} | {r['start']:.3f} | {r['best']:.3f} "
                     f"({r['best_step']}) | {r['end']:.3f} | {100 * r['gain']:+.1f}{flag} | "
                     f"{100 * r['drop']:.1f} | {r['wall_s']:.0f} |")
    lines.append("")
    for key, label, scale, fmt in [("start", "start accuracy", 1, ".3f"), ("end", "end accuracy", 1, ".3f"),
                                   ("gain", "gain (points)", 100, "+.1f"), ("drop", "best-to-end drop (points)",
                                   100, ".1f"), ("wall_s", "wall time (s)", 1, ".0f")]:
        values = [scale * r[key] for r in rows]
        lines.append(f"- {label}: min {min(values):{fmt}}, max {max(values):{fmt}}")
    inside = sum(in_band(r, min_gain, max_drop) for r in rows)
    lines.append(f"- in band (gain >= +{min_gain:g} points, drop <= {max_drop:g} points): {inside} of {len(rows)}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="recipe overrides (key=value), applied to every run")
    parser.add_argument("--recipe", type=Path, default=RECIPE)
    parser.add_argument("--seeds", default="1,2,3,4,5")
    parser.add_argument("--threads", default="1,2,4")
    parser.add_argument("--kernels", default=None, help="comma-separated; default: every level this CPU runs")
    parser.add_argument("--min-gain", type=float, default=25.0, help="held-out points")
    parser.add_argument("--max-drop", type=float, default=5.0, help="held-out points, best evaluation to last")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "default_robustness.json")
    parser.add_argument("--resume", action="store_true", help="keep the rows --out already holds")
    parser.add_argument("--cache", type=Path, default=None, help="model cache (default: a fresh one)")
    args = parser.parse_args()

    kernels = args.kernels.split(",") if args.kernels else available_kernels()
    plan = [(int(s), int(t), k) for k in kernels for t in args.threads.split(",") for s in args.seeds.split(",")]
    rows: list[dict] = []
    if args.resume and args.out.is_file():
        saved = json.loads(args.out.read_text())
        if saved["recipe"] == str(args.recipe) and saved["overrides"] == args.overrides:
            rows = saved["rows"]
    done = {(r["seed"], r["threads"], r["kernel"]) for r in rows}
    scratch = Path(tempfile.mkdtemp(prefix="default-robustness-"))
    print(f"kernels {kernels}; {len(plan) - len(done)} runs to go; run folders under {scratch}", flush=True)
    for seed, threads, kernel in plan:
        if (seed, threads, kernel) in done:
            continue
        row = run_one(args.recipe, seed, threads, kernel, args.overrides, args.cache or scratch / "cache", scratch)
        rows.append(row)
        print(f"seed {seed} threads {threads} {kernel:8s} start {row['start']:.3f} best {row['best']:.3f} "
              f"(step {row['best_step']}) end {row['end']:.3f} gain {100 * row['gain']:+.1f} "
              f"drop {100 * row['drop']:.1f} wall {row['wall_s']:.0f} s", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"recipe": str(args.recipe), "overrides": args.overrides, "rows": rows},
                                       indent=1))
    text = table(rows, args.min_gain, args.max_drop)
    args.out.with_suffix(".md").write_text(text + "\n")
    print(text)
    return 0 if all(in_band(r, args.min_gain, args.max_drop) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
