"""Held-out evaluation: greedy exact-answer accuracy of a policy on problems it never trained on."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rl_lora.tasks.arithmetic import Problem, extract_answer


@torch.no_grad()
def greedy_completions(
    model: PreTrainedModel,
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


def exact_answer_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: list[Problem],
    max_new_tokens: int,
) -> float:
    """Fraction of problems whose greedy completion's answer, read by the problem's rule, is exactly right."""
    completions = greedy_completions(model, tokenizer, [p.prompt for p in problems], max_new_tokens)
    correct = sum(extract_answer(c, p.rule) == p.answer for c, p in zip(completions, problems, strict=True))
    return correct / len(problems)
