"""One run of a recipe, top to bottom: setup -> train -> save -> summary.

The config has been validated before this is called; everything that can fail on the user's
input without loading a model (reward names, the run folder) is checked before the model loads.
"""

from __future__ import annotations

import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from reward_models import resolve_reward
from rl_lora.config import RecipeConfig
from rl_lora.errors import CheckpointError
from rl_lora.evaluation import exact_answer_accuracy
from rl_lora.lora import count_parameters
from rl_lora.lr_rule import ResolvedLR, resolve_lr
from rl_lora.memory import peak_memory
from rl_lora.models.loading import load_policy
from rl_lora.run_dir import create_run_dir, write_config, write_json_atomic
from rl_lora.tasks import arithmetic
from rl_lora.tracking import RunTracker, WandbSink
from rl_lora.trainers.grpo import build_grpo_trainer

FINAL_REWARD_WINDOW = 10  # final reward = mean over the last 10 logged steps (one step is noisy)


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]


def _versions() -> dict[str, str]:
    return {name: version(name) for name in ("torch", "transformers", "trl", "peft", "rl-lora")}


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def check_saved_adapter(folder: Path) -> int:
    """Number of adapter tensors saved; raises if the file is missing or holds an empty tensor."""
    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"adapter was not written: '{path}' is missing")
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        empty = [k for k in keys if f.get_slice(k).get_shape() in ([], [0]) or 0 in f.get_slice(k).get_shape()]
    if not keys or empty:
        raise CheckpointError(f"adapter '{path}' is empty or holds zero-sized tensors: {empty[:3]}")
    return len(keys)


def _quiet_libraries() -> None:
    """Keep the console to our own progress bar and summary."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars per load/save
    hf_logging.set_verbosity_error()
    # TRL 1.16 still passes transformers' deprecated gradient_checkpointing names; not the user's concern.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\..*")


@dataclass
class PreparedRun:
    """Everything set up and ready to train: nothing has been trained yet."""

    config: RecipeConfig
    run_dir: Path
    trainer: Any
    tracker: RunTracker
    tokenizer: Any
    sink: WandbSink | None
    method: str
    lr: ResolvedLR
    source: str
    started: float


def prepare_run(config: RecipeConfig) -> PreparedRun:
    """Setup: check rewards and the output folder, load the policy, build the trainer."""
    started = time.perf_counter()
    _quiet_libraries()
    for f in config.reward.functions:  # fail on a bad reward name before any model loads
        resolve_reward(f.name)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    run_dir = create_run_dir(config)
    method = "full" if config.lora.is_full else f"lora-r{config.lora.rank}"
    lr = resolve_lr(config.train.lr, config.lora, config.train.steps)
    _say(f"rl-lora: {config.name} | {config.algorithm} | {method} | lr {lr.lr:g} ({lr.reason})")
    _say(f"rl-lora: run folder {run_dir}")

    train_problems, held_out = arithmetic.split(config.data)
    model, tokenizer, source = load_policy(config.model, config.data, progress=config.logging.progress)
    resolved = config.to_dict()
    resolved["resolved"] = {
        "method": method,
        "lr": lr.lr,
        "lr_multiplier": lr.multiplier,
        "lr_reason": lr.reason,
        "policy_path": source,
        "versions": _versions(),
    }
    write_config(run_dir, resolved)

    sink = None
    if config.logging.wandb:
        tags = [method, config.algorithm, "full" if config.lora.is_full else "lora"]
        sink = WandbSink(
            run_dir, config.logging.wandb_project, run_dir.name, config.logging.wandb_group,
            {**resolved, "rank": str(config.lora.rank), "method": method, "lr": lr.lr, "seed": config.train.seed},
            tags, job_type=method,
        )
    max_new = config.grpo.max_completion_length

    def evaluate(m: Any) -> dict[str, float]:
        return {"accuracy": exact_answer_accuracy(m, tokenizer, held_out, max_new)}

    tracker = RunTracker(run_dir / "metrics.jsonl", evaluate, config.train.eval_every, {}, sink,
                         progress=config.logging.progress)
    trainer = build_grpo_trainer(
        config, model, tokenizer, arithmetic.to_dataset(train_problems), lr.lr, run_dir / "trainer", [tracker]
    )
    trainable, total = count_parameters(trainer.model)
    tracker.static = {"trainable_params": trainable, "total_params": total}
    _say(f"rl-lora: trainable params {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    return PreparedRun(config, run_dir, trainer, tracker, tokenizer, sink, method, lr, source, started)


def save_policy(run: PreparedRun) -> Path:
    """The adapter (PEFT format) or the full model, as safetensors, with the tokenizer beside it."""
    out = run.run_dir / ("model" if run.config.lora.is_full else "adapter")
    run.trainer.model.save_pretrained(str(out))
    run.tokenizer.save_pretrained(str(out))
    if not run.config.lora.is_full:
        check_saved_adapter(out)
    return out


def finish_run(run: PreparedRun, train_seconds: float) -> RunResult:
    """Save, write summary.json, close W&B and print the closing lines."""
    out = save_policy(run)
    shutil.rmtree(run.run_dir / "trainer", ignore_errors=True)  # TRL's scratch folder; we save ourselves
    records = run.tracker.records
    rewards = [r["reward"] for r in records if r.get("reward") is not None]
    window = rewards[-FINAL_REWARD_WINDOW:]
    summary = {
        "recipe": run.config.name,
        "algorithm": run.config.algorithm,
        "method": run.method,
        "rank": run.config.lora.rank,
        "seed": run.config.train.seed,
        "steps": run.config.train.steps,
        "lr": run.lr.lr,
        "lr_reason": run.lr.reason,
        "start_accuracy": run.tracker.start_eval.get("accuracy"),
        "final_accuracy": run.tracker.last_eval.get("accuracy"),
        "final_reward": sum(window) / len(window) if window else None,
        **run.tracker.static,
        "train_seconds": round(train_seconds, 2),
        "wall_seconds": round(time.perf_counter() - run.started, 2),
        "saved": str(out),
        "base_model": run.source,
        **peak_memory(),
    }
    write_json_atomic(run.run_dir / "summary.json", summary)
    sync = run.sink.finish(summary) if run.sink is not None else None
    _print_summary(summary, run.run_dir, sync)
    return RunResult(run.run_dir, summary)


def run_recipe(config: RecipeConfig) -> RunResult:
    """Setup -> train -> save -> summary."""
    run = prepare_run(config)
    train_started = time.perf_counter()
    run.trainer.train()
    return finish_run(run, time.perf_counter() - train_started)


def _print_summary(s: dict[str, Any], run_dir: Path, sync: str | None) -> None:
    start, final = s["start_accuracy"], s["final_accuracy"]
    reward = s["final_reward"]
    lines = [
        f"held-out accuracy: {start:.3f} -> {final:.3f} ({100 * (final - start):+.1f} points)",
        f"final reward (mean of last {FINAL_REWARD_WINDOW} steps): "
        + (f"{reward:.3f}" if reward is not None else "n/a"),
        f"trainable params: {s['trainable_params']:,} of {s['total_params']:,}",
        f"time: {s['wall_seconds']:.1f} s in all, {s['train_seconds']:.1f} s training; "
        f"peak RSS {s['peak_rss_bytes'] / 2**30:.2f} GiB",
        f"saved: {s['saved']}",
        f"summary: {run_dir / 'summary.json'}",
    ]
    if sync:
        lines.append(f"W&B (offline): {sync}")
    print("\n".join(lines), flush=True)
