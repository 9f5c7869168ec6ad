"""The supervised warm-up that gives the built-in model partial skill, so RL has something to improve.

Plain next-token training with the loss on the answer tokens only (the prompt is context, not a
target). Deterministic for a given seed and thread count.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

IGNORE = -100


class Example(Protocol):
    """A supervised example: the prompt (context) and the answer (the target), e.g. an arithmetic Problem."""

    @property
    def prompt(self) -> str: ...

    @property
    def answer(self) -> str: ...  # read-only, so a frozen dataclass (Problem) is an Example


def _batch(
    tokenizer: PreTrainedTokenizerBase, problems: list[Example]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (-100 outside answer + EOS)."""
    rows, labels = [], []
    for p in problems:
        # Same tokenisation as the RL trainer's prompts: tokenizer(prompt) adds the BOS.
        prompt_ids = tokenizer(p.prompt)["input_ids"]
        answer_ids = tokenizer(p.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt_ids + answer_ids)
        labels.append([IGNORE] * len(prompt_ids) + answer_ids)
    width = max(len(r) for r in rows)
    ids_B_T = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels_B_T = torch.full((len(rows), width), IGNORE)
    mask_B_T = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows, labels, strict=True)):
        ids_B_T[i, : len(r)] = torch.tensor(r)
        labels_B_T[i, : len(lab)] = torch.tensor(lab)
        mask_B_T[i, : len(r)] = 1
    return ids_B_T, mask_B_T, labels_B_T


def supervised_warmup(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[Example],
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Train ``model`` in place for ``steps`` AdamW steps; returns the loss per step."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses: list[float] = []
    bar = tqdm(range(steps), desc="warm-up (built once, then cached)", disable=not progress, mininterval=2.0)
    for step in bar:
        ids_B_T, mask_B_T, labels_B_T = _batch(tokenizer, rng.sample(problems, batch_size))
        loss = model(input_ids=ids_B_T, attention_mask=mask_B_T, labels=labels_B_T).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    model.eval()
    return losses
