"""The benchmark's measurements, one per process: ``bench/run.py`` spawns this file once per configuration.

    python bench/workers.py --task dpo --path trl --rank 1 --model-dir M --tmp T --preferences P.jsonl

Each run prints one JSON line (its last line on stdout): median step time, peak memory, trained and
generated tokens/s for GRPO, DPO and PPO (``--task grpo|dpo|ppo``, through rl-lora or plain TRL with
``--path rl-lora|trl``), or generated tokens/s of plain, LoRA-unmerged and LoRA-merged rollouts
(``--task rollout``). One process per measurement, because peak memory is a per-process high-water mark.

Step time is the interval between consecutive ``on_step_end`` callbacks, the first starting at
``on_train_begin``: rl-lora's PPO loop is not a transformers Trainer and calls only on_train_begin,
on_step_end, on_log and on_train_end, so this is the one clock every algorithm and path shares. The
stamp of a step's end is taken before any other callback runs, so the held-out evaluation the tracker
runs after the last step is not part of it (the benchmark sets ``train.eval_every`` past the run).
The plain-TRL side gets the settings rl-lora's trainers pass (rl_lora/algorithms/common.py
``shared_training_args``, grpo.py ``grpo_args``, dpo.py ``dpo_args``), written out here by hand so
that it measures TRL itself. TRL 1.16 has no PPO trainer: PPO's TRL side is TRL 1.12's PPOTrainer,
measured by bench/trl_ppo_worker.py in a venv of its own. That file imports this one's module level
(shapes, LR, the step clock) in a venv without rl_lora, so rl_lora is imported inside functions only.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

SHAPES = {
    # ENVIRONMENT's plain-TRL CPU anchor used a 28.2M-parameter Qwen2 shape; this is of that size.
    "cpu-28m": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                    num_key_value_heads=2, vocab_size=8192),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128),
}
TASKS = ("grpo", "dpo", "ppo", "rollout")
LR = 1e-5  # speed and memory do not depend on it; one LR for every rank and path (lora.lr_multiplier 1)
DPO_BETA = 0.1  # TRL's and rl-lora's default
DPO_MAX_LENGTH = 64  # pairs are ~10 tokens ("<bos>12+34=" + "46" + EOS); nothing is truncated
LORA_ALPHA = 32  # rl-lora's default alpha, fixed across ranks


def build_model_folder(shape: str, folder: Path) -> None:
    """A random-init Qwen2 of the given shape with the built-in character tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rl_lora.tasks.arithmetic.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    cfg = Qwen2Config(**SHAPES[shape], max_position_embeddings=256, tie_word_embeddings=False,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)


def write_preferences(path: Path, rows: int = 512, seed: int = 0) -> None:
    """Synthetic DPO pairs, one JSON object a line: prompt "a+b=", chosen the sum, rejected a wrong sum."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(rows):
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            wrong = a + b + rng.choice([-10, -2, -1, 1, 2, 10])
            f.write(json.dumps({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(wrong)}) + "\n")


def recipe(args: argparse.Namespace) -> dict[str, Any]:
    """The rl-lora recipe of one measurement: cheap evaluation, no W&B, LR independent of rank."""
    raw: dict[str, Any] = {
        "name": f"bench-{args.task}", "algorithm": args.task, "model": {"policy": args.model_dir},
        "lora": {"rank": args.rank if args.rank == "full" else int(args.rank), "alpha": LORA_ALPHA,
                 "lr_multiplier": 1.0},
        "data": {"eval_size": 8},
        "train": {"steps": args.steps, "batch_size": args.batch, "lr": LR, "eval_every": 10_000,
                  "lr_scheduler": "constant"},
        "logging": {"output_dir": args.tmp, "wandb": False, "progress": False},
    }
    rewards = {"functions": [{"name": "bench_rewards:spread"}]}
    if args.task == "grpo":
        raw["grpo"] = {"num_generations": args.generations, "max_completion_length": args.completion_tokens,
                       "merge_rollouts": not args.unmerged}
        raw["reward"] = rewards
    elif args.task == "dpo":
        raw["dpo"] = {"beta": DPO_BETA, "loss_type": "sigmoid", "max_length": DPO_MAX_LENGTH}
        raw["data"]["preferences"] = args.preferences
    elif args.task == "ppo":
        # One optimizer update per step (1 epoch, minibatch = the whole batch), as GRPO makes: step times
        # of the two algorithms then differ by what PPO adds (critic, reference pass), not by update count.
        raw["ppo"] = {"samples_per_prompt": args.generations, "max_completion_length": args.completion_tokens,
                      "epochs": 1, "minibatch_size": args.batch}
        raw["reward"] = rewards
    return raw


class StepClock:
    """Step-end times and the per-step figures the trainer logs (trained and generated token counts).

    Two callbacks share it: ``start`` goes last in the callback list (the clock starts after the
    tracker's step-0 evaluation), ``stamp`` goes first (a step ends before any callback's work).
    """

    def __init__(self) -> None:
        from transformers import TrainerCallback

        clock = self
        self.ends: list[float] = []
        self.logs: dict[int, dict[str, float]] = {}

        class Start(TrainerCallback):
            def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                clock.ends = [time.perf_counter()]

        class Stamp(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                clock.ends.append(time.perf_counter())

            def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
                kept = {k: float(v) for k, v in (logs or {}).items()
                        if k in ("num_tokens", "completions/mean_length") and v is not None}
                if kept:
                    clock.logs.setdefault(state.global_step, {}).update(kept)

        self.start, self.stamp = Start(), Stamp()

    def attach(self, trainer: Any) -> None:
        """Both the TRL trainers and rl-lora's PPO loop dispatch through a transformers CallbackHandler."""
        handler = trainer.callback_handler
        handler.callbacks.insert(0, self.stamp)
        handler.callbacks.append(self.start)

    def read_tracker(self, trainer: Any) -> None:
        """Take rl-lora's own per-step FLOP figures from its tracker's records (none on the TRL path)."""
        from rl_lora.training.tracking import RunTracker

        for callback in trainer.callback_handler.callbacks:
            if isinstance(callback, RunTracker):
                for record in callback.records:
                    kept = {k: record[k] for k in ("train_tflops_per_s", "mfu") if record.get(k) is not None}
                    if kept:
                        self.logs.setdefault(record["step"], {}).update(kept)

    def figures(self, skip: int, samples_per_step: int) -> dict[str, Any]:
        """Median step time and token rates over the steps after the first ``skip`` (warm-up)."""
        times = [b - a for a, b in zip(self.ends, self.ends[1:], strict=False)]
        first = skip if len(times) > skip else 0
        kept = times[first:]
        out: dict[str, Any] = {"median_step_s": statistics.median(kept), "steps": len(times), "step_times_s": times}
        seconds = sum(kept)
        tokens = {step: r["num_tokens"] for step, r in self.logs.items() if "num_tokens" in r}
        last = len(times)
        if last in tokens and (first == 0 or first in tokens):
            trained = tokens[last] - (tokens[first] if first else 0.0)
            out["trained_tokens_per_s"] = trained / seconds
        lengths = [self.logs.get(s, {}).get("completions/mean_length") for s in range(first + 1, last + 1)]
        if lengths and all(v is not None for v in lengths):
            out["generated_tokens_per_s"] = sum(lengths) * samples_per_step / seconds
        # rl-lora's tracker: training-pass FLOPs over the whole step's time (rollout included), and MFU
        # against the device's peak (an H200's measured bf16 rate, or RL_LORA_PEAK_TFLOPS).
        for key in ("train_tflops_per_s", "mfu"):
            values = [self.logs.get(s, {}).get(key) for s in range(first + 1, last + 1)]
            if values and all(v is not None for v in values):
                out[key] = statistics.median(values)
        return out


def _quiet(trainer: Any) -> Any:
    # rl-lora drops transformers' printers (its tracker writes the records); the plain-TRL side drops
    # them too so that stdout carries only the result line, and neither side pays for printing.
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def _trl_common(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainingArguments rl-lora's shared_training_args sets for this recipe, written out."""
    import torch

    return dict(
        output_dir=args.tmp, use_cpu=not torch.cuda.is_available(), bf16=False, gradient_checkpointing=False,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        per_device_train_batch_size=args.batch, gradient_accumulation_steps=1, max_steps=args.steps, seed=1,
        logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
    )


def _trl_lora(args: argparse.Namespace) -> Any:
    from peft import LoraConfig

    if args.rank == "full":
        return None
    return LoraConfig(r=int(args.rank), lora_alpha=LORA_ALPHA, target_modules="all-linear", lora_dropout=0.0,
                      bias="none", task_type="CAUSAL_LM")


def trl_grpo(args: argparse.Namespace) -> Any:
    """Plain TRL GRPOTrainer with the GRPOConfig rl-lora's grpo_args builds for the bench recipe."""
    from bench_rewards import spread
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from rl_lora.config.schema import DataSpec
    from rl_lora.tasks.arithmetic import problems as arithmetic

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir)
    train, _ = arithmetic.split(DataSpec(eval_size=8))
    cfg = GRPOConfig(**_trl_common(args), num_generations=args.generations,
                     max_completion_length=args.completion_tokens, temperature=1.0, beta=0.0, epsilon=0.2,
                     loss_type="dapo", scale_rewards="group", reward_weights=[1.0])
    return GRPOTrainer(model=model, reward_funcs=spread, args=cfg, train_dataset=arithmetic.to_dataset(train),
                       processing_class=tok, peft_config=_trl_lora(args))


def trl_dpo(args: argparse.Namespace) -> Any:
    """Plain TRL DPOTrainer with rl-lora's dpo_args; full-parameter gets a frozen reference copy, as in rl-lora."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir)
    rows = [json.loads(line) for line in Path(args.preferences).read_text(encoding="utf-8").splitlines() if line]
    reference = None
    if args.rank == "full":  # TRL would otherwise load a reference from the model's (empty) hub name
        reference = copy.deepcopy(model).eval()
        reference.requires_grad_(False)
    cfg = DPOConfig(**_trl_common(args), beta=DPO_BETA, loss_type=["sigmoid"], loss_weights=None,
                    max_length=DPO_MAX_LENGTH)
    return DPOTrainer(model=model, ref_model=reference, args=cfg, train_dataset=Dataset.from_list(rows),
                      processing_class=tok, peft_config=_trl_lora(args))


def rl_lora_trainer(args: argparse.Namespace) -> Any:
    """The trainer rl-lora builds for the bench recipe (tracker callback included), not yet trained."""
    from rl_lora.config.schema import validate
    from rl_lora.launch.runner import prepare_run

    return prepare_run(validate(recipe(args))).trainer


def worker_train(args: argparse.Namespace) -> dict[str, Any]:
    """One process: ``args.steps`` steps of GRPO, DPO or PPO through rl-lora or plain TRL."""
    from rl_lora.training.memory import peak_memory

    if args.path == "rl-lora":
        trainer = rl_lora_trainer(args)
    elif args.task == "ppo":
        raise SystemExit("bench worker: --task ppo has no TRL 1.16 path (TRL 1.12's PPO runs in "
                         "bench/trl_ppo_worker.py)")
    else:
        trainer = _quiet(trl_grpo(args) if args.task == "grpo" else trl_dpo(args))
    params = ppo_parameter_figures(trainer) if args.task == "ppo" else {}
    clock = StepClock()
    clock.attach(trainer)
    trainer.train()
    clock.read_tracker(trainer)
    return {**clock.figures(args.skip, args.batch), **peak_memory(), **params}


def ppo_parameter_figures(trainer: Any) -> dict[str, int]:
    """rl-lora PPO's trainable parameters (policy; critic with its value head) and its separate reference
    copy, under the names bench/trl_ppo_worker.py gives TRL 1.12's."""
    ac = trainer.ac
    policy = sum(p.numel() for p in ac.policy_params)
    critic = sum(p.numel() for p in ac.critic_params)
    reference = sum(p.numel() for p in ac.reference.parameters()) if ac.reference is not None else 0
    return {"policy_trainable_params": policy, "critic_trainable_params": critic,
            "trainable_params": policy + critic, "reference_copy_params": reference, "reward_model_params": 0}


def worker_rollout(args: argparse.Namespace) -> dict[str, Any]:
    """Generated tokens/s: plain model, LoRA unmerged, LoRA merged (same prompts, greedy, fixed length).

    The plain model and the LoRA model are two copies of the same weights, so the three variants can
    take turns: every round times each once, and a variant's figure is its median over the rounds after
    the first (warm-up). Taking turns keeps a slow drift of the machine from landing on one variant.
    The merged variant's time includes folding the adapters in and restoring them, as a rollout pays it.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rl_lora.adapters.rollout import merged_adapters

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    plain = AutoModelForCausalLM.from_pretrained(args.model_dir).to(device).eval()
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(args.model_dir).to(device),
                          LoraConfig(r=int(args.rank), lora_alpha=LORA_ALPHA, target_modules="all-linear")).eval()
    prompts = tok([f"{a}+{a + 7}=" for a in range(10, 10 + args.batch)], return_tensors="pt", padding=True).to(device)
    new = args.completion_tokens * 4

    def seconds(m: torch.nn.Module, merge: bool = False) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad(), merged_adapters(m) if merge else contextlib.nullcontext():
            m.generate(**prompts, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                       pad_token_id=tok.pad_token_id)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    rounds: dict[str, list[float]] = {"plain": [], "unmerged": [], "merged": []}
    for _ in range(args.repeats_inner + 1):
        rounds["plain"].append(seconds(plain))
        rounds["unmerged"].append(seconds(lora))
        rounds["merged"].append(seconds(lora, merge=True))
    rate = {k: args.batch * new / statistics.median(v[1:]) for k, v in rounds.items()}
    return {"plain_tok_s": rate["plain"], "lora_unmerged_tok_s": rate["unmerged"],
            "lora_merged_tok_s": rate["merged"], "round_seconds": rounds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=TASKS, required=True)
    p.add_argument("--path", choices=("rl-lora", "trl", "none"), default="rl-lora",
                   help="none: the rollout task, which measures the models without a trainer")
    p.add_argument("--rank", default="1", help="'full' or a LoRA rank")
    p.add_argument("--model-dir", required=True, dest="model_dir")
    p.add_argument("--tmp", required=True, help="scratch folder (run folders, TRL output_dir)")
    p.add_argument("--preferences", default=None, help="DPO pairs (.jsonl), written by bench/run.py")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--skip", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--completion-tokens", type=int, default=16, dest="completion_tokens")
    p.add_argument("--repeats-inner", type=int, default=4, dest="repeats_inner")
    p.add_argument("--unmerged", action="store_true")
    args = p.parse_args()
    if args.task == "dpo" and not args.preferences:
        p.error("--task dpo needs --preferences")
    result = worker_rollout(args) if args.task == "rollout" else worker_train(args)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
