"""Performance benchmark: rl-lora against plain TRL, LoRA ranks against full-parameter, side by side.

    python bench/run.py                       # CPU default: a ~28M-parameter Qwen2 shape, GRPO
    python bench/run.py --shape qwen2.5-1.5b  # GPU: Qwen2.5-1.5B's shape (random init)
    python bench/run.py --shape tiny --steps 3 --repeats 1   # a smoke test

Each measurement runs in its own process (peak memory is a per-process high-water mark), in an
interleaved order repeated ``--repeats`` times, so that slow drift of a shared machine hits every
configuration alike; the figure reported is the median over repeats of each process's median step
time (the first ``--skip`` steps of a process are warm-up and left out). Models are random-init at
real shapes: speed and memory do not depend on what the weights know.

Measured:
- GRPO step time and peak memory: full-parameter and LoRA ranks, through rl-lora and through plain
  TRL (GRPOTrainer with the same GRPOConfig and LoraConfig), to show the toolkit's overhead;
- rollout throughput: generated tokens/s of the plain model, of the LoRA model with unmerged adapters,
  and of the LoRA model with adapters folded into the weights (rl_lora/rollout.py).

Writes ``--out`` (JSON) and prints a markdown table.
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

SHAPES = {
    # ENVIRONMENT's plain-TRL CPU anchor used a 28.2M-parameter Qwen2 shape; this is of that size.
    "cpu-28m": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                    num_key_value_heads=2, vocab_size=8192),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128),
}


def build_model_folder(shape: str, folder: Path) -> None:
    """A random-init Qwen2 of the given shape with the built-in character tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rl_lora.models.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    cfg = Qwen2Config(**SHAPES[shape], max_position_embeddings=256, tie_word_embeddings=False,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)


def _recipe(args: argparse.Namespace, model_dir: Path, rank: str, out: Path) -> dict:
    return {
        "name": "bench", "model": {"policy": str(model_dir)}, "lora": {"rank": rank if rank == "full" else int(rank)},
        "grpo": {"num_generations": args.generations, "max_completion_length": args.completion_tokens,
                 "merge_rollouts": not args.unmerged},
        "reward": {"functions": [{"name": "bench_rewards:spread"}]},
        "data": {"eval_size": 8},
        "train": {"steps": args.steps, "batch_size": args.batch, "lr": 1e-5, "eval_every": 10_000},
        "logging": {"output_dir": str(out), "wandb": False, "progress": False},
    }


def worker_grpo(args: argparse.Namespace) -> dict:
    """One process: GRPO for ``args.steps`` steps, through rl-lora or plain TRL; prints JSON."""
    import torch

    from rl_lora.config import validate
    from rl_lora.memory import peak_memory

    step_times: list[float] = []
    if args.path == "rl-lora":
        from rl_lora.runner import prepare_run

        run = prepare_run(validate(_recipe(args, Path(args.model_dir), args.rank, Path(args.tmp))))
        trainer = run.trainer
    else:
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import GRPOConfig, GRPOTrainer

        from rl_lora.config import DataSpec
        from rl_lora.tasks import arithmetic

        tok = AutoTokenizer.from_pretrained(args.model_dir)
        model = AutoModelForCausalLM.from_pretrained(args.model_dir)
        train, _ = arithmetic.split(DataSpec(eval_size=8))
        peft = None if args.rank == "full" else LoraConfig(r=int(args.rank), lora_alpha=32, target_modules="all-linear")
        cfg = GRPOConfig(
            output_dir=args.tmp, use_cpu=not torch.cuda.is_available(), bf16=False, gradient_checkpointing=False,
            learning_rate=1e-5, per_device_train_batch_size=args.batch, num_generations=args.generations,
            max_completion_length=args.completion_tokens, max_steps=args.steps, logging_steps=1, report_to="none",
            save_strategy="no", disable_tqdm=True, seed=1, lr_scheduler_type="constant",
        )
        from bench_rewards import spread

        trainer = GRPOTrainer(model=model, reward_funcs=spread, args=cfg,
                              train_dataset=arithmetic.to_dataset(train), processing_class=tok, peft_config=peft)

    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_begin(self, *a: object, **k: object) -> None:
            self.t = time.perf_counter()

        def on_step_end(self, *a: object, **k: object) -> None:
            step_times.append(time.perf_counter() - self.t)

    trainer.add_callback(Clock())
    trainer.train()
    kept = step_times[args.skip:] or step_times
    return {"median_step_s": statistics.median(kept), "steps": len(step_times), **peak_memory()}


def worker_rollout(args: argparse.Namespace) -> dict:
    """Generated tokens/s: plain model, LoRA unmerged, LoRA merged (same prompts, greedy, fixed length)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rl_lora.rollout import merged_adapters

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(args.model_dir).to(device).eval()
    prompts = tok([f"{a}+{a + 7}=" for a in range(10, 10 + args.batch)], return_tensors="pt", padding=True).to(device)
    new = args.completion_tokens * 4

    def rate(m: torch.nn.Module) -> float:
        times = []
        for _ in range(args.repeats_inner):
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.no_grad():
                m.generate(**prompts, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                           pad_token_id=tok.pad_token_id)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return args.batch * new / statistics.median(times[1:] or times)

    plain = rate(model)
    lora = get_peft_model(model, LoraConfig(r=int(args.rank), lora_alpha=32, target_modules="all-linear")).eval()
    unmerged = rate(lora)
    with merged_adapters(lora):
        merged = rate(lora)
    return {"plain_tok_s": plain, "lora_unmerged_tok_s": unmerged, "lora_merged_tok_s": merged}


def _spawn(args: argparse.Namespace, extra: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "WANDB_MODE": "disabled"}
    cmd = [sys.executable, __file__, "--worker", *extra, "--model-dir", args.model_dir, "--steps", str(args.steps),
           "--batch", str(args.batch), "--generations", str(args.generations), "--skip", str(args.skip),
           "--completion-tokens", str(args.completion_tokens)]
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([*cmd, "--tmp", tmp], capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"bench worker {extra} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main_driver(args: argparse.Namespace) -> None:
    import torch

    ranks = args.ranks.split(",")
    configs = [(path, rank) for rank in ranks for path in ("rl-lora", "trl")]
    results: dict[str, list[dict]] = {f"{p}|{r}": [] for p, r in configs}
    rollouts: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        args.model_dir = str(Path(tmp) / "model")
        build_model_folder(args.shape, Path(args.model_dir))
        for rep in range(args.repeats):
            for path, rank in configs:
                print(f"[{rep + 1}/{args.repeats}] grpo {path} rank={rank}", file=sys.stderr, flush=True)
                results[f"{path}|{rank}"].append(_spawn(args, ["--task", "grpo", "--path", path, "--rank", rank]))
            print(f"[{rep + 1}/{args.repeats}] rollout", file=sys.stderr, flush=True)
            rollouts.append(_spawn(args, ["--task", "rollout", "--rank", "1", "--path", "none"]))

    def med(key: str, field: str) -> float:
        return statistics.median(r[field] for r in results[key])

    memory_field = "cuda_max_allocated_bytes" if torch.cuda.is_available() else "peak_rss_bytes"
    rows = []
    for rank in ranks:
        ours, trl = f"rl-lora|{rank}", f"trl|{rank}"
        rows.append({
            "rank": rank, "rl_lora_step_s": med(ours, "median_step_s"), "trl_step_s": med(trl, "median_step_s"),
            "overhead_ratio": med(ours, "median_step_s") / med(trl, "median_step_s"),
            "rl_lora_peak_bytes": med(ours, memory_field), "trl_peak_bytes": med(trl, memory_field),
        })
    full = next((r for r in rows if r["rank"] == "full"), None)
    for r in rows:
        r["step_vs_full"] = r["rl_lora_step_s"] / full["rl_lora_step_s"] if full else None
        r["memory_vs_full"] = r["rl_lora_peak_bytes"] / full["rl_lora_peak_bytes"] if full else None
    roll = {k: statistics.median(r[k] for r in rollouts) for k in rollouts[0]}
    roll["merged_vs_plain"] = roll["lora_merged_tok_s"] / roll["plain_tok_s"]
    roll["unmerged_vs_plain"] = roll["lora_unmerged_tok_s"] / roll["plain_tok_s"]
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.platform(), "cpus": os.cpu_count(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "memory_field": memory_field,
        "versions": {p: version(p) for p in ("torch", "transformers", "trl", "peft")},
        "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "model_dir")},
        "grpo": rows, "rollout": roll, "raw": {"grpo": results, "rollout": rollouts},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(markdown(report))


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def markdown(report: dict) -> str:
    unit = "CUDA max allocated" if report["memory_field"].startswith("cuda") else "peak RSS"
    lines = [
        f"GRPO, shape `{report['settings']['shape']}`, {report['settings']['batch']} completions x "
        f"{report['settings']['completion_tokens']} tokens per step, median over {report['settings']['repeats']} "
        f"interleaved repeats ({report['device']}, {report['cpus']} CPUs, {report['date']})",
        "",
        f"| rank | rl-lora step (s) | plain TRL step (s) | rl-lora / TRL | step vs full | {unit} (GiB) "
        "| memory vs full |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["grpo"]:
        lines.append(
            f"| {r['rank']} | {r['rl_lora_step_s']:.3f} | {r['trl_step_s']:.3f} | {r['overhead_ratio']:.3f} | "
            f"{_ratio(r['step_vs_full'])} | {r['rl_lora_peak_bytes'] / 2**30:.2f} | {_ratio(r['memory_vs_full'])} |"
        )
    ro = report["rollout"]
    lines += [
        "",
        "| rollout (rank 1, greedy) | tokens/s | vs plain model |",
        "|---|---|---|",
        f"| plain model | {ro['plain_tok_s']:.0f} | 1.000 |",
        f"| LoRA, adapters unmerged | {ro['lora_unmerged_tok_s']:.0f} | {ro['unmerged_vs_plain']:.3f} |",
        f"| LoRA, merged for rollout | {ro['lora_merged_tok_s']:.0f} | {ro['merged_vs_plain']:.3f} |",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default=None)
    p.add_argument("--ranks", default="full,1,16,64")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--skip", type=int, default=2, help="warm-up steps left out of each process's median")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--repeats-inner", type=int, default=4, dest="repeats_inner")
    p.add_argument("--batch", type=int, default=32, help="completions per step")
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--completion-tokens", type=int, default=16, dest="completion_tokens")
    p.add_argument("--unmerged", action="store_true", help="rl-lora rollouts without merging (for comparison)")
    p.add_argument("--out", default="bench/results.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--task", default="grpo", help=argparse.SUPPRESS)
    p.add_argument("--path", default="rl-lora", help=argparse.SUPPRESS)
    p.add_argument("--rank", default="1", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, dest="model_dir", help=argparse.SUPPRESS)
    p.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        result = worker_grpo(args) if args.task == "grpo" else worker_rollout(args)
        print(json.dumps(result))
        return
    if args.shape is None:
        import torch

        args.shape = "qwen2.5-1.5b" if torch.cuda.is_available() else "cpu-28m"
    main_driver(args)


if __name__ == "__main__":
    main()
