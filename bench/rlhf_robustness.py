"""Run the RM -> PPO pipeline over seeds x CPU kernel settings and check that every run gains held-out accuracy.

The shipped RLHF route (recipes/pipelines/rlhf_ppo_arithmetic.yaml) must improve the policy on any machine:
its reward model must pass the pipeline's own bar, and the policy stage must end above its start on the
held-out metric it never optimised. Each run is a fresh ``rl-lora run PIPELINE train.seed=S`` subprocess
(the seed goes to every stage) with ``ATEN_CPU_CAPABILITY`` forcing the kernels torch would pick on another
CPU, and a model cache of its own per kernel setting, so the preference pairs are sampled under that
setting too.

    python bench/rlhf_robustness.py                              # seeds 1-3 x every kernel this CPU runs
    python bench/rlhf_robustness.py --seeds 1 --kernels default  # one run

Writes ``--out`` (JSON rows, rewritten after every run; ``--resume`` keeps finished rows) and a Markdown
table beside it (``.md``); exits 1 if any run ends at or below its start or stops before the policy stage.
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

import yaml
from default_robustness import available_kernels, eval_curve

REPO = Path(__file__).resolve().parent.parent
PIPELINE = REPO / "recipes" / "pipelines" / "rlhf_ppo_arithmetic.yaml"


def kl_figures(run_dir: Path) -> tuple[float, float]:
    """(mean, max) KL to the reference per completion over the second half of a PPO run's steps."""
    kls = [row["kl"] for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
           if "kl" in row and "eval/accuracy" not in row]
    half = kls[len(kls) // 2:]
    return sum(half) / len(half), max(half)


def run_one(pipeline: Path, seed: int, kernel: str, scratch: Path) -> dict:
    """One pipeline run in a subprocess; its row (accuracies as fractions, wall time in s)."""
    out = Path(tempfile.mkdtemp(prefix=f"s{seed}-{kernel}-", dir=scratch))
    raw = yaml.safe_load(pipeline.read_text())  # the same stages, writing under ``out``
    raw["output_dir"] = str(out)
    for stage in raw["stages"]:
        stage["recipe"] = str((pipeline.parent / stage["recipe"]).resolve())
    local = out / pipeline.name
    local.write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {**os.environ, "ATEN_CPU_CAPABILITY": kernel, "OMP_NUM_THREADS": "1",
           "RL_LORA_CACHE": str(scratch / f"cache-{kernel}"), "WANDB_MODE": "disabled"}
    command = [sys.executable, "-m", "rl_lora.cli", "run", str(local), f"train.seed={seed}",
               "logging.wandb=false", "logging.progress=false"]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    folder = next((p for p in out.iterdir() if (p / "pipeline.json").is_file()), None)
    if folder is None:
        raise RuntimeError(f"pipeline seed={seed} kernel={kernel} made no folder:\n{done.stderr[-3000:]}")
    stages = {s["stage"]: s for s in json.loads((folder / "pipeline.json").read_text())["stages"]}
    rm = stages["reward_model"]
    row = {"seed": seed, "kernel": kernel, "rm_start": rm["start_pairwise_accuracy"],
           "rm_end": rm["final_pairwise_accuracy"], "rm_calibration": rm.get("final_calibration_error"),
           "policy_ran": "policy" in stages, "wall_s": round(wall, 1), "folder": str(folder)}
    if "policy" in stages:
        policy = stages["policy"]
        curve = eval_curve(Path(policy["run_dir"]))
        best_step, best = max(curve, key=lambda point: point[1])
        kl_mean, kl_max = kl_figures(Path(policy["run_dir"]))
        row |= {"start": policy["start_accuracy"], "best": best, "best_step": best_step,
                "end": policy["final_accuracy"], "gain": policy["final_accuracy"] - policy["start_accuracy"],
                "reward_end": policy.get("final_reward"), "kl_mean": kl_mean, "kl_max": kl_max,
                "events": [f"{e['kind']}@{e['step']}" for e in policy.get("overoptimization") or []],
                "curve": curve}
    elif done.returncode == 0:
        raise RuntimeError(f"pipeline seed={seed} kernel={kernel} ended without its policy stage")
    return row


def passed(row: dict) -> bool:
    return row["policy_ran"] and row["gain"] > 0


def table(rows: list[dict]) -> str:
    """Markdown: one line per run, then min-max lines."""
    lines = ["| seed | kernel | RM pairwise acc. | policy: start | best (step) | end | gain (points) | "
             "KL/completion, 2nd half mean (max) | over-optimization reported | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rm = f"{r['rm_start']:.3f} -> {r['rm_end']:.3f}"
        if not r["policy_ran"]:
            lines.append(f"| {r['seed']} | {r['kernel']} | {rm} | stopped before the policy stage | | | "
                         f"**failed** | | | {r['wall_s']:.0f} |")
            continue
        flag = "" if passed(r) else " **failed**"
        lines.append(f"| {r['seed']} | {r['kernel']} | {rm} | {r['start']:.3f} | {r['best']:.3f} ({r['best_step']}) "
                     f"| {r['end']:.3f} | {100 * r['gain']:+.1f}{flag} | {r['kl_mean']:.2f} ({r['kl_max']:.2f}) | "
                     f"{', '.join(r['events']) or 'none'} | {r['wall_s']:.0f} |")
    ran = [r for r in rows if r["policy_ran"]]
    lines.append("")
    lines.append(f"- reward model held-out pairwise accuracy: min {min(r['rm_end'] for r in rows):.3f}, "
                 f"max {max(r['rm_end'] for r in rows):.3f}")
    if ran:
        for key, label, scale, fmt in [("start", "policy start accuracy", 1, ".3f"),
                                       ("end", "policy end accuracy", 1, ".3f"),
                                       ("gain", "gain (points)", 100, "+.1f"), ("wall_s", "wall time (s)", 1, ".0f")]:
            values = [scale * r[key] for r in ran]
            lines.append(f"- {label}: min {min(values):{fmt}}, max {max(values):{fmt}}")
    lines.append(f"- gained held-out accuracy: {sum(map(passed, rows))} of {len(rows)}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", type=Path, default=PIPELINE)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--kernels", default=None, help="comma-separated; default: every level this CPU runs")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "rlhf_robustness.json")
    parser.add_argument("--resume", action="store_true", help="keep the rows --out already holds")
    args = parser.parse_args()

    kernels = args.kernels.split(",") if args.kernels else available_kernels()
    plan = [(int(s), k) for k in kernels for s in args.seeds.split(",")]
    rows: list[dict] = []
    if args.resume and args.out.is_file():
        saved = json.loads(args.out.read_text())
        if saved["pipeline"] == str(args.pipeline):
            rows = saved["rows"]
    done = {(r["seed"], r["kernel"]) for r in rows}
    scratch = Path(tempfile.mkdtemp(prefix="rlhf-robustness-"))
    print(f"kernels {kernels}; {len(plan) - len(done)} runs to go; run folders under {scratch}", flush=True)
    for seed, kernel in plan:
        if (seed, kernel) in done:
            continue
        row = run_one(args.pipeline, seed, kernel, scratch)
        rows.append(row)
        policy = (f"policy {row['start']:.3f} -> {row['end']:.3f} (best {row['best']:.3f} at {row['best_step']})"
                  if row["policy_ran"] else "stopped before the policy stage")
        print(f"seed {seed} {kernel:8s} RM {row['rm_end']:.3f}; {policy}; wall {row['wall_s']:.0f} s", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"pipeline": str(args.pipeline), "rows": rows}, indent=1))
    text = table(rows)
    args.out.with_suffix(".md").write_text(text + "\n")
    print(text)
    return 0 if all(map(passed, rows)) else 1


if __name__ == "__main__":
    sys.exit(main())
