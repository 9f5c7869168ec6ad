"""LoRA capacity estimate: adapter bits vs. the bits the training data carries, from shapes alone.

A rank-r adapter on a linear layer (d_in -> d_out) adds r * (d_in + d_out) parameters (A is r x d_in,
B is d_out x r). The shapes come from the model built on the meta device, so an 8B config costs no
memory and no download of weights.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM

from rl_lora.errors import ConfigError

# docs/findings.md, claims 1-2: a network stores ~2 bits per parameter; policy-gradient RL carries
# ~1 bit per episode, and SFT/DPO/reward-model training ~1 bit per trained completion token.
BITS_PER_PARAM = 2.0
BITS_PER_EPISODE = 1.0
BITS_PER_TOKEN = 1.0

ALL_LINEAR = "all-linear"
# Ranks above this are never worth estimating: the adapter would be as big as a full fine-tune.
MAX_SEARCH_RANK = 4096


def _meta_model(config: transformers.PretrainedConfig, trust_remote_code: bool) -> nn.Module:
    # Meta tensors carry shapes but no storage: an 8B model builds in ~20 ms and allocates nothing.
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def linear_shapes(config: transformers.PretrainedConfig, trust_remote_code: bool = False) -> dict[str, tuple[int, int]]:
    """{module name: (in_features, out_features)} of every ``nn.Linear`` except the output head.

    The model is built on the meta device, so this works for any architecture transformers knows
    from its config alone. Only ``nn.Linear`` modules are listed: MoE experts stored as fused 3-D
    parameters (transformers 5.x) and custom router modules are not, although PEFT's "all-linear"
    may still adapt them for some MoE families.
    """
    model = _meta_model(config, trust_remote_code)
    # The head maps to the vocabulary; "all-linear" leaves it out, as PEFT does.
    head = model.get_output_embeddings()
    return {
        name: (module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module is not head
    }


def parameter_count(config: transformers.PretrainedConfig, trust_remote_code: bool = False) -> int:
    """Every parameter of the model ``config`` describes (tied weights once), counted on the meta device."""
    return sum(p.numel() for p in _meta_model(config, trust_remote_code).parameters())


def targeted_shapes(shapes: dict[str, tuple[int, int]], targets: str | list[str]) -> dict[str, tuple[int, int]]:
    """The subset of ``shapes`` that ``targets`` selects, with PEFT's matching rules.

    Raises ConfigError, listing the available short names, when ``targets`` selects nothing.
    """
    if isinstance(targets, str):
        if targets.lower() == ALL_LINEAR:
            return dict(shapes)
        # PEFT treats any other string as a regex over the full module name.
        selected = {name: shape for name, shape in shapes.items() if re.fullmatch(targets, name)}
    else:
        wanted = set(targets)
        selected = {name: shape for name, shape in shapes.items() if name.rsplit(".", 1)[-1] in wanted}
    if not selected:
        available = sorted({name.rsplit(".", 1)[-1] for name in shapes})
        raise ConfigError(f"LoRA targets {targets!r} match no linear layer; available: {', '.join(available)}")
    return selected


def lora_parameter_count(shapes: dict[str, tuple[int, int]], rank: int, targets: str | list[str]) -> int:
    """Parameters of a rank-``rank`` LoRA on the modules of ``shapes`` that ``targets`` selects.

    ``targets`` is "all-linear" (every module in ``shapes``), a list of short names matched against
    each module's last dotted component (e.g. ["q_proj", "v_proj"]), or a regex over full names.
    """
    if rank < 1:
        raise ConfigError(f"LoRA rank must be >= 1, got {rank}")
    return rank * sum(d_in + d_out for d_in, d_out in targeted_shapes(shapes, targets).values())


def full_parameter_count(shapes: dict[str, tuple[int, int]], targets: str | list[str]) -> int:
    """Weights of the linears ``targets`` selects (d_in x d_out each; biases, where a layer has one, not counted)."""
    return sum(d_in * d_out for d_in, d_out in targeted_shapes(shapes, targets).values())


def rl_data_bits(completions_per_step: int, steps: int) -> float:
    """Bits a policy-gradient run carries: one per episode (completions per step x steps)."""
    return BITS_PER_EPISODE * completions_per_step * steps


def token_data_bits(completion_tokens: int) -> float:
    """Bits an SFT/DPO/reward-model run carries: one per trained completion token."""
    return BITS_PER_TOKEN * completion_tokens


def _smallest_sufficient_rank(per_rank_params: int, max_rank: int, data_bits: float) -> int | None:
    """The smallest rank whose capacity holds ``data_bits``, or None if none up to ``max_rank`` does."""
    # The count is exactly linear in rank, so the answer is a ceiling rather than a search.
    rank = max(1, math.ceil(data_bits / (BITS_PER_PARAM * per_rank_params)))
    return rank if rank <= max_rank else None


@dataclass(frozen=True)
class CapacityEstimate:
    """How many bits the adapter can store against how many the training data carries."""

    lora_params: int
    capacity_bits: float
    data_bits: float
    verdict: str
    smallest_sufficient_rank: int | None
    # A full-parameter run: lora_params then counts the targeted linears' weights, and capacity is no limit.
    full: bool = False

    def lines(self) -> list[str]:
        """A short human-readable report, one line per figure."""
        smallest = self.smallest_sufficient_rank
        label = "full weights (targeted): " if self.full else "LoRA parameters:          "
        return [
            f"{label}{self.lora_params:,}",
            f"capacity:                 {self.capacity_bits:,.0f} bits",
            f"data (estimate):          ~{self.data_bits:,.0f} bits",
            f"smallest sufficient rank: {'none up to full rank' if smallest is None else smallest}",
            f"verdict: {self.verdict}",
        ]


def _verdict(rank: int, capacity_bits: float, data_bits: float, smallest: int | None) -> str:
    if capacity_bits >= data_bits:
        return f"capacity {capacity_bits:,.0f} bits >= data ~{data_bits:,.0f} bits: rank {rank} is enough"
    short = f"rank {rank} holds {capacity_bits:,.0f} bits < data ~{data_bits:,.0f} bits"
    if smallest is None:
        return f"{short}: no LoRA rank holds it (LoRA will learn more slowly past capacity; consider full fine-tuning)"
    return f"{short}: use rank >= {smallest} (LoRA will learn more slowly past capacity)"


def estimate(
    shapes: dict[str, tuple[int, int]], rank: int, targets: str | list[str], data_bits: float
) -> CapacityEstimate:
    """The capacity estimate for a rank-``rank`` LoRA on ``targets`` against ``data_bits`` of data."""
    lora_params = lora_parameter_count(shapes, rank, targets)
    capacity_bits = BITS_PER_PARAM * lora_params
    # Past min(d_in, d_out) of the smallest targeted layer, a higher rank adds nothing there.
    max_rank = min(MAX_SEARCH_RANK, *(min(shape) for shape in targeted_shapes(shapes, targets).values()))
    smallest = _smallest_sufficient_rank(lora_parameter_count(shapes, 1, targets), max_rank, data_bits)
    return CapacityEstimate(
        lora_params=lora_params,
        capacity_bits=capacity_bits,
        data_bits=data_bits,
        verdict=_verdict(rank, capacity_bits, data_bits, smallest),
        smallest_sufficient_rank=smallest,
    )


def full_estimate(shapes: dict[str, tuple[int, int]], targets: str | list[str], data_bits: float) -> CapacityEstimate:
    """The estimate for a full-parameter run: the targeted linears' weights, and the LoRA rank that would do.

    Capacity is not the limit of a full fine-tune (claim 2 is about LoRA falling behind it), so the
    verdict says so; the smallest sufficient rank is still reported, for choosing a LoRA to compare.
    """
    weights = full_parameter_count(shapes, targets)
    lora = estimate(shapes, 1, targets, data_bits)
    capacity_bits = BITS_PER_PARAM * weights
    verdict = (
        f"full-parameter run: {weights:,} weights ({capacity_bits:,.0f} bits) against data ~{data_bits:,.0f} bits; "
        "capacity is not a limit"
    )
    return CapacityEstimate(weights, capacity_bits, data_bits, verdict, lora.smallest_sufficient_rank, full=True)
