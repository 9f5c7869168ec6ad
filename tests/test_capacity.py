"""The LoRA capacity estimate: parameter counts from meta-device shapes, checked by hand and against PEFT."""

from __future__ import annotations

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from rl_lora.adapters.counting import full_parameter_count, linear_shapes, lora_parameter_count, parameter_count
from rl_lora.estimate.capacity import (
    CapacityEstimate,
    estimate,
    full_estimate,
    margin_text,
    rl_data_bits,
    token_data_bits,
)
from rl_lora.utils.errors import ConfigError

LLAMA_8B_RANK1 = 2_621_440  # 32 layers x 81,920 (docs/findings.md)
TINY_RANK1 = 10_240


def _tiny_llama() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=100,
    )


def _tiny_moe() -> transformers.PretrainedConfig:
    return transformers.Qwen3MoeConfig(
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=100,
    )


def _peft_trainable(model: torch.nn.Module) -> dict[str, int]:
    """{parameter name: numel} of what PEFT's rank-1 "all-linear" LoRA makes trainable on ``model``."""
    peft_model = get_peft_model(model, LoraConfig(r=1, lora_alpha=32, target_modules="all-linear"))
    return {name: p.numel() for name, p in peft_model.named_parameters() if p.requires_grad}


def _llama_8b_config() -> LlamaConfig:
    """Llama-3.1-8B's shape (no weights are ever allocated for it here)."""
    return LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    )


@pytest.fixture(scope="module")
def llama_8b_shapes() -> dict[str, tuple[int, int]]:
    # Meta device: the 8B model is built without allocating its weights.
    return linear_shapes(_llama_8b_config())


def test_llama_8b_rank1_all_linear(llama_8b_shapes: dict[str, tuple[int, int]]) -> None:
    assert len(llama_8b_shapes) == 32 * 7  # q, k, v, o, gate, up, down; lm_head excluded
    assert "lm_head" not in llama_8b_shapes
    assert lora_parameter_count(llama_8b_shapes, 1, "all-linear") == LLAMA_8B_RANK1


def test_llama_8b_count_is_linear_in_rank(llama_8b_shapes: dict[str, tuple[int, int]]) -> None:
    assert lora_parameter_count(llama_8b_shapes, 8, "all-linear") == 8 * LLAMA_8B_RANK1


def test_llama_8b_q_and_v_only(llama_8b_shapes: dict[str, tuple[int, int]]) -> None:
    """q_proj is 4096 -> 4096 (32 heads x 128): 4096 + 4096 = 8,192 per layer at rank 1.

    v_proj is 4096 -> 1024 (8 KV heads x 128): 4096 + 1024 = 5,120. Together 13,312 per layer,
    x 32 layers = 425,984.
    """
    assert lora_parameter_count(llama_8b_shapes, 1, ["q_proj", "v_proj"]) == 32 * (4096 + 4096 + 4096 + 1024)
    assert lora_parameter_count(llama_8b_shapes, 1, ["q_proj", "v_proj"]) == 425_984


def test_tiny_llama_matches_peft() -> None:
    cfg = _tiny_llama()
    count = lora_parameter_count(linear_shapes(cfg), 1, "all-linear")
    assert count == TINY_RANK1  # 4 layers x (4 x (128 + 128) + 3 x (128 + 384))
    torch.manual_seed(0)
    assert sum(_peft_trainable(LlamaForCausalLM(cfg)).values()) == count


def _strip_lora_suffix(param_name: str) -> str:
    """'base_model.model.X.lora_A.default.weight' -> 'X', the adapted module's name."""
    module = param_name.removeprefix("base_model.model.")
    return module.split(".lora_", 1)[0]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_moe_linear_coverage() -> None:
    """What linear_shapes covers on an MoE model (Qwen3-MoE, transformers 5.x).

    The experts are one ``Qwen3MoeExperts`` module per layer holding fused 3-D parameters
    (``mlp.experts.gate_up_proj`` (E, 2 x moe_inter, hidden), ``mlp.experts.down_proj``
    (E, hidden, moe_inter)), and the router ``mlp.gate`` is a ``Qwen3MoeTopKRouter``, not an
    ``nn.Linear``. So only the attention projections are listed, and they agree with PEFT exactly;
    PEFT's "all-linear" additionally adapts the experts and the router as parameters.
    """
    cfg = _tiny_moe()
    shapes = linear_shapes(cfg)
    assert shapes
    assert {name.rsplit(".", 1)[-1] for name in shapes} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert len(shapes) == 4 * cfg.num_hidden_layers

    trainable = _peft_trainable(AutoModelForCausalLM.from_config(cfg))
    on_linears = sum(n for name, n in trainable.items() if _strip_lora_suffix(name) in shapes)
    assert on_linears == lora_parameter_count(shapes, 1, "all-linear")
    others = {_strip_lora_suffix(name) for name in trainable if _strip_lora_suffix(name) not in shapes}
    assert all(".mlp.experts" in name or name.endswith(".mlp.gate") for name in others), others


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_moe_all_linear_matches_peft() -> None:
    cfg = _tiny_moe()
    with torch.device("meta"):
        meta_model = AutoModelForCausalLM.from_config(cfg)
    fused = sorted(name for name, p in meta_model.named_parameters() if p.dim() == 3)
    if fused:
        pytest.skip(
            f"MoE experts are fused 3-D parameters in transformers {transformers.__version__} ({fused[0]}, ...), "
            "not nn.Linear; PEFT adapts them as parameters, which linear_shapes does not count"
        )
    count = lora_parameter_count(linear_shapes(cfg), 1, "all-linear")
    assert sum(_peft_trainable(AutoModelForCausalLM.from_config(cfg)).values()) == count


def test_unknown_targets_raise_config_error() -> None:
    shapes = linear_shapes(_tiny_llama())
    with pytest.raises(ConfigError, match="qkv_proj") as err:
        lora_parameter_count(shapes, 1, ["qkv_proj"])
    assert "q_proj" in str(err.value)  # lists what is available


def test_data_bits() -> None:
    assert rl_data_bits(64, 400) == 25_600
    assert token_data_bits(1_000) == 1_000


def test_estimate_verdicts() -> None:
    """Tiny Llama, rank 1: 10,240 parameters x 2 bits = 20,480 bits, against 64 x 400 = 25,600 episodes.

    20,480 / 25,600 = 0.80x: within a factor of 2 either way, so too close to call, and the verdict says
    the figures are rough and names the sweep that decides. ceil(25,600 / 20,480) = 2: rank 2 (40,960
    bits) is the smallest whose estimate reaches the data.
    """
    shapes = linear_shapes(_tiny_llama())
    close = estimate(shapes, 1, "all-linear", rl_data_bits(64, 400))
    assert close == CapacityEstimate(
        lora_params=10_240,
        capacity_bits=20_480.0,
        data_bits=25_600.0,
        verdict="capacity 20,480 bits vs data ~25,600 bits (0.80x): too close to call (bits per parameter and"
        " per episode or pair are rough estimates); a sweep (rl-lora sweep RECIPE --ranks 1,full) decides",
        smallest_sufficient_rank=2,
    )
    assert close.margin == 0.8

    # Rank 2: 40,960 / 25,600 = 1.60x, still too close; rank 4: 81,920 / 25,600 = 3.20x.
    assert "(1.60x): too close to call" in estimate(shapes, 2, "all-linear", 25_600).verdict
    assert estimate(shapes, 4, "all-linear", 25_600).verdict == (
        "capacity 81,920 bits vs data ~25,600 bits (3.20x): capacity is unlikely to limit rank 4"
    )


def test_verdict_bands_at_a_factor_of_two() -> None:
    """The bands' edges: 2x is clear above, 0.5x clear below; just inside either edge is too close to call.

    Rank 1 holds 20,480 bits: data 10,240 is 2.00x, 10,241 is 1.9998x; data 40,960 is 0.50x (64 x 640
    episodes), 40,959 is 0.500012x. At 40,960 bits rank 2 (40,960 bits) is the smallest that reaches the data.
    """
    shapes = linear_shapes(_tiny_llama())
    assert "unlikely to limit rank 1" in estimate(shapes, 1, "all-linear", 10_240).verdict
    assert "too close to call" in estimate(shapes, 1, "all-linear", 10_241).verdict
    assert "too close to call" in estimate(shapes, 1, "all-linear", 40_959).verdict
    below = estimate(shapes, 1, "all-linear", rl_data_bits(64, 640))
    assert below.verdict == (
        "capacity 20,480 bits vs data ~40,960 bits (0.50x): rank 1 is likely too small; the estimate reaches the"
        " data at rank >= 2 (LoRA learns more slowly past capacity)"
    )
    for est in (below, estimate(shapes, 1, "all-linear", 19_200), estimate(shapes, 1, "all-linear", 10_240)):
        assert "is enough" not in est.verdict


def test_margin_text() -> None:
    assert margin_text(20_480 / 19_200) == "1.07x"  # the default recipe
    assert margin_text(8_192 / 512_000) == "0.02x"
    assert margin_text(5_242_880 / 19_200) == "273x"
    assert margin_text(float("inf")) == "no data bits"


def test_estimate_beyond_full_rank() -> None:
    # The smallest layer is 128 x 128, so rank 128 (128 x 20,480 = 2,621,440 bits) is the ceiling.
    shapes = linear_shapes(_tiny_llama())
    assert estimate(shapes, 1, "all-linear", 2_621_440).smallest_sufficient_rank == 128
    over = estimate(shapes, 1, "all-linear", 2_621_441)
    assert over.smallest_sufficient_rank is None
    assert "rank 1 is likely too small and no LoRA rank reaches the data" in over.verdict


def test_llama_8b_full_weights(llama_8b_shapes: dict[str, tuple[int, int]]) -> None:
    """Per layer: q, o 4096 x 4096; k, v 4096 x 1024; gate, up, down 4096 x 14336.

    2 x 16,777,216 + 2 x 4,194,304 + 3 x 58,720,256 = 218,103,808; x 32 layers = 6,979,321,856.
    """
    assert full_parameter_count(llama_8b_shapes, "all-linear") == 6_979_321_856
    est = full_estimate(llama_8b_shapes, "all-linear", rl_data_bits(64, 400))
    assert est.full and est.lora_params == 6_979_321_856
    assert "capacity is not a limit" in est.verdict


def test_llama_8b_parameter_count() -> None:
    """Embeddings and untied head 2 x 128,256 x 4096 = 1,050,673,152; 32 layers x (218,103,808 linear
    weights + 2 x 4096 norms) = 6,979,584,000; final norm 4096. Total 8,030,261,248 (Llama-3.1-8B's size).
    """
    assert parameter_count(_llama_8b_config()) == 8_030_261_248
