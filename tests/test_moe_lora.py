"""LoRA on MoE models whose experts are fused 3-D parameters (transformers 5.x Qwen3-MoE, Mixtral).

One LoRA per expert at rank lora.rank // experts per token (docs/findings.md claim 4), the router
frozen unless lora.train_router. Checked three ways: the capacity count equals the parameters PEFT
trains with the config rl_lora.adapters.lora.peft_config builds; a GRPO run moves every expert adapter and no
base weight (the router included); and the keys that cannot work are refused.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from rl_lora.adapters.lora import count_parameters, peft_config
from rl_lora.config.schema import LoraSpec, validate
from rl_lora.estimate.advisor import recipe_capacity
from rl_lora.launch.runner import finish_run, prepare_run
from rl_lora.utils.errors import ConfigError
from tests_support import save_tiny_moe, tiny_raw

# PEFT 0.21.2 checks rank/alpha patterns against module names only and calls the fused experts' per-parameter
# keys "ignored"; the counts below show they apply (rl_lora/adapters/lora.py filters the same warning outside pytest).
# One pytest-xdist worker for the file (--dist loadgroup): its tests share fixtures built once.
pytestmark = [pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys:RuntimeWarning"),
              pytest.mark.xdist_group("moe_lora")]


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral"])
def moe_folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_moe(tmp_path_factory.mktemp(request.param), request.param)


def _peft_trainable(folder: Path, lora: LoraSpec) -> int:
    model = AutoModelForCausalLM.from_pretrained(folder)
    trainable, _ = count_parameters(get_peft_model(model, peft_config(lora, model=model)))
    return trainable


@pytest.mark.parametrize(
    "lora",
    [
        {"rank": 1},
        {"rank": 4},
        {"rank": 4, "train_router": True},
        {"rank": 4, "expert_rank": 3},
        {"rank": 2, "targets": ["q_proj", "gate_up_proj"]},
        {"rank": 2, "targets": ["down_proj"]},
        {"rank": 2, "targets": "attention"},
        {"rank": 2, "targets": "mlp"},
    ],
)
def test_capacity_count_equals_peft_trainable(moe_folder: Path, tmp_path: Path, lora: dict) -> None:
    config = validate(tiny_raw(tmp_path, model={"policy": str(moe_folder)}, lora=lora))
    assert recipe_capacity(config).lora_params == _peft_trainable(moe_folder, config.lora)


def test_counts_by_hand(moe_folder: Path, tmp_path: Path) -> None:
    """Rank 4 all-linear on 2 layers, hidden 64, 4 experts of MLP 32, 2 per token: expert rank 2.

    attention per layer: q (64->64) + k (64->32) + v (64->32) + o (64->64) = 4 x 448 = 1,792; x 2 = 3,584.
    gate_up_proj (4, 64, 64) at rank 2 x 2 = 4: 4 x 4 x 128 = 2,048; down_proj (4, 64, 32) at rank 2:
    2 x 4 x 96 = 768; experts per layer 2,816, x 2 = 5,632. Router (4 x 64) at rank 4: 4 x 68 = 272 per layer.
    """
    config = validate(tiny_raw(tmp_path, model={"policy": str(moe_folder)}, lora={"rank": 4}))
    assert recipe_capacity(config).lora_params == 3_584 + 5_632
    config = validate(tiny_raw(tmp_path, model={"policy": str(moe_folder)}, lora={"rank": 4, "train_router": True}))
    assert recipe_capacity(config).lora_params == 3_584 + 5_632 + 2 * 272


def test_dense_count_with_model_equals_peft(tmp_path: Path) -> None:
    from transformers import LlamaConfig

    model = AutoModelForCausalLM.from_config(
        LlamaConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, vocab_size=100)
    )
    trainable, _ = count_parameters(get_peft_model(model, peft_config(LoraSpec(rank=1), model=model)))
    assert trainable == 10_240  # 4 layers x (4 x 256 + 3 x 512): unchanged by passing the model


@pytest.mark.parametrize(("targets", "block", "params"), [("attention", "self_attn", 2 * 4 * 4 * 256),
                                                         ("mlp", "mlp", 2 * 4 * 3 * 512)])
def test_named_layer_sets_adapt_only_the_linears_of_their_blocks(targets: str, block: str, params: int) -> None:
    """'mlp' as a regex also matched the MLP's activation module, which PEFT refuses (a sweep's runs failed)."""
    from transformers import LlamaConfig

    model = AutoModelForCausalLM.from_config(
        LlamaConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, vocab_size=100)
    )
    wrapped = get_peft_model(model, peft_config(LoraSpec(rank=2, targets=targets), model=model))
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in wrapped.named_parameters() if ".lora_A" in name}
    assert len(adapted) == 4 * (4 if targets == "attention" else 3)
    assert all(f".{block}." in name for name in adapted)
    assert count_parameters(wrapped)[0] == params


def test_refused_keys(moe_folder: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(moe_folder)
    with pytest.raises(ConfigError, match="lora.dropout"):
        peft_config(LoraSpec(rank=2, dropout=0.1), model=model)
    from transformers import LlamaConfig

    dense = AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                         num_attention_heads=2, vocab_size=50))
    with pytest.raises(ConfigError, match="lora.train_router"):
        peft_config(LoraSpec(rank=2, train_router=True), model=dense)


def _snapshot(model: torch.nn.Module) -> dict[str, tuple[bool, torch.Tensor]]:
    return {n: (p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()}


def test_grpo_trains_every_expert_adapter_and_no_base_weight(moe_folder: Path, tmp_path: Path) -> None:
    raw = tiny_raw(tmp_path, model={"policy": str(moe_folder)}, lora={"rank": 4}, train={"threads": 1})
    config = validate(raw)
    run = prepare_run(config)
    before = _snapshot(run.trainer.model)
    run.trainer.train()
    after = _snapshot(run.trainer.model)
    result = finish_run(run, train_seconds=0.0)

    trainable = [n for n, (grad, _) in before.items() if grad]
    frozen = [n for n, (grad, _) in before.items() if not grad]
    assert trainable and all("lora_" in n for n in trainable)
    experts = [n for n in trainable if ".mlp.experts." in n]
    # 2 layers x 2 fused parameters (gate_up_proj, down_proj) x (A, B)
    assert len(experts) == 2 * 2 * 2
    unchanged = [n for n in trainable if torch.equal(before[n][1], after[n][1])]
    assert not unchanged, f"LoRA parameters that did not train: {unchanged}"
    routers = [n for n in frozen if ".mlp.gate." in n]
    assert len(routers) == 2
    moved = [n for n in frozen if not torch.equal(before[n][1], after[n][1])]
    assert not moved, f"frozen parameters that changed (router or base): {moved}"
    assert result.summary["trainable_params"] == recipe_capacity(config).lora_params
