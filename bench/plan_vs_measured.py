"""rl-lora plan's estimates against measurements on CPU: activations, and the whole process's peak memory.

1. Activations, without the allocator in the way: the bytes autograd keeps for the backward pass
   (every distinct tensor a ``torch.autograd.graph.saved_tensors_hooks`` pack hook sees that is not a
   parameter) in one forward of 16 sequences x 39 tokens, against ``rl_lora.estimate.plan.activation_bytes``, at
   both shapes below, full and rank-1 LoRA.
2. The whole process: GRPO, DPO and PPO, full and rank 1, at two random-init Llama shapes (25M and 95M
   parameters, the built-in character tokenizer), each run a fresh ``rl-lora run`` subprocess (3 steps of
   16 completions or pairs, completions of up to 32 tokens, one thread, fp32); its ``summary.json`` peak
   RSS against the plan's peak for one device (``Breakdown.peak``) plus the process's own overhead: Python,
   torch, transformers, TRL, tokenizer and data, measured as the peak RSS of the same algorithm on the
   built-in 0.87M-parameter model less that model's own plan. Each run twice: with glibc's allocator as it
   comes, and told to return freed blocks (``ALLOCATORS``), where RSS follows live memory; the tolerance
   is for the latter.

    .venv/bin/python bench/plan_vs_measured.py            # writes bench/plan_vs_measured.json and .md

docs/plan.md's tables are the .md this writes. Whole-process rows outside ``TOLERANCE`` are marked, and
the exit status is 1 if any is.
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rl_lora.config.schema import validate  # noqa: E402
from rl_lora.estimate.plan import (  # noqa: E402
    Workload,
    activation_bytes,
    breakdown,
    model_facts,
    plan_model_config,
    recipe_layout,
)

# How far the whole-process estimate may stray from the peak RSS measured with the returning allocator,
# relative to the measurement.
TOLERANCE = 0.15
# glibc as it comes keeps freed blocks for reuse, so RSS also counts memory no tensor holds any more (LoRA's
# forward frees two output-sized temporaries per adapted linear); told to hand every block of 64 KiB or more
# straight back (mmap'd, unmapped on free), RSS follows live memory, as CUDA's max_memory_allocated does.
ALLOCATORS = {"default": {}, "returning": {"MALLOC_MMAP_THRESHOLD_": "65536"}}
PROBE_SEQUENCES, PROBE_TOKENS = 16, 39  # one GRPO micro-batch here: 16 x (7 prompt + 32 completion tokens)
SHAPES = {  # random-init Llama shapes: (hidden, layers, heads, KV heads, MLP width)
    "25M": (512, 8, 8, 4, 1536),
    "95M": (1024, 8, 16, 4, 3072),
}
ALGORITHMS = ("grpo", "dpo", "ppo")
METHODS: tuple[int | str, ...] = ("full", 1)


def shape_model(hidden: int, layers: int, heads: int, kv_heads: int, mlp: int) -> tuple:
    """(a random-init Llama of this shape, the built-in character tokenizer it uses)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rl_lora.tasks.arithmetic.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, intermediate_size=mlp, vocab_size=len(tokenizer),
                         max_position_embeddings=128, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    return LlamaForCausalLM(config), tokenizer


def save_shape(folder: Path, *shape: int) -> Path:
    """The shape's model and tokenizer saved as a model folder (safetensors)."""
    model, tokenizer = shape_model(*shape)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def saved_activation_bytes(shape: tuple[int, ...], method: int | str) -> int:
    """Bytes autograd keeps for the backward of one forward (and the loss on its logits), parameters excluded."""
    import torch
    from peft import LoraConfig, get_peft_model

    model, _ = shape_model(*shape)
    if method != "full":
        model = get_peft_model(model, LoraConfig(r=int(method), lora_alpha=32, target_modules="all-linear"))
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in parameters:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, model.config.vocab_size, (PROBE_SEQUENCES, PROBE_TOKENS))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids).logits.float().log_softmax(-1).mean()
    return sum(kept.values())


def activation_rows(policies: dict[str, str]) -> list[dict]:
    """Activations: the plan's estimate against the bytes autograd keeps, per shape and method."""
    rows = []
    for name in SHAPES:
        config = validate(recipe("grpo", 1, policies[name], Path(tempfile.gettempdir())))
        facts = model_facts(plan_model_config(config))
        work = Workload(PROBE_SEQUENCES, PROBE_TOKENS, PROBE_TOKENS, 1, 0, 0, 0, 0, False)
        planned = activation_bytes(facts, work, 4, checkpointing=False)
        for method in METHODS:
            kept = int(_child("kept", name, str(method)))
            rows.append({"shape": name, "method": "full" if method == "full" else f"r{method}",
                         "estimate": planned, "kept": kept, "error": planned / kept - 1})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def recipe(algorithm: str, method: int | str, policy: str, out: Path) -> dict:
    """3 steps of 16 completions (or pairs) of up to 32 generated tokens, fp32, one thread, no W&B."""
    raw: dict = {
        "name": f"{algorithm}-{method}", "algorithm": algorithm,
        "model": {"policy": policy, "warmup_steps": 0},
        "lora": {"rank": method},
        "data": {"max_operand": 30, "eval_size": 8},
        "train": {"steps": 3, "batch_size": 16, "lr": 1e-4, "threads": 1, "eval_every": 100},
        "logging": {"output_dir": str(out), "wandb": False, "progress": False},
    }
    if algorithm == "grpo":
        raw["grpo"] = {"num_generations": 4, "max_completion_length": 32}
    if algorithm == "ppo":
        raw["ppo"] = {"samples_per_prompt": 4, "max_completion_length": 32, "epochs": 1, "minibatch_size": 16}
    if algorithm == "dpo":  # the estimate counts pairs at dpo.max_length: "30+30=" with BOS, answer, EOS
        raw["dpo"] = {"max_length": 11}
    return raw


def measure(raw: dict, scratch: Path, cache: Path, allocator: str) -> tuple[int, float]:
    """(peak RSS in bytes, wall seconds) of one ``rl-lora run`` of ``raw`` in a fresh process, with glibc's
    allocator as it comes or (``allocator="returning"``) returning every freed block of 64 KiB or more."""
    path = scratch / f"{raw['name']}-{time.time_ns()}.yaml"
    path.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "RL_LORA_CACHE": str(cache),
           "HF_HUB_OFFLINE": "1", **ALLOCATORS[allocator]}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "rl_lora.cli", "run", str(path), f"logging.run_name={allocator}"],
                          cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{raw['name']} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((Path(raw["logging"]["output_dir"]) / allocator / "summary.json").read_text())
    return int(summary["peak_rss_bytes"]), time.perf_counter() - started


def estimate(raw: dict) -> dict[str, int]:
    """The plan's figures for one device: states, gradients, activations, KV cache and the peak."""
    config = validate(raw)
    facts = model_facts(plan_model_config(config))
    b = breakdown(facts, config, config.lora.rank, recipe_layout(config, facts, 1))
    return {"parameters": facts.parameters, "states": b.states, "gradients": b.gradients,
            "activations": b.activations, "rollout": b.kv_cache + b.merged_copy, "peak": b.peak()}


def _child(*args: str) -> str:
    """Run this script's ``--child`` step in a fresh process and return its last line of output.

    Linux hands a child its parent's resident size at fork as the start of its peak RSS (ru_maxrss), so
    whatever builds a real model happens in a child and this process stays small (~0.45 GB: the imports and
    meta-device builds), under the smallest run it measures.
    """
    proc = subprocess.run([sys.executable, __file__, "--child", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        raise SystemExit(f"--child {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout.strip().splitlines()[-1]


def process_rows(policies: dict[str, str], scratch: Path) -> list[dict]:
    """Whole process: every algorithm and method at every shape, under both allocators, against the plan plus
    the overhead measured on the built-in model under the same allocator."""
    rows = []
    overhead: dict[tuple[str, str], int] = {}
    for algorithm in ALGORITHMS:
        for name, policy in policies.items():
            for method in METHODS if name != "0.87M" else ("full",):
                raw = recipe(algorithm, method, policy, scratch / f"{algorithm}-{name}-{method}")
                planned = estimate(raw)
                row = {"algorithm": algorithm, "method": "full" if method == "full" else f"r{method}",
                       "shape": name, **planned}
                for allocator in ALLOCATORS:
                    measured, seconds = measure(raw, scratch, scratch / "cache", allocator)
                    if name == "0.87M":  # the process's own overhead, for this algorithm and allocator
                        overhead[(algorithm, allocator)] = measured - planned["peak"]
                        continue
                    total = overhead[(algorithm, allocator)] + planned["peak"]
                    row[allocator] = {"overhead": overhead[(algorithm, allocator)], "estimate": total,
                                      "measured": measured, "error": total / measured - 1,
                                      "seconds": round(seconds, 1)}
                if name != "0.87M":
                    rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "plan_vs_measured.json")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)  # a step run in a fresh process
    args = parser.parse_args()
    if args.child:
        step, name, value = args.child
        print(save_shape(Path(value), *SHAPES[name]) if step == "save" else
              saved_activation_bytes(SHAPES[name], value if value == "full" else int(value)))
        return 0
    scratch = Path(tempfile.mkdtemp(prefix="plan-vs-measured-"))
    policies = {"0.87M": "builtin:arithmetic-tiny"}
    policies.update({name: _child("save", name, str(scratch / name)) for name in SHAPES})
    rows = process_rows(policies, scratch)
    activations = activation_rows(policies)
    record = {"tolerance": TOLERANCE, "activations": activations, "rows": rows}
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    text = activation_table(activations) + "\n\n" + table(rows) + "\n"
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 1 if any(abs(r["returning"]["error"]) > TOLERANCE for r in rows) else 0


def activation_table(rows: list[dict]) -> str:
    mib = 2**20
    lines = ["| shape | method | estimate (MiB) | kept by autograd (MiB) | error |", "|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['method']} | {r['estimate'] / mib:,.0f} | {r['kept'] / mib:,.0f} | "
              f"{100 * r['error']:+.1f}% |" for r in rows]
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    mib = 2**20
    lines = ["| algorithm | method | shape | weights + optimizer | gradients | activations | rollout | plan peak | "
             "returning: overhead | estimate | measured | error | default: overhead | estimate | measured | error |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r["algorithm"], r["method"], r["shape"]]
        cells += [f"{r[k] / mib:,.0f}" for k in ("states", "gradients", "activations", "rollout", "peak")]
        for allocator in ("returning", "default"):
            m = r[allocator]
            flag = " (outside)" if allocator == "returning" and abs(m["error"]) > TOLERANCE else ""
            cells += [f"{m[k] / mib:,.0f}" for k in ("overhead", "estimate", "measured")]
            cells.append(f"{100 * m['error']:+.1f}%{flag}")
        lines.append("| " + " | ".join(cells) + " |")
    note = ("MiB. rollout = KV cache + merged-adapter weights; plan peak = weights and optimizer + max(gradients, "
            "activations, rollout) (one micro-step a step); estimate = overhead + plan peak; returning = "
            "MALLOC_MMAP_THRESHOLD_=65536, default = glibc as it comes")
    return "\n".join(lines) + "\n\n" + note


if __name__ == "__main__":
    sys.exit(main())
