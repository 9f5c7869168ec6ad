"""LoRA adapters through PEFT: the spec -> a LoraConfig, and parameter counts."""

from __future__ import annotations

from peft import LoraConfig
from torch import nn

from rl_lora.config import LoraSpec


def peft_config(spec: LoraSpec, task_type: str = "CAUSAL_LM") -> LoraConfig | None:
    """PEFT's LoraConfig for ``spec``, or None for the full-parameter baseline.

    alpha is fixed (32 by default) rather than scaled with rank: with alpha/r scaling the optimal LR
    barely depends on rank (docs/findings.md, claim 5). B starts at zero, so a fresh adapter leaves
    the policy exactly equal to the base model. ``task_type="SEQ_CLS"`` (reward models) also trains
    the freshly initialised classification head in full: PEFT adds ``score`` to ``modules_to_save``.
    """
    if spec.is_full:
        return None
    return LoraConfig(
        r=int(spec.rank),
        lora_alpha=spec.alpha,
        target_modules=spec.targets,
        lora_dropout=spec.dropout,
        bias="none",
        task_type=task_type,
    )


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; for a PEFT model the total includes the adapter."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total
