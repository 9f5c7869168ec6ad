"""Helpers for tests (not fixtures): the tiny recipe every training test starts from."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any


def tiny_raw(output_dir: Path, **sections: dict) -> dict:
    """A recipe on a random-init built-in model: 3 GRPO steps, a 20-problem held-out set."""
    raw = {
        "name": "tiny",
        "model": {"policy": "builtin:arithmetic-tiny", "warmup_steps": 0},
        "lora": {"rank": 1},
        "grpo": {"num_generations": 4, "max_completion_length": 4},
        # Rewards with spread inside each group, so advantages (and gradients) are non-zero.
        "reward": {"functions": [{"name": "reward_helpers:digit_ones"}]},
        "data": {"eval_size": 20},
        "train": {"steps": 3, "batch_size": 16, "lr": 1e-3, "eval_every": 2},
        "logging": {"output_dir": str(output_dir), "wandb": False, "progress": False},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def save_tiny_moe(folder: Path, kind: str = "qwen3_moe") -> Path:
    """A random-init tiny MoE causal LM (4 experts, 2 per token) with the built-in character tokenizer.

    ``kind`` is "qwen3_moe" or "mixtral"; in transformers 5.x both keep their experts as fused 3-D
    parameters (``mlp.experts.gate_up_proj``, ``mlp.experts.down_proj``) behind a TopKRouter ``mlp.gate``.
    """
    import torch
    import transformers

    from rl_lora.tasks.arithmetic.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id}
    shape = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "num_experts_per_tok": 2, "vocab_size": len(tokenizer), "max_position_embeddings": 64, **ids}
    if kind == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(num_experts=4, moe_intermediate_size=32, intermediate_size=128,
                                             head_dim=16, **shape)
    else:
        config = transformers.MixtralConfig(num_local_experts=4, intermediate_size=32, **shape)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def kill_after_checkpoint(recipe: Path, cut: Path, step: int) -> None:
    """Run ``recipe`` as run ``cut`` (its folder); the process SIGKILLs itself right after sealing checkpoint
    ``step`` (tests/kill_hook/sitecustomize.py), so the kill point does not depend on how busy the machine is."""
    import os
    import signal
    import subprocess
    import sys

    tests = Path(__file__).resolve().parent
    env = {**os.environ, "WANDB_MODE": "disabled", "RL_LORA_TEST_KILL_AFTER_STEP": str(step),
           "PYTHONPATH": os.pathsep.join([str(tests / "kill_hook"), str(tests)])}
    proc = subprocess.run([sys.executable, "-m", "rl_lora.cli", "run", str(recipe), f"logging.run_name={cut.name}"],
                          cwd=tests.parent, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (cut / "checkpoints" / "latest").read_text().strip() == f"step_{step:06d}"
    assert not (cut / "summary.json").exists()


def save_tiny_chat_model(folder: Path) -> Path:
    """A random-init tiny Llama with the built-in character tokenizer and a minimal chat template
    ("u:<content>\n" per message, "a:" for the reply)."""
    import torch
    from transformers import LlamaForCausalLM

    from rl_lora.tasks.arithmetic.model import builtin_config
    from rl_lora.tasks.arithmetic.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}a:{% endif %}")
    config = builtin_config()
    config.max_position_embeddings = 256
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def subprocess_env(threads: int | None = 1) -> dict[str, str]:
    """The environment for an ``rl-lora`` child process in a test: this folder importable (its kill hooks and
    helpers), W&B off, ``threads`` OpenMP threads (None: as inherited), not marked as already launched."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent), "WANDB_MODE": "disabled"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    env.pop("RL_LORA_LAUNCHED", None)
    return env


def free_port() -> int:
    """A loopback port nothing listens on now. The kernel picks it from its ephemeral range; the launcher
    binds it a moment later (a small window, unlike a fixed port shared by every session on the machine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parameter_snapshot(model: Any) -> dict[str, tuple[bool, Any]]:
    """{name: (requires_grad, a detached copy)} of every parameter, to compare before and after training."""
    return {n: (p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()}


def train_in_process(raw: dict) -> tuple[Any, dict, dict, Any]:
    """(the prepared run, parameters before, parameters after, its RunResult) of a tiny recipe trained in this
    process; torch's thread count is restored afterwards (``train.threads`` is process-wide)."""
    import torch

    from rl_lora.config.schema import validate
    from rl_lora.launch.runner import finish_run, prepare_run

    threads = torch.get_num_threads()
    try:
        run = prepare_run(validate(raw))
        before = parameter_snapshot(run.trainer.model)
        run.trainer.train()
        after = parameter_snapshot(run.trainer.model)
        return run, before, after, finish_run(run, train_seconds=0.0)
    finally:
        torch.set_num_threads(threads)


# The per-process state bytes a run's tracker logs (rl_lora.training.memory.state_bytes) and the plan models.
LOGGED_BYTES = ("param_bytes", "trainable_param_bytes", "grad_bytes", "optimizer_bytes", "reference_param_bytes")


def planned_bytes(raw: dict, devices: int = 1) -> dict[str, int]:
    """What `rl-lora plan` says one process of ``raw``'s run holds on ``devices`` processes (Breakdown.logged)."""
    from rl_lora.config.algorithms import algorithm_info
    from rl_lora.config.schema import validate
    from rl_lora.estimate.plan import model_facts, parts, plan_model_config, precision, recipe_layout, state_breakdown

    config = validate(raw)
    facts = model_facts(plan_model_config(config), algorithm_info(config.algorithm).scores_sequences)
    return state_breakdown(parts(facts, config, config.lora.rank), recipe_layout(config, facts, devices),
                           precision(config)).logged


def logged_bytes(run_dir: Path, step: int = 1) -> dict[str, int]:
    """The state bytes the run logged at ``step`` (step 1: a training step after step 0's held-out evaluation)."""
    import json

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    record = next(r for r in records if r["step"] == step)
    return {k: record[k] for k in LOGGED_BYTES}
