"""Greedy completions of held-out prompts: what every task's held-out evaluation scores."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedTokenizerBase


@torch.no_grad()
def greedy_completions(
    model: Any,  # a causal LM or PEFT's wrapper of one: transformers 5's PreTrainedModel declares no generate
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 256,
) -> list[str]:
    """Greedy completions, decoded without special tokens, in the order of ``prompts``."""
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
    out: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True)
            batch = batch.to(model.device)
            generated_B_T = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            completion_B_T = generated_B_T[:, batch["input_ids"].shape[1] :]
            out.extend(tokenizer.batch_decode(completion_B_T, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out
