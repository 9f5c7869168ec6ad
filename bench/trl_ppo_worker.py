"""TRL 1.12's PPOTrainer, the last PPO TRL shipped, measured as an anchor for rl-lora's PPO.

    python bench/run.py --algorithms ppo    # builds bench/.venv-trl112 once, then runs this file in it
    bench/.venv-trl112/bin/python bench/trl_ppo_worker.py --rank 1 --model-dir M --tmp T --steps 8

TRL 1.16 (the version rl-lora pins) has no PPO, so TRL 1.12 lives in a virtual environment of its own,
which ``ensure_venv`` (bench/trl112_venv.py) builds from the driver's side: ``trl==1.12.0`` plus exactly the torch,
transformers, peft, accelerate and datasets the driver runs, so the two sides differ by their PPO code
alone. The rest of this file runs in that environment and imports no rl_lora (only bench/workers.py's
rl_lora-free module level: shapes, LR, LoRA alpha and the step clock), and prints one JSON line in the
shape bench/workers.py prints.

The setting is rl-lora's bench recipe (bench/workers.py ``recipe``) in TRL 1.12's names: ``--batch``
completions a step, one PPO epoch in one minibatch (one optimizer update a step), ``--completion-tokens``
new tokens at temperature 1 with top-k off, stopping at EOS, KL 0.05 (k1), clip 0.2 for ratio and value,
vf_coef 0.1, gamma 1, lambda 0.95, constant LR, fp32, no gradient checkpointing. What TRL 1.12's design
makes different, and the benchmark leaves so because that is what is being compared:
- the critic is a separate value model of the policy's shape, trained in full even with ``peft_config``
  (rl-lora: a second adapter and a value head on the policy's frozen base);
- the reward is a separate reward model of the policy's shape, one extra no-grad forward pass a step
  (rl-lora's bench scores with a Python function, bench_rewards.spread);
- full-parameter runs hold a frozen reference copy (as rl-lora's do); with LoRA the reference is the
  policy with its adapter off (as in rl-lora);
- one completion per prompt: each prompt sits ``--generations`` times in the dataset, so a step samples as
  many completions of the same length as rl-lora's ``--generations`` per prompt (the grouping costs nothing);
- no gradient clipping (TRL 1.12 steps the optimizer without it; rl-lora clips policy and critic at 1.0);
- rollouts generate with the adapter unmerged and keep every generation step's logits;
- two full garbage collections a step (``gc.collect()`` after the rollout and after the update), a cost
  that grows with the objects the process holds, not with the model: the worker times them
  (``gc_collect_s_per_step``) without changing them, so the table can show how much of a step they are.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import resource
import time
from importlib.metadata import version
from typing import Any

from trl112_venv import SHARED_PACKAGES
from workers import LORA_ALPHA, LR, StepClock

KL_COEF, CLIP, VALUE_CLIP, VF_COEF, GAMMA, LAM = 0.05, 0.2, 0.2, 0.1, 1.0, 0.95  # rl-lora's PpoSpec defaults


def prompt_rows(tokenizer: Any, batch: int, generations: int, steps: int) -> list[dict[str, list[int]]]:
    """Tokenised "a+b=" prompts (rl-lora's arithmetic task), each ``generations`` times, ``steps`` batches' worth."""
    rng = random.Random(0)
    rows = []
    for _ in range(steps * batch // generations):
        ids = tokenizer(f"{rng.randint(10, 99)}+{rng.randint(10, 99)}=")["input_ids"]
        rows += [{"input_ids": ids}] * generations
    return rows


def build_trainer(args: argparse.Namespace) -> Any:
    """TRL 1.12's PPOTrainer on random-init policy, value and reward models of the bench's shape."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    torch.manual_seed(0)  # the score heads of value and reward model are fresh
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    policy = AutoModelForCausalLM.from_pretrained(args.model_dir)
    value = AutoModelForSequenceClassification.from_pretrained(args.model_dir, num_labels=1)
    reward = AutoModelForSequenceClassification.from_pretrained(args.model_dir, num_labels=1)
    reward.requires_grad_(False)
    lora = None if args.rank == "full" else LoraConfig(
        r=int(args.rank), lora_alpha=LORA_ALPHA, target_modules="all-linear", lora_dropout=0.0, bias="none",
        task_type="CAUSAL_LM")
    cfg = PPOConfig(
        output_dir=args.tmp, use_cpu=not torch.cuda.is_available(), bf16=False, gradient_checkpointing=False,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, seed=1,
        # one update a step: the whole batch is one minibatch of one micro-batch, seen once
        per_device_train_batch_size=args.batch, gradient_accumulation_steps=1, num_mini_batches=1,
        num_ppo_epochs=1, total_episodes=args.steps * args.batch, local_rollout_forward_batch_size=args.batch,
        response_length=args.completion_tokens, temperature=1.0, stop_token="eos",
        kl_coef=KL_COEF, kl_estimator="k1", cliprange=CLIP, cliprange_value=VALUE_CLIP, vf_coef=VF_COEF,
        gamma=GAMMA, lam=LAM, num_sample_generations=0, logging_steps=1, report_to="none", save_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0,
    )
    rows = prompt_rows(tok, args.batch, args.generations, args.steps)
    trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=None, reward_model=reward,
                         value_model=value, train_dataset=Dataset.from_list(rows), peft_config=lora)
    # As on every bench path: stdout carries only the result line, and no side pays for printing.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def _params(module: Any, trainable: bool = True) -> int:
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


def parameter_figures(trainer: Any) -> dict[str, int]:
    """Trainable parameters of policy and critic, and the parameters of the separate frozen models."""
    return {
        "policy_trainable_params": _params(trainer.policy_model),
        "critic_trainable_params": _params(trainer.value_model),
        "trainable_params": _params(trainer.model),
        "reference_copy_params": _params(trainer.ref_model, trainable=False),  # 0: the adapter-off policy
        "reward_model_params": _params(trainer.reward_model, trainable=False),
    }


def peak_memory() -> dict[str, int]:
    """The figures rl_lora.training.memory.peak_memory gives, written out (this venv has no rl_lora)."""
    import torch

    out = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # Linux: KiB
    if torch.cuda.is_available():
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        out["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved()
    return out


class TimedGc:
    """Stands in for the ``gc`` module inside TRL 1.12's trainer module: the same calls, each collect timed."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, float]] = []  # (start, seconds)

    def collect(self, *args: Any, **kwargs: Any) -> int:
        start = time.perf_counter()
        found = gc.collect(*args, **kwargs)
        self.calls.append((start, time.perf_counter() - start))
        return found

    def __getattr__(self, name: str) -> Any:
        return getattr(gc, name)

    def per_step(self, ends: list[float], skip: int) -> float | None:
        """Seconds of collection per step, over the steps StepClock.figures keeps."""
        first = skip if len(ends) - 1 > skip else 0
        if len(ends) < 2:
            return None
        lo, hi = ends[first], ends[-1]
        return sum(d for t, d in self.calls if lo <= t < hi) / (len(ends) - 1 - first)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """``args.steps`` PPO steps; the figures bench/workers.py reports, and the parameter counts."""
    from trl.experimental.ppo import ppo_trainer

    trainer = build_trainer(args)
    figures = parameter_figures(trainer)
    timed_gc = ppo_trainer.gc = TimedGc()
    clock = StepClock()
    clock.attach(trainer)
    trainer.train()
    versions = {p: version(p) for p in ("trl", *SHARED_PACKAGES)}
    return {**clock.figures(args.skip, args.batch), **peak_memory(), **figures,
            "gc_collect_s_per_step": timed_gc.per_step(clock.ends, args.skip), "versions": versions}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rank", default="1", help="'full' or a LoRA rank of the policy")
    p.add_argument("--model-dir", required=True, dest="model_dir", help="the folder bench/run.py builds")
    p.add_argument("--tmp", required=True, help="scratch folder (TRL's output_dir)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--skip", type=int, default=2)
    p.add_argument("--batch", type=int, default=32, help="completions a step")
    p.add_argument("--generations", type=int, default=8, help="completions a prompt")
    p.add_argument("--completion-tokens", type=int, default=16, dest="completion_tokens")
    args = p.parse_args()
    if args.batch % args.generations:
        p.error(f"--batch {args.batch} must be a multiple of --generations {args.generations}")
    print(json.dumps(measure(args)), flush=True)


if __name__ == "__main__":
    main()
