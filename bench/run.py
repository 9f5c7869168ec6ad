"""Performance benchmark: rl-lora against plain TRL, LoRA ranks against full-parameter, side by side.

    python bench/run.py                       # CPU default: a ~28M-parameter Qwen2 shape; GRPO, DPO, PPO
    python bench/run.py --shape qwen2.5-1.5b  # GPU: Qwen2.5-1.5B's shape (random init)
    python bench/run.py --algorithms grpo,dpo --ranks full,1   # a subset
    python bench/run.py --shape tiny --steps 3 --repeats 1     # a smoke test
    python bench/run.py --algorithms ppo --ranks full,1 --no-rollout   # PPO against TRL 1.12's only

Each measurement runs in its own process (bench/workers.py, and bench/trl_ppo_worker.py for TRL 1.12's
PPO; peak memory is a per-process high-water mark), in an interleaved order repeated ``--repeats``
times, so that slow drift of a shared machine hits every configuration alike; rl-lora and TRL swap
turns every repeat. The figure reported is the median over repeats of each process's median step time
(the first ``--skip`` steps of a process are warm-up and left out). Models are random-init at real
shapes: speed and memory do not depend on what the weights know.

Measured, for full-parameter and every LoRA rank in ``--ranks``:
- GRPO and DPO: step time, peak memory, trained tokens/s (and generated tokens/s for GRPO), through
  rl-lora and through plain TRL (GRPOTrainer / DPOTrainer with the settings rl-lora passes them), to
  show the toolkit's overhead. DPO trains on ``--pairs`` synthetic pairs ("a+b=" -> right vs wrong sum);
- PPO: the same figures, one optimizer update per step, against TRL 1.12's experimental PPOTrainer (TRL
  1.16 has none; 1.12 is the last release with one) at the same setting: step time and peak memory
  ratios, and trainable parameters of policy and critic on both sides (TRL 1.12 trains a full value
  model beside a LoRA policy, and keeps a separate reward model). TRL 1.12 runs in a venv of its own,
  bench/.venv-trl112, which the first PPO run builds (bench/trl_ppo_worker.py; ``--no-trl-ppo`` skips it);
- rollout throughput: generated tokens/s of the plain model, of the LoRA model with unmerged adapters,
  and of the LoRA model with adapters folded into the weights (rl_lora/adapters/rollout.py).

Writes ``--out`` (JSON, with every process's raw figures) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

from trl112_venv import VenvError, ensure_venv
from workers import SHAPES, build_model_folder, write_preferences

BENCH_DIR = Path(__file__).resolve().parent
ALGORITHMS = ("grpo", "dpo", "ppo")
WITH_TRL = ("grpo", "dpo")  # the TRL the project pins (1.16); it has no PPO trainer
# The TRL side of each algorithm, as a path name in the raw results: PPO's is TRL 1.12 in its own venv.
TRL_PATH = {"grpo": "trl", "dpo": "trl", "ppo": "trl-1.12"}
# Targets of the benchmark issue (#9), CPU: toolkit step / plain TRL step, rank-1 / full GRPO step,
# merged LoRA rollout tokens/s / plain model's.
MAX_OVERHEAD, MAX_RANK1_VS_FULL, MIN_ROLLOUT_VS_PLAIN = 1.05, 0.85, 0.95
# On a GPU (issue #9): rank-1 GRPO peak memory and step time against full-parameter (fp32 master, AdamW).
GPU_MAX_RANK1_MEMORY_VS_FULL, GPU_MAX_RANK1_STEP_VS_FULL = 0.35, 0.8


def _spawn(args: argparse.Namespace, task: str, path: str, rank: str) -> dict[str, Any]:
    """One worker process; its result line, plus the process's wall time."""
    env = {**os.environ, "PYTHONPATH": str(BENCH_DIR) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "WANDB_MODE": "disabled",
           "TRL_EXPERIMENTAL_SILENCE": "1"}
    shared = ["--rank", rank, "--model-dir", args.model_dir, "--steps", str(args.steps), "--skip", str(args.skip),
              "--batch", str(args.batch), "--generations", str(args.generations),
              "--completion-tokens", str(args.completion_tokens)]
    if path == TRL_PATH["ppo"]:
        cmd = [args.trl_ppo_python, str(BENCH_DIR / "trl_ppo_worker.py"), *shared]
    else:
        cmd = [sys.executable, str(BENCH_DIR / "workers.py"), "--task", task, "--path", path, *shared,
               "--preferences", args.preferences, "--repeats-inner", str(args.repeats_inner),
               *(["--unmerged"] if args.unmerged else [])]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([*cmd, "--tmp", tmp], capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"bench worker {task} {path} rank={rank} failed (exit {proc.returncode}):\n"
                         f"{proc.stderr[-3000:]}")
    lines = proc.stdout.strip().splitlines()
    if not lines:
        raise SystemExit(f"bench worker {task} {path} rank={rank} printed no result line:\n{proc.stderr[-3000:]}")
    return {**json.loads(lines[-1]), "process_wall_s": round(time.perf_counter() - started, 2)}


def schedule(algorithms: list[str], ranks: list[str], repeat: int, trl_ppo: bool = True) -> list[tuple[str, str, str]]:
    """(algorithm, path, rank) in this repeat's order; rl-lora and TRL swap turns every repeat, so neither
    always runs on the machine the other just warmed (or heated). ``trl_ppo``: PPO has its TRL 1.12 side."""
    out = []
    for algorithm in algorithms:
        with_trl = algorithm in WITH_TRL or (algorithm == "ppo" and trl_ppo)
        paths = ["rl-lora", TRL_PATH[algorithm]] if with_trl else ["rl-lora"]
        if repeat % 2:
            paths.reverse()
        out += [(algorithm, path, rank) for rank in ranks for path in paths]
    return out


PARAMETER_FIELDS = ("policy_trainable_params", "critic_trainable_params", "trainable_params",
                    "reference_copy_params", "reward_model_params")  # PPO's workers report them


def _median(runs: list[dict[str, Any]], field: str) -> float | None:
    values = [r[field] for r in runs if r.get(field) is not None]
    return statistics.median(values) if values else None


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _repeat_range(runs: list[dict[str, Any]], against: list[dict[str, Any]]) -> list[float] | None:
    """[min, max] over repeats of the step-time ratio, repeat i against repeat i (neighbours in time)."""
    ratios = [a["median_step_s"] / b["median_step_s"] for a, b in zip(runs, against, strict=False)]
    return [min(ratios), max(ratios)] if ratios else None


def summarise(raw: dict[str, list[dict[str, Any]]], algorithm: str, ranks: list[str], memory_field: str) -> list[dict]:
    """One row per rank: medians over repeats of rl-lora's and TRL's figures, and their ratios."""
    rows = []
    for rank in ranks:
        ours, trl = raw.get(f"{algorithm}|rl-lora|{rank}", []), raw.get(f"{algorithm}|{TRL_PATH[algorithm]}|{rank}", [])
        row: dict[str, Any] = {"rank": rank}
        for prefix, runs in (("rl_lora", ours), ("trl", trl)):
            row[f"{prefix}_step_s"] = _median(runs, "median_step_s")
            row[f"{prefix}_peak_bytes"] = _median(runs, memory_field)
            row[f"{prefix}_trained_tok_s"] = _median(runs, "trained_tokens_per_s")
            row[f"{prefix}_generated_tok_s"] = _median(runs, "generated_tokens_per_s")
        row["trl_gc_collect_s_per_step"] = _median(trl, "gc_collect_s_per_step")  # TRL 1.12's PPO only
        row["rl_lora_train_tflops"] = _median(ours, "train_tflops_per_s")
        row["rl_lora_mfu"] = _median(ours, "mfu")
        row["overhead_ratio"] = _div(row["rl_lora_step_s"], row["trl_step_s"])
        row["overhead_range"] = _repeat_range(ours, trl)
        row["memory_vs_trl"] = _div(row["rl_lora_peak_bytes"], row["trl_peak_bytes"])
        # Parameter counts are the same in every repeat: the first process's.
        for prefix, runs in (("rl_lora", ours), ("trl", trl)):
            for field in PARAMETER_FIELDS:
                row[f"{prefix}_{field}"] = runs[0].get(field) if runs else None
        rows.append(row)
    full = next((r for r in rows if r["rank"] == "full"), None)
    full_runs = raw.get(f"{algorithm}|rl-lora|full", [])
    for r in rows:
        r["step_vs_full"] = _div(r["rl_lora_step_s"], full["rl_lora_step_s"]) if full else None
        # Repeat i of this rank against repeat i of full-parameter (neighbours in time): the spread of
        # the ratio across repeats, to read the median against.
        runs = raw.get(f"{algorithm}|rl-lora|{r['rank']}", [])
        r["step_vs_full_range"] = _repeat_range(runs, full_runs) if full else None
        r["memory_vs_full"] = _div(r["rl_lora_peak_bytes"], full["rl_lora_peak_bytes"]) if full else None
    return rows


def main_driver(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    started = time.perf_counter()
    algorithms, ranks = args.algorithms.split(","), args.ranks.split(",")
    args.trl_ppo_python = None
    if "ppo" in algorithms and not args.no_trl_ppo:
        try:  # before any measurement: a venv that cannot be built stops the run at once
            args.trl_ppo_python = str(ensure_venv())
        except VenvError as e:
            raise SystemExit(f"bench: TRL 1.12's venv for the PPO anchor: {e} "
                             "(--no-trl-ppo measures rl-lora's PPO alone)") from None
    raw: dict[str, list[dict[str, Any]]] = {}
    rollouts: list[dict[str, Any]] = []
    partial = Path(args.out).with_suffix(".partial.json")
    partial.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        args.model_dir, args.preferences = str(Path(tmp) / "model"), str(Path(tmp) / "preferences.jsonl")
        build_model_folder(args.shape, Path(args.model_dir))
        write_preferences(Path(args.preferences), rows=args.pairs)
        for rep in range(args.repeats):
            for algorithm, path, rank in schedule(algorithms, ranks, rep, trl_ppo=args.trl_ppo_python is not None):
                result = _spawn(args, algorithm, path, rank)
                raw.setdefault(f"{algorithm}|{path}|{rank}", []).append(result)
                # A worker failing late in a long run leaves the figures measured so far here.
                partial.write_text(json.dumps({**raw, "rollout": rollouts}, indent=2))
                print(f"[{rep + 1}/{args.repeats}] {algorithm} {path} rank={rank}: step "
                      f"{result['median_step_s']:.3f} s, process {result['process_wall_s']:.0f} s",
                      file=sys.stderr, flush=True)
            if not args.no_rollout:
                rollouts.append(_spawn(args, "rollout", "none", "1"))
                print(f"[{rep + 1}/{args.repeats}] rollout: process {rollouts[-1]['process_wall_s']:.0f} s",
                      file=sys.stderr, flush=True)

    memory_field = "cuda_max_allocated_bytes" if torch.cuda.is_available() else "peak_rss_bytes"
    roll = None
    if rollouts:
        roll = {k: statistics.median(r[k] for r in rollouts) for k in ("plain_tok_s", "lora_unmerged_tok_s",
                                                                       "lora_merged_tok_s")}
        # Ratios within each process (the variants took turns in it), then their median over repeats.
        for variant, key in (("merged", "lora_merged_tok_s"), ("unmerged", "lora_unmerged_tok_s")):
            ratios = [r[key] / r["plain_tok_s"] for r in rollouts]
            roll[f"{variant}_vs_plain"] = statistics.median(ratios)
            roll[f"{variant}_vs_plain_range"] = [min(ratios), max(ratios)]
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.platform(), "cpus": os.cpu_count(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "memory_field": memory_field,
        "versions": {p: version(p) for p in ("torch", "transformers", "trl", "peft")},
        "trl_ppo_versions": next((r.get("versions") for k, v in raw.items() if k.startswith(f"ppo|{TRL_PATH['ppo']}|")
                                  for r in v), None),
        "settings": {k: v for k, v in vars(args).items() if k not in ("model_dir", "preferences", "trl_ppo_python")},
        **{a: summarise(raw, a, ranks, memory_field) for a in algorithms},
        "rollout": roll, "raw": {**raw, "rollout": rollouts},
        "wall_s": round(time.perf_counter() - started, 1),
    }
    Path(args.out).write_text(json.dumps(report, indent=2))
    partial.unlink(missing_ok=True)
    return report


def _f(value: float | None, spec: str = ".3f") -> str:
    return "—" if value is None else format(value, spec)


def _gib(value: float | None) -> str:
    return "—" if value is None else f"{value / 2**30:.2f}"


def _setting(report: dict[str, Any], algorithm: str) -> str:
    s = report["settings"]
    if algorithm == "grpo":
        return (f"{s['batch']} completions ({s['generations']} per prompt) x {s['completion_tokens']} tokens per step; "
                "plain TRL = GRPOTrainer")
    if algorithm == "dpo":
        return f"{s['batch']} preference pairs per step ({s['pairs']} synthetic pairs); plain TRL = DPOTrainer"
    measured = any(r.get("trl_step_s") is not None for r in report.get("ppo") or [])
    anchor = ("TRL = TRL 1.12's experimental PPOTrainer in its own venv (TRL 1.16 has no PPO)" if measured
              else "rl-lora only (TRL 1.16 has no PPO; TRL 1.12's was not run)")
    return (f"{s['batch']} completions ({s['generations']} per prompt) x {s['completion_tokens']} tokens per step, "
            f"1 epoch, 1 update per step; {anchor}")


def _count(n: int | None) -> str:
    if n is None:
        return "—"
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)


def ppo_anchor_table(report: dict[str, Any]) -> list[str]:
    """PPO against TRL 1.12's PPOTrainer: step and memory ratios, and what each side trains and holds."""
    rows = [r for r in report.get("ppo") or [] if r.get("trl_step_s") is not None]
    if not rows:
        return []
    unit = "CUDA max allocated" if report["memory_field"].startswith("cuda") else "peak RSS"
    lines = [
        "**PPO against TRL 1.12** (bench/trl_ppo_worker.py): TRL 1.12 trains a full value model of the "
        "policy's shape whatever the policy's rank, and scores with a reward model of that shape (rl-lora's "
        "bench: a reward function); both hold a frozen reference copy for full-parameter and use the "
        "adapter-off policy with LoRA. TRL 1.12's step includes two full garbage collections (last column).",
        "",
        f"| rank | step rl-lora / TRL 1.12 (repeats) | {unit} TRL 1.12 (GiB) | {unit} rl-lora / TRL 1.12 "
        "| trainable rl-lora (policy + critic) | trainable TRL 1.12 (policy + critic) "
        "| reference copy rl-lora / TRL 1.12 | TRL 1.12 gc.collect per step (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        spread = r.get("overhead_range")
        step = _f(r["overhead_ratio"]) + (f" ({spread[0]:.2f}-{spread[1]:.2f})" if spread else "")
        sides = {prefix: (f"{_count(r.get(f'{prefix}_trainable_params'))} "
                          f"({_count(r.get(f'{prefix}_policy_trainable_params'))} + "
                          f"{_count(r.get(f'{prefix}_critic_trainable_params'))})") for prefix in ("rl_lora", "trl")}
        refs = " / ".join(_count(r.get(f"{prefix}_reference_copy_params")) for prefix in ("rl_lora", "trl"))
        lines.append(f"| {r['rank']} | {step} | {_gib(r['trl_peak_bytes'])} | {_f(r.get('memory_vs_trl'))} "
                     f"| {sides['rl_lora']} | {sides['trl']} | {refs} | {_f(r.get('trl_gc_collect_s_per_step'))} |")
    return lines


def algorithm_table(report: dict[str, Any], algorithm: str) -> list[str]:
    unit = "CUDA max allocated" if report["memory_field"].startswith("cuda") else "peak RSS"
    rollout = algorithm in ("grpo", "ppo")
    mfu = any(r.get("rl_lora_mfu") is not None for r in report[algorithm])  # known peak: a GPU run
    trl = "TRL 1.12" if algorithm == "ppo" else "TRL"
    lines = [
        f"**{algorithm.upper()}**: {_setting(report, algorithm)}.",
        "",
        f"| rank | rl-lora step (s) | {'plain TRL' if trl == 'TRL' else trl} step (s) | rl-lora / {trl} "
        f"| step vs full | {unit} (GiB) "
        "| memory vs full | trained tok/s |" + (" generated tok/s |" if rollout else "")
        + (" train TFLOP/s | MFU |" if mfu else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if rollout else "") + ("---|---|" if mfu else ""),
    ]
    for r in report[algorithm]:
        lines.append(
            f"| {r['rank']} | {_f(r['rl_lora_step_s'])} | {_f(r['trl_step_s'])} | {_f(r['overhead_ratio'])} | "
            f"{_f(r['step_vs_full'])} | {_gib(r['rl_lora_peak_bytes'])} | {_f(r['memory_vs_full'])} | "
            f"{_f(r['rl_lora_trained_tok_s'], '.0f')} |" + (f" {_f(r['rl_lora_generated_tok_s'], '.0f')} |"
                                                           if rollout else "")
            + (f" {_f(r.get('rl_lora_train_tflops'), '.3g')} | {_f(r.get('rl_lora_mfu'), '.3f')} |" if mfu else "")
        )
    return lines


def targets(report: dict[str, Any]) -> list[str]:
    """The issue's targets (CPU, or GPU on a GPU run) against this run's figures (only those it measured)."""
    lines = ["| target | measured | |", "|---|---|---|"]
    for algorithm in WITH_TRL:
        ratios = [(r["rank"], r["overhead_ratio"]) for r in report.get(algorithm) or [] if r["overhead_ratio"]]
        if ratios:
            worst = max(v for _, v in ratios)
            spreads = {r["rank"]: r.get("overhead_range") for r in report[algorithm]}
            shown = ", ".join(f"{rank} {v:.3f}x" + (f" ({spreads[rank][0]:.2f}-{spreads[rank][1]:.2f})"
                                                     if spreads.get(rank) else "") for rank, v in ratios)
            verdict = "met" if worst <= MAX_OVERHEAD else "missed"
            lines.append(f"| rl-lora {algorithm.upper()} step ≤ {MAX_OVERHEAD}x plain TRL's | {shown} | {verdict} |")
    rank1 = next((r for r in report.get("grpo") or [] if r["rank"] == "1"), None)
    gpu = report["memory_field"].startswith("cuda")
    step_target = GPU_MAX_RANK1_STEP_VS_FULL if gpu else MAX_RANK1_VS_FULL
    if rank1 and rank1["step_vs_full"] is not None:
        verdict = "met" if rank1["step_vs_full"] <= step_target else "missed"
        spread = rank1.get("step_vs_full_range")
        shown = f"{rank1['step_vs_full']:.3f}x" + (f" (repeats {spread[0]:.3f}-{spread[1]:.3f}x)" if spread else "")
        lines.append(f"| rank-1 LoRA GRPO step ≤ {step_target}x full | {shown} | {verdict} |")
    if gpu and rank1 and rank1["memory_vs_full"] is not None:
        verdict = "met" if rank1["memory_vs_full"] <= GPU_MAX_RANK1_MEMORY_VS_FULL else "missed"
        lines.append(f"| rank-1 LoRA GRPO peak memory ≤ {GPU_MAX_RANK1_MEMORY_VS_FULL}x full | "
                     f"{rank1['memory_vs_full']:.3f}x | {verdict} |")
    ro = report.get("rollout")
    if ro:
        verdict = "met" if ro["merged_vs_plain"] >= MIN_ROLLOUT_VS_PLAIN else "missed"
        lines.append(f"| LoRA rollout tokens/s ≥ {MIN_ROLLOUT_VS_PLAIN}x the plain model's | "
                     f"{ro['merged_vs_plain']:.3f}x merged (repeats {ro['merged_vs_plain_range'][0]:.3f}-"
                     f"{ro['merged_vs_plain_range'][1]:.3f}x; {ro['unmerged_vs_plain']:.3f}x unmerged) | {verdict} |")
    return lines if len(lines) > 2 else []


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        f"Shape `{s['shape']}`, median over {s['repeats']} interleaved repeats of each process's median step "
        f"(steps {s['skip'] + 1}-{s['steps']} of {s['steps']}); {report['device']}, {report['cpus']} CPUs, "
        f"{report['date']}; whole run {report['wall_s']:.0f} s",
    ]
    for algorithm in ALGORITHMS:
        if report.get(algorithm):
            lines += ["", *algorithm_table(report, algorithm)]
    anchor = ppo_anchor_table(report)
    if anchor:
        lines += ["", *anchor]
    ro = report.get("rollout")
    if ro:
        lines += [
            "",
            f"| rollout (rank 1, greedy, {s['batch']} prompts x {4 * s['completion_tokens']} new tokens) "
            "| tokens/s | vs plain model |",
            "|---|---|---|",
            f"| plain model | {ro['plain_tok_s']:.0f} | 1.000 |",
            f"| LoRA, adapters unmerged | {ro['lora_unmerged_tok_s']:.0f} | {ro['unmerged_vs_plain']:.3f} |",
            f"| LoRA, merged for rollout (fold and restore included) | {ro['lora_merged_tok_s']:.0f} | "
            f"{ro['merged_vs_plain']:.3f} |",
        ]
    checks = targets(report)
    if checks:
        where = "GPU" if report["memory_field"].startswith("cuda") else "CPU"
        lines += ["", f"Against the {where} targets of issue #9 (set for the default {where} shape):", "", *checks]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default=None,
                   help="model shape (default: qwen2.5-1.5b on a GPU, cpu-28m otherwise)")
    p.add_argument("--algorithms", default=",".join(ALGORITHMS), help="comma-separated, of grpo,dpo,ppo")
    p.add_argument("--ranks", default="full,1,16,64")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--skip", type=int, default=2, help="warm-up steps left out of each process's median")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--repeats-inner", type=int, default=4, dest="repeats_inner",
                   help="timed rounds of the rollout measurement (plain, unmerged, merged in turn; after a warm-up)")
    p.add_argument("--batch", type=int, default=32, help="completions (GRPO, PPO) or pairs (DPO) per step")
    p.add_argument("--generations", type=int, default=8, help="completions per prompt (GRPO, PPO)")
    p.add_argument("--completion-tokens", type=int, default=16, dest="completion_tokens")
    p.add_argument("--pairs", type=int, default=512, help="synthetic DPO preference pairs")
    p.add_argument("--unmerged", action="store_true", help="rl-lora GRPO rollouts without merging (for comparison)")
    p.add_argument("--no-rollout", action="store_true", dest="no_rollout", help="skip the rollout measurement")
    p.add_argument("--no-trl-ppo", action="store_true", dest="no_trl_ppo",
                   help="measure rl-lora's PPO alone (no TRL 1.12 side, no bench/.venv-trl112)")
    p.add_argument("--out", default="bench/results.json")
    args = p.parse_args(argv)
    unknown = sorted(set(args.algorithms.split(",")) - set(ALGORITHMS))
    if unknown:
        p.error(f"--algorithms: unknown {', '.join(unknown)} (choose from {', '.join(ALGORITHMS)})")
    if args.skip >= args.steps:
        p.error(f"--skip {args.skip} must be below --steps {args.steps}: no step would be left to time")
    return args


def main() -> None:
    args = parse_args()
    if args.shape is None:
        import torch

        args.shape = "qwen2.5-1.5b" if torch.cuda.is_available() else "cpu-28m"
    print(markdown(main_driver(args)))


if __name__ == "__main__":
    main()
