"""rl-lora plan (rl_lora/estimate/plan.py): its parameter, gradient and optimizer bytes against what tiny CPU runs log,
its arithmetic on the public Llama shapes, and its one-line refusals of bad input.

The exact figures: a run's tracker logs rl_lora.training.memory.state_bytes of the module it sees (param_bytes,
trainable_param_bytes, grad_bytes, optimizer_bytes) and, apart, reference_param_bytes; the plan's
``Breakdown.logged`` must equal them to the byte, for GRPO, DPO, PPO and reward-model training, LoRA and full,
in one process and (multiprocess) under ZeRO-0/2/3 over 2 gloo processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rl_lora.cli import main
from rl_lora.config.schema import validate
from rl_lora.estimate.plan import (
    GB,
    Layout,
    breakdown,
    make_plan,
    model_facts,
    parse_memory,
    plan_model_config,
)
from rl_lora.estimate.plan_text import plan_lines
from rl_lora.launch.runner import run_recipe
from rl_lora.utils.errors import ConfigError, ModelError
from tests_support import free_port, logged_bytes, planned_bytes, save_tiny_moe, tiny_raw

REPO = Path(__file__).resolve().parent.parent
SHAPES = REPO / "docs" / "plan_shapes"


def _raw(out: Path, algorithm: str, rank: int | str, **sections: dict) -> dict:
    """The tiny recipe (random-init built-in model) as ``algorithm``: 8 completions or pairs, 2 steps, the
    held-out evaluation at the last step only (so step 1's record is a plain training step)."""
    raw = tiny_raw(out, lora={"rank": rank}, data={"eval_size": 4, "max_operand": 30},
                   train={"steps": 2, "batch_size": 8, "threads": 1, "eval_every": 100}, **sections)
    if algorithm == "ppo":
        raw["ppo"] = {"samples_per_prompt": 4, "max_completion_length": 4, "epochs": 1, "minibatch_size": 8}
    if algorithm != "grpo":  # a recipe holds only its algorithm's sections
        raw = {k: v for k, v in raw.items() if k not in ("grpo", "reward") or (k, algorithm) == ("reward", "ppo")}
    return raw | {"algorithm": algorithm}


@pytest.mark.parametrize("rank", [1, "full"])
@pytest.mark.parametrize("algorithm", ["grpo", "dpo", "ppo", "reward"])
def test_planned_bytes_equal_what_a_run_logs(tmp_path: Path, algorithm: str, rank: int | str) -> None:
    raw = _raw(tmp_path, algorithm, rank)
    result = run_recipe(validate(raw))
    assert logged_bytes(result.run_dir) == planned_bytes(raw)


def test_planned_qlora_bytes_equal_what_a_run_logs(tmp_path: Path) -> None:
    """A 4-bit base: packed weights, an absmax per 64 and a code book per linear (rl_lora.training.memory)."""
    pytest.importorskip("bitsandbytes")
    raw = _raw(tmp_path, "grpo", 1, model={"quantization": "nf4"})
    logged = logged_bytes(run_recipe(validate(raw)).run_dir)
    assert logged == planned_bytes(raw)
    assert logged["param_bytes"] - logged["trainable_param_bytes"] == 536_832  # docs/advisor.md#qlora


# -- several processes: DeepSpeed ZeRO over gloo ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.multiprocess
def test_planned_bytes_per_process_equal_what_a_zero2_full_run_logs(tmp_path: Path) -> None:
    """2 processes, full-parameter GRPO under ZeRO-2: the optimizer's padded groups. The other combinations are
    checked on runs launched anyway, each paid for once: GRPO LoRA under ZeRO-2/3, full under ZeRO-0/3, DPO
    LoRA ZeRO-2 and full ZeRO-3, reward models under ZeRO-2/3 (tests/test_distributed.py), PPO LoRA under
    ZeRO-2/3 and full under ZeRO-3 (tests/test_ppo_distributed.py): ZeRO-3's slices (ceil(n / 2) per tensor,
    tensors of <= 10 x hidden elements kept whole as well), ZeRO-0's whole copies, PPO's reference whole and
    DPO's partitioned. Step 1's record: after a held-out evaluation ZeRO-3 has re-partitioned even the small
    persistent tensors, and the next forward gathers them again."""
    raw = _raw(tmp_path / "runs", "grpo", "full", distributed={"zero_stage": 2})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests"), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    env.pop("RL_LORA_LAUNCHED", None)
    proc = subprocess.run([sys.executable, "-m", "rl_lora.cli", "run", str(recipe), "logging.run_name=z", "--nproc",
                           "2", "--master-port", str(free_port())], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert logged_bytes(tmp_path / "runs" / "z") == planned_bytes(raw, devices=2)


# -- the arithmetic on public shapes ---------------------------------------------------------------------------


def _shape_config(shape: str, *overrides: str, recipe: str = "grpo_gsm8k_qwen.yaml") -> object:
    from rl_lora.config.schema import apply_overrides, read_recipe_file

    raw = apply_overrides(read_recipe_file(REPO / "recipes" / recipe),
                          [f"model.policy={SHAPES / shape}", *overrides])
    return validate(raw)


def test_llama_8b_counts_and_zero3_split() -> None:
    """8,030,261,248 parameters and 2,621,440 rank-1 LoRA parameters (docs/advisor.md); bf16 full fine-tuning
    under DeepSpeed holds 2 + 4 + 8 + 4 bytes per parameter (weights, fp32 gradient, moments, master), which
    ZeRO-3 splits over 8 devices to within the few whole tensors."""
    config = _shape_config("llama-3.1-8b.json", "distributed.zero_stage=3")
    facts = model_facts(plan_model_config(config))
    assert facts.parameters == 8_030_261_248
    n = facts.parameters
    one = breakdown(facts, config, "full", Layout(1, 3))  # no tensor kept whole as well
    assert (one.weights["policy weights"], one.gradients, one.moments, one.master) == (2 * n, 4 * n, 8 * n, 4 * n)
    eight = breakdown(facts, config, "full", Layout(8, 3, persistence=10 * 4096))
    assert 18 * n / 8 <= eight.states + eight.gradients <= 18 * n / 8 + 2 * 4096 * 65 * 2
    # without DeepSpeed the adapters stay fp32 on the bf16 base (PEFT), with no master copy
    lora = breakdown(facts, _shape_config("llama-3.1-8b.json"), 1, Layout(1, None))
    assert lora.weights["LoRA adapter"] == 4 * 2_621_440 and lora.moments == 8 * 2_621_440
    assert lora.master == 0 and lora.weights["policy weights"] == 2 * n


def test_plan_says_rank_1_fits_where_full_does_not() -> None:
    """GRPO on a 70B shape: full fine-tuning does not fit one 80 GB device, rank 1 needs far fewer devices."""
    plan = make_plan(_shape_config("llama-3.1-70b.json", "distributed.zero_stage=3"), devices=1,
                     device_memory=80 * GB)
    full, lora = plan.methods
    assert full.breakdown.peak(True) > plan.usable
    assert lora.smallest[(3, True)] < full.smallest[(3, True)]
    text = "\n".join(plan_lines(plan))
    assert "smallest device count, ZeRO-3" in text and "LoRA r1" in text


@pytest.mark.parametrize("rank", [1, "full"])
def test_flops_per_token_are_what_a_run_tracker_counts(tmp_path: Path, rank: int | str) -> None:
    """The tracker's figure (rl_lora.training.flops over the built model's linears, the head included) from shapes
    alone."""
    from peft import get_peft_model
    from transformers import LlamaForCausalLM

    from rl_lora.adapters.lora import peft_config
    from rl_lora.estimate.plan import flops_per_token
    from rl_lora.tasks.arithmetic.model import builtin_config
    from rl_lora.training.flops import linear_inventory, training_flops_per_token

    config = validate(_raw(tmp_path, "grpo", rank))
    model = LlamaForCausalLM(builtin_config())
    if rank != "full":
        model = get_peft_model(model, peft_config(config.lora))
    tracked = training_flops_per_token(*linear_inventory(model))
    assert flops_per_token(model_facts(plan_model_config(config)), config, rank) == tracked


def test_plan_of_a_tiny_moe_counts_its_experts(tmp_path: Path) -> None:
    folder = save_tiny_moe(tmp_path / "moe")
    config = validate(_raw(tmp_path, "grpo", 4, model={"policy": str(folder)}))
    facts = model_facts(plan_model_config(config))
    # PEFT's count for this model at rank 4 (docs/advisor.md#moe, tests/test_moe_lora.py), tensor by tensor
    assert breakdown(facts, config, 4, Layout()).weights["LoRA adapter"] == 4 * 9_216


def test_cli_prints_the_plan(capsys: pytest.CaptureFixture[str]) -> None:
    recipe = str(REPO / "recipes" / "ppo_arithmetic.yaml")
    assert main(["plan", recipe, f"model.policy={SHAPES / 'llama-3.1-8b.json'}", "model.dtype=bfloat16",
                 "distributed.zero_stage=3", "--devices", "8", "--device-memory", "80GB", "--prompt-tokens",
                 "256"]) == 0
    out = capsys.readouterr().out
    for row in ("critic copy", "value adapter", "value head", "reference copy", "generation KV cache",
                "peak, gradient checkpointing", "training TFLOP per step"):
        assert row in out


def test_hub_id_is_read_from_the_local_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No network: a hub id resolves from the hub cache (HF_HUB_OFFLINE=1 in conftest.py)."""
    import huggingface_hub.constants

    snapshot = tmp_path / "hub" / "models--someorg--llama-8b-shape" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text((SHAPES / "llama-3.1-8b.json").read_text())
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    config = validate(_raw(tmp_path, "grpo", 1, model={"policy": "someorg/llama-8b-shape"}))
    assert model_facts(plan_model_config(config)).parameters == 8_030_261_248


# -- bad input -------------------------------------------------------------------------------------------------


def _bare(tmp_path: Path, **fields: object) -> Path:
    shape = json.loads((SHAPES / "llama-3.1-8b.json").read_text())
    shape.update(fields)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({k: v for k, v in shape.items() if v is not None}))
    return path


@pytest.mark.parametrize(("fields", "message"), [
    ({"num_hidden_layers": None}, r"lacks num_hidden_layers, which the estimate needs"),
    ({"intermediate_size": None, "vocab_size": None}, r"lacks vocab_size, intermediate_size"),
    ({"model_type": "not_a_model"}, r"unknown architecture 'not_a_model'"),
    ({"model_type": None}, r"has no model_type"),
])
def test_a_config_missing_what_the_estimate_needs_is_refused(tmp_path: Path, fields: dict, message: str) -> None:
    config = validate(_raw(tmp_path, "grpo", 1, model={"policy": str(_bare(tmp_path, **fields))}))
    with pytest.raises(ModelError, match=message):
        make_plan(config)


def test_bad_device_memory_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match=r"--device-memory '80XB': not a memory size"):
        parse_memory("80XB")
    assert main(["plan", str(REPO / "recipes" / "grpo_arithmetic.yaml"), "--device-memory", "80XB"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "80XB" in err
    assert parse_memory("80GB") == 80 * 10**9 and parse_memory("141 GiB") == 141 * 2**30


def test_an_architecture_only_approximated_says_so(tmp_path: Path) -> None:
    opt = {"model_type": "opt", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "ffn_dim": 256,
           "vocab_size": 100, "word_embed_proj_dim": 64, "max_position_embeddings": 64}
    (tmp_path / "opt.json").write_text(json.dumps(opt))
    config = validate(_raw(tmp_path, "grpo", 1, model={"policy": str(tmp_path / "opt.json")}))
    lines = plan_lines(make_plan(config))
    assert any(line.startswith("note: 'opt' is approximated") for line in lines)
    assert "MLP 256" in "\n".join(lines)  # its width read off the widest linear (OPT names it ffn_dim)
    plain = plan_lines(make_plan(validate(_raw(tmp_path, "grpo", 1))))
    assert not any("approximated" in line for line in plain)
