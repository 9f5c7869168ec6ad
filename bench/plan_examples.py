"""The worked examples of docs/plan.md: how many 80 GB GPUs GRPO and PPO need on Llama-3.1-8B and -70B
shapes, full fine-tuning against rank-1 LoRA, computed by rl_lora.estimate.plan (what ``rl-lora plan`` prints).

    .venv/bin/python bench/plan_examples.py          # prints the Markdown table and the commands behind it

The shapes are docs/plan_shapes/*.json (the public architecture numbers; no weights). GRPO runs
recipes/grpo_gsm8k_qwen.yaml (bf16, 64 completions of up to 512 tokens a step, 8 per micro-step and GPU), PPO
recipes/ppo_arithmetic.yaml in bf16 with the same batch and completion length (minibatches of 32, 2 epochs);
prompts 256 tokens.
One GPU: no DeepSpeed (bf16 weights and AdamW moments, fp32 adapters); 8 GPUs: ZeRO-3 (bf16 weights, fp32
master weights and moments).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rl_lora.config.schema import load_recipe  # noqa: E402
from rl_lora.estimate.plan import GB, make_plan  # noqa: E402

PROMPT_TOKENS = 256
MEMORY = 80 * GB
SHAPES = {"Llama-3.1-8B": "docs/plan_shapes/llama-3.1-8b.json", "Llama-3.1-70B": "docs/plan_shapes/llama-3.1-70b.json"}
# (recipe, overrides on one GPU, overrides on 8): GRPO takes 8 micro-steps of 8 completions on one GPU, one
# on each of 8 GPUs; PPO has no gradient accumulation, so one GPU trains its whole minibatch of 32 at once.
RECIPES = {
    "GRPO": ("recipes/grpo_gsm8k_qwen.yaml", ["distributed.gradient_accumulation=8"], []),
    "PPO": ("recipes/ppo_arithmetic.yaml", ["model.dtype=bfloat16", "ppo.max_completion_length=512"],
            ["model.dtype=bfloat16", "ppo.max_completion_length=512"]),
}


def command(recipe: str, overrides: list[str], devices: int) -> str:
    return (f"rl-lora plan {recipe} {' '.join(overrides)} --devices {devices} --device-memory 80GB "
            f"--prompt-tokens {PROMPT_TOKENS}")


def main() -> None:
    rows = ["| model | algorithm | method | 1 GPU: peak GB (checkpointing) | fits? | 8 GPUs, ZeRO-3: peak GB per GPU "
            "(checkpointing) | fits? | fewest 80 GB GPUs, ZeRO-3 (checkpointing) |",
            "|---|---|---|---|---|---|---|---|"]
    commands = []
    for model, shape in SHAPES.items():
        for algorithm, (recipe, alone, spread) in RECIPES.items():
            one_gpu = [f"model.policy={shape}", *alone]
            node = [f"model.policy={shape}", *spread, "distributed.zero_stage=3"]
            commands += [command(recipe, one_gpu, 1), command(recipe, node, 8)]
            single = make_plan(load_recipe(REPO / recipe, one_gpu), 1, MEMORY, PROMPT_TOKENS)
            eight = make_plan(load_recipe(REPO / recipe, node), 8, MEMORY, PROMPT_TOKENS)
            for one, many in zip(single.methods, eight.methods, strict=True):
                a, b = one.breakdown, many.breakdown
                rows.append(
                    f"| {model} | {algorithm} | {one.label} | {a.peak() / GB:,.0f} ({a.peak(True) / GB:,.0f}) | "
                    f"{_fits(a, single.usable)} | {b.peak() / GB:,.0f} ({b.peak(True) / GB:,.0f}) | "
                    f"{_fits(b, eight.usable)} | {_count(many.smallest[(3, False)])} "
                    f"({_count(many.smallest[(3, True)])}) |")
    print("\n".join(rows))
    print("\nnone: no device count the batch (PPO: also its minibatch of 32) divides over fits.")
    print("\n```bash\n" + "\n".join(commands) + "\n```")


def _fits(b: object, usable: int) -> str:
    return "yes" if b.peak() <= usable else ("with checkpointing" if b.peak(True) <= usable else "no")


def _count(n: int | None) -> str:
    return str(n) if n is not None else "none"


if __name__ == "__main__":
    main()
