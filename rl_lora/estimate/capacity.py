"""LoRA capacity estimate: adapter bits vs. the bits the training data carries, from shapes alone.

The adapter's parameters are counted from the model's shapes by rl_lora/adapters/counting.py; this module
weighs them against the data's bits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from rl_lora.adapters.counting import (
    MoePlan,
    adapter_parameter_count,
    adapter_type_parameter_count,
    full_parameter_count,
    lora_parameter_count,
    selected_linears,
    targeted_experts,
)

# Rough figures, not measurements of ours (docs/findings.md, docs/advisor.md). From the study: a
# network stores ~2 bits per parameter (a long-training storage limit, not a rate of learning); a
# policy-gradient episode carries at most ~1 bit (an upper bound that needs on-policy samples); SFT
# data <~1 bit per trained completion token. The study says nothing about preference data: 1 bit per
# distinct pair is rl-lora's own estimate. DPO's and Bradley-Terry's gradient for a pair is one scalar
# weight on (chosen - rejected), the shape of an episode's advantage, but the chosen answer comes from
# the data, not from the policy, so the on-policy reasoning behind the 1 bit does not carry over as is.
BITS_PER_PARAM = 2.0
BITS_PER_EPISODE = 1.0
BITS_PER_TOKEN = 1.0
BITS_PER_PAIR = 1.0
# Capacity / data within this factor either way is too close to call: the figures above are rough, and
# the study's own RL example had ~8x more rank-1 parameters than episode bits, a wide margin rather
# than a threshold (docs/findings.md). 2 is a judgement, not a fitted value; a sweep on the task decides.
CLEAR_MARGIN = 2.0

# Ranks above this are never worth estimating: the adapter would be as big as a full fine-tune.
MAX_SEARCH_RANK = 4096


def rl_data_bits(completions_per_step: int, steps: int) -> float:
    """Bits a policy-gradient run carries: one per episode (completions per step x steps)."""
    return BITS_PER_EPISODE * completions_per_step * steps


def token_data_bits(completion_tokens: int) -> float:
    """Bits an SFT run carries at most: one per trained completion token (the study's SFT bound)."""
    return BITS_PER_TOKEN * completion_tokens


def pair_data_bits(distinct_pairs: int) -> float:
    """Bits a DPO/reward-model run carries, by rl-lora's own estimate (not the study's): one per distinct
    preference pair, repeats adding none (BITS_PER_PAIR says why, and what it does not know)."""
    return BITS_PER_PAIR * distinct_pairs


def _smallest_sufficient_rank(per_rank_params: int, max_rank: int, data_bits: float) -> int | None:
    """The smallest rank whose capacity holds ``data_bits``, or None if none up to ``max_rank`` does."""
    # The count is exactly linear in rank, so the answer is a ceiling rather than a search.
    rank = max(1, math.ceil(data_bits / (BITS_PER_PARAM * per_rank_params)))
    return rank if rank <= max_rank else None


@dataclass(frozen=True)
class CapacityEstimate:
    """How many bits the adapter can store against how many the training data carries (both rough)."""

    lora_params: int
    capacity_bits: float
    data_bits: float
    verdict: str
    # The smallest rank whose capacity estimate reaches the data (margin >= 1), not a rank known to be enough.
    smallest_sufficient_rank: int | None
    # A full-parameter run: lora_params then counts the targeted linears' weights, and capacity is no limit.
    full: bool = False

    @property
    def margin(self) -> float:
        """Capacity / data bits (inf when the data carries none)."""
        return capacity_margin(self.capacity_bits, self.data_bits)


SMALLEST_LABEL = "smallest rank with capacity >= data (estimate)"


def capacity_margin(capacity_bits: float, data_bits: float) -> float:
    """Capacity / data bits; inf when the data carries none."""
    return capacity_bits / data_bits if data_bits > 0 else math.inf


def margin_text(margin: float) -> str:
    """'1.07x', '0.02x', '273x': two decimals below 10x, whole numbers above."""
    if math.isinf(margin):
        return "no data bits"
    return f"{margin:.2f}x" if margin < 10 else f"{margin:,.0f}x"


def _verdict(rank: int, capacity_bits: float, data_bits: float, smallest: int | None) -> str:
    """What the estimate can and cannot say: a margin of CLEAR_MARGIN or more either way, else too close to call."""
    margin = capacity_margin(capacity_bits, data_bits)
    figures = f"capacity {capacity_bits:,.0f} bits vs data ~{data_bits:,.0f} bits ({margin_text(margin)})"
    if margin >= CLEAR_MARGIN:
        return f"{figures}: capacity is unlikely to limit rank {rank}"
    if margin > 1 / CLEAR_MARGIN:
        return (
            f"{figures}: too close to call (bits per parameter and per episode or pair are rough estimates); "
            f"a sweep (rl-lora sweep RECIPE --ranks {rank},full) decides"
        )
    if smallest is None:
        return (
            f"{figures}: rank {rank} is likely too small and no LoRA rank reaches the data "
            "(LoRA learns more slowly past capacity; consider full fine-tuning)"
        )
    return (
        f"{figures}: rank {rank} is likely too small; the estimate reaches the data at rank >= {smallest} "
        "(LoRA learns more slowly past capacity)"
    )


def estimate(
    shapes: dict[str, tuple[int, int]],
    rank: int,
    targets: str | list[str],
    data_bits: float,
    moe: MoePlan | None = None,
) -> CapacityEstimate:
    """The capacity estimate for a rank-``rank`` LoRA on ``targets`` against ``data_bits`` of data.

    ``moe`` adds an MoE model's experts (at their own rank) and, if trained, its routers.
    """
    lora_params = adapter_parameter_count(shapes, rank, targets, moe)
    capacity_bits = BITS_PER_PARAM * lora_params
    # Past min(d_in, d_out) of the smallest targeted layer, a higher rank adds nothing there.
    dims = [min(shape) for shape in selected_linears(shapes, targets).values()]
    if moe is not None:
        dims += [min(a, b) for _, a, b in targeted_experts(moe.layout, targets).values()]
    max_rank = min(MAX_SEARCH_RANK, *dims)
    if moe is None:
        smallest = _smallest_sufficient_rank(lora_parameter_count(shapes, 1, targets), max_rank, data_bits)
    else:
        smallest = _smallest_rank_by_search(lambda r: adapter_parameter_count(shapes, r, targets, moe), max_rank,
                                            data_bits)
    return CapacityEstimate(
        lora_params=lora_params,
        capacity_bits=capacity_bits,
        data_bits=data_bits,
        verdict=_verdict(rank, capacity_bits, data_bits, smallest),
        smallest_sufficient_rank=smallest,
    )


def _smallest_rank_by_search(count: Callable[[int], int], max_rank: int, data_bits: float) -> int | None:
    """The smallest rank in 1..max_rank whose ``count(rank)`` parameters hold ``data_bits``, or None.

    With experts at rank // experts-per-token the count is monotone but not linear in rank: bisect.
    """
    if BITS_PER_PARAM * count(max_rank) < data_bits:
        return None
    low, high = 1, max_rank
    while low < high:
        mid = (low + high) // 2
        if BITS_PER_PARAM * count(mid) >= data_bits:
            high = mid
        else:
            low = mid + 1
    return low


def full_estimate(
    shapes: dict[str, tuple[int, int]], targets: str | list[str], data_bits: float, moe: MoePlan | None = None
) -> CapacityEstimate:
    """The estimate for a full-parameter run: the targeted weights, and the LoRA rank that would do.

    Capacity is not the limit of a full fine-tune (claim 2 is about LoRA falling behind it), so the
    verdict says so; the smallest rank whose capacity reaches the data is still reported, for choosing a
    LoRA to compare.
    On an MoE model the targeted experts' fused weights count too.
    """
    weights = full_parameter_count(shapes, targets) if selected_linears(shapes, targets) or moe is None else 0
    if moe is not None:
        weights += sum(e * a * b for e, a, b in targeted_experts(moe.layout, targets).values())
    lora = estimate(shapes, 1, targets, data_bits, moe)
    capacity_bits = BITS_PER_PARAM * weights
    verdict = (
        f"full-parameter run: {weights:,} weights ({capacity_bits:,.0f} bits) against data ~{data_bits:,.0f} bits; "
        "capacity is not a limit"
    )
    return CapacityEstimate(weights, capacity_bits, data_bits, verdict, lora.smallest_sufficient_rank, full=True)


def adapter_estimate(
    shapes: dict[str, tuple[int, int]],
    adapter: str,
    rank: int,
    targets: str | list[str],
    options: Mapping[str, Any],
    data_bits: float,
) -> CapacityEstimate:
    """The estimate for another PEFT adapter type (``lora.adapter``): its exact trainable count
    (rl_lora/adapters/counting.py) at the same bits per parameter; the smallest sufficient LoRA rank is reported
    to compare. Bits per parameter were measured for LoRA and full fine-tuning: for other types the figure is a
    guess, and the verdict says so."""
    params = adapter_type_parameter_count(shapes, adapter, rank, targets, options)
    capacity_bits = BITS_PER_PARAM * params
    lora = estimate(shapes, 1, targets, data_bits)
    margin = capacity_margin(capacity_bits, data_bits)
    figures = (f"{adapter} rank {rank}: {params:,} trainable, capacity {capacity_bits:,.0f} bits vs data "
               f"~{data_bits:,.0f} bits ({margin_text(margin)}; {BITS_PER_PARAM:g} bits per parameter is LoRA's "
               "figure, a guess for this type)")
    if margin >= CLEAR_MARGIN:
        verdict = f"{figures}: capacity is unlikely to limit it"
    elif margin > 1 / CLEAR_MARGIN:
        verdict = f"{figures}: too close to call; a sweep against full decides"
    else:
        verdict = f"{figures}: likely too small for the data"
    return CapacityEstimate(params, capacity_bits, data_bits, verdict, lora.smallest_sufficient_rank)
