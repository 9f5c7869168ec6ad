"""Fast LoRA rollouts: merged generation equals unmerged generation, and nothing is left changed.

PEFT's own merge tests start from non-zero adapters, because a fresh LoRA (B = 0) changes nothing and
hides bugs; so do these.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from rl_lora.adapters.rollout import merged_adapters
from rl_lora.tasks.arithmetic.model import tiny_llama_config
from rl_lora.tasks.arithmetic.tokenizer import build_char_tokenizer
from rl_lora.tasks.evaluation import greedy_completions

PROMPTS = ["12+35=", "99+99=", "10+1=", "57+68=", "3+4=", "80+19="]


def _policy(rank: int = 2):
    tok = build_char_tokenizer()
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config(len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id))
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=32, target_modules="all-linear"))
    with torch.no_grad():  # non-zero B, so the adapter really changes the outputs
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model.eval(), tok


def _state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_merged_greedy_generations_are_identical_and_state_is_restored() -> None:
    model, tok = _policy()
    before = _state(model)
    plain = greedy_completions(model, tok, PROMPTS, max_new_tokens=6)
    with merged_adapters(model):
        merged = greedy_completions(model, tok, PROMPTS, max_new_tokens=6)
    with model.disable_adapter():
        base_only = greedy_completions(model, tok, PROMPTS, max_new_tokens=6)
    assert merged == plain
    assert base_only != plain, "the adapter must matter, or this test proves nothing"
    after = _state(model)
    assert all(torch.equal(before[n], after[n]) for n in before), "weights changed across a merged rollout"


def test_merged_logits_match_within_fp32_rounding() -> None:
    model, tok = _policy()
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        plain = model(**batch).logits
        with merged_adapters(model):
            merged = model(**batch).logits
        again = model(**batch).logits
    assert (plain - merged).abs().max().item() < 1e-5
    assert torch.equal(plain, again), "after the block the model computes exactly what it did before"


def test_restores_even_when_generation_raises() -> None:
    model, _ = _policy()
    before = _state(model)
    try:
        with merged_adapters(model):
            raise RuntimeError("generation failed")
    except RuntimeError:
        pass
    after = _state(model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    from peft.tuners.lora import LoraLayer

    assert not any(m.disable_adapters for m in model.modules() if isinstance(m, LoraLayer))


def test_plain_model_passes_through() -> None:
    tok = build_char_tokenizer()
    base = LlamaForCausalLM(tiny_llama_config(len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id))
    with merged_adapters(base) as m:
        assert m is base


def test_fused_merge_equals_peft_delta_and_dora_is_left_unmerged() -> None:
    from rl_lora.adapters.rollout import _adapted_linears, _merged_weight

    model, tok = _policy(rank=3)
    for _, _, layer in _adapted_linears(model):
        weight = layer.get_base_layer().weight
        expected = weight + layer.get_delta_weight("default")
        assert torch.allclose(_merged_weight(layer), expected, atol=1e-6, rtol=0)

    base = LlamaForCausalLM(tiny_llama_config(len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id))
    dora = get_peft_model(base, LoraConfig(r=2, lora_alpha=32, target_modules="all-linear", use_dora=True))
    assert _adapted_linears(dora) == []
    with torch.no_grad():
        for name, p in dora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        plain = dora(**batch).logits
        with merged_adapters(dora):
            merged = dora(**batch).logits
    assert torch.equal(plain, merged)


def test_two_adapters_merge_only_the_active_one() -> None:
    """PPO's layout: policy and value adapters on one base; rollouts fold in the policy adapter only."""
    model, tok = _policy()
    model.add_adapter("value", LoraConfig(r=2, lora_alpha=32, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name and ".value." in name:
                p.normal_(0, 0.05)
    model.set_adapter("default")
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        model.set_adapter("value")
        value_before = model(**batch).logits
        model.set_adapter("default")
    before = _state(model)
    plain = greedy_completions(model, tok, PROMPTS, max_new_tokens=6)
    with merged_adapters(model):
        merged = greedy_completions(model, tok, PROMPTS, max_new_tokens=6)
    assert merged == plain
    assert all(torch.equal(before[n], p.detach()) for n, p in model.named_parameters())
    with torch.no_grad():
        model.set_adapter("value")
        assert torch.equal(model(**batch).logits, value_before)
