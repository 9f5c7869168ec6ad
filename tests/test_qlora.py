"""QLoRA: ``model.quantization: nf4`` trains full-precision LoRA adapters on a 4-bit NF4 base.

Needs bitsandbytes (``pip install 'rl-lora[qlora]'``); skipped without it. On CPU bitsandbytes 0.50
quantises and runs the 4-bit matmuls in fp32 (``bnb_4bit_compute_dtype``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rl_lora.config.schema import validate
from rl_lora.launch.runner import finish_run, prepare_run
from rl_lora.utils.errors import ConfigError
from tests_support import tiny_raw

FP32_BASE_BYTES = 865_920 * 4  # the built-in model's parameters (tests/test_grpo_training.py), 4 bytes each


def test_nf4_is_refused_for_full_fine_tuning_and_other_algorithms(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model.quantization"):
        validate(tiny_raw(tmp_path, model={"quantization": "nf4"}, lora={"rank": "full"}))
    raw = tiny_raw(tmp_path, model={"quantization": "nf4"})
    raw["algorithm"] = "reward"
    for section in ("grpo", "reward"):
        raw.pop(section)
    with pytest.raises(ConfigError, match="model.quantization"):
        validate(raw)


def test_gradients_flow_through_the_4_bit_base_after_a_no_grad_forward() -> None:
    """The input gradient of a 4-bit layer equals that of its dequantised weight, after an eval forward.

    y = x W^T, so dL/dx = dL/dy W for the dequantised W; a repacked (gemv_4bit) layer returns no gradient.
    """
    bnb = pytest.importorskip("bitsandbytes")
    from rl_lora.models.loading import keep_4bit_layers_differentiable

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.load_state_dict({"weight": torch.randn(32, 64)})
    layer = layer.to("cpu")
    assert keep_4bit_layers_differentiable(layer) == 1
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(3, 64))
    layer.train()
    x = torch.randn(3, 64, requires_grad=True)
    layer(x).sum().backward()
    dequantized = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    torch.testing.assert_close(x.grad, torch.ones(3, 32) @ dequantized, rtol=1e-5, atol=1e-5)


def test_qlora_grpo_trains_adapters_on_a_4_bit_base(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    raw = tiny_raw(tmp_path, model={"quantization": "nf4", "warmup_steps": 20}, train={"threads": 1})
    run = prepare_run(validate(raw))
    before = {n: p.detach().clone() for n, p in run.trainer.model.named_parameters()}
    trainable = {n for n, p in run.trainer.model.named_parameters() if p.requires_grad}
    quantized = [n for n, p in run.trainer.model.named_parameters() if type(p).__name__ == "Params4bit"]
    assert len(quantized) == 4 * 7  # every attention and MLP linear of the 4 layers
    run.trainer.train()
    after = dict(run.trainer.model.named_parameters())
    result = finish_run(run, train_seconds=0.0)

    assert trainable and all("lora_" in n for n in trainable)
    assert all(after[n].dtype == torch.float32 for n in trainable)  # adapters in full precision
    assert not [n for n in trainable if torch.equal(before[n], after[n])], "LoRA parameters that did not train"
    assert not [n for n in before if n not in trainable and not torch.equal(before[n], after[n].detach())]
    summary = result.summary
    assert summary["trainable_params"] == 10_240
    assert summary["total_params"] == 865_920 + 10_240  # 4-bit weights counted as weights, not packed bytes
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["step"] > 0]
    assert steps and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    # Rollouts and evaluations ran no-grad forwards; the weights must still be in the differentiable format.
    states = [p.quant_state for n, p in run.trainer.model.named_parameters() if n in quantized]
    assert not [s for s in states if getattr(s, "packing_format_for_cpu", False)]
    base_bytes = steps[-1]["param_bytes"] - steps[-1]["trainable_param_bytes"]
    assert base_bytes <= 0.3 * FP32_BASE_BYTES, (base_bytes, FP32_BASE_BYTES)


def test_qlora_dpo_trains_adapters_on_a_4_bit_base(tmp_path: Path) -> None:
    """DPO on a 4-bit base: fp32 adapters train (TRL would cast them to bf16), the base stays 4-bit and frozen."""
    pytest.importorskip("bitsandbytes")
    raw = tiny_raw(tmp_path, model={"quantization": "nf4", "warmup_steps": 20},
                   data={"max_operand": 30, "eval_size": 20}, train={"batch_size": 8, "threads": 1})
    raw = {k: v for k, v in raw.items() if k not in ("grpo", "reward")} | {"algorithm": "dpo"}
    run = prepare_run(validate(raw))
    model = run.trainer.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert len([n for n, p in model.named_parameters() if type(p).__name__ == "Params4bit"]) == 4 * 7
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n in trainable)
    run.trainer.train()
    after = dict(model.named_parameters())
    result = finish_run(run, train_seconds=0.0)

    moved = [n for n in trainable if not torch.equal(before[n], after[n].detach())]
    assert any("lora_B" in n for n in moved), "no adapter trained"
    assert not [n for n in before if n not in trainable and not torch.equal(before[n], after[n].detach())]
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["step"] > 0]
    assert steps and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    assert steps[-1]["param_bytes"] - steps[-1]["trainable_param_bytes"] <= 0.3 * FP32_BASE_BYTES
    assert result.summary["reference_param_bytes"] == 0  # the reference is the adapter-off 4-bit policy


def test_qlora_ppo_trains_policy_and_value_adapters_on_one_4_bit_base(tmp_path: Path) -> None:
    """PPO on a 4-bit base: policy and value adapters (fp32) both train, the shared 4-bit base stays frozen."""
    pytest.importorskip("bitsandbytes")
    raw = tiny_raw(tmp_path, model={"quantization": "nf4", "warmup_steps": 20}, train={"threads": 1},
                   ppo={"samples_per_prompt": 4, "max_completion_length": 4, "epochs": 2, "minibatch_size": 8})
    raw["algorithm"] = "ppo"
    del raw["grpo"]  # a PPO recipe has no GRPO section
    run = prepare_run(validate(raw))
    model = run.trainer.ac.policy
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert len([n for n, p in model.named_parameters() if type(p).__name__ == "Params4bit"]) == 4 * 7
    run.trainer.train()
    moved = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    result = finish_run(run, train_seconds=0.0)

    assert moved and moved <= trainable, "a frozen (4-bit) weight changed"
    assert {".default." in n for n in moved if "lora_B" in n} == {True, False}, "policy and value adapters both train"
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n in trainable)
    # Policy, critic and reference share one 4-bit base: all of it, adapters and value head included, is
    # about 0.17x what one fp32 base holds.
    assert result.summary["ppo_param_bytes"] <= 0.3 * FP32_BASE_BYTES
    with pytest.raises(ConfigError, match="not tested under DeepSpeed"):
        validate({**raw, "distributed": {"zero_stage": 2}})
