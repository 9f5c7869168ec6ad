"""LoRA capacity estimate: adapter bits vs. the bits the training data carries, from shapes alone.

A rank-r adapter on a linear layer (d_in -> d_out) adds r * (d_in + d_out) parameters (A is r x d_in,
B is d_out x r). The shapes come from the model built on the meta device, so an 8B config costs no
memory and no download of weights.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM

from rl_lora.errors import ConfigError, ModelError
from rl_lora.targets import ALL_LINEAR, resolve_targets

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


def meta_model(config: transformers.PretrainedConfig, trust_remote_code: bool = False) -> nn.Module:
    """The model ``config`` describes, on the meta device: shapes without storage."""
    # Meta tensors carry shapes but no storage: an 8B model builds in ~20 ms and allocates nothing.
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def linear_shapes(config: transformers.PretrainedConfig, trust_remote_code: bool = False) -> dict[str, tuple[int, int]]:
    """{module name: (in_features, out_features)} of every ``nn.Linear`` except the output head.

    The model is built on the meta device, so this works for any architecture transformers knows
    from its config alone. Only ``nn.Linear`` modules are listed: MoE experts stored as fused 3-D
    parameters (transformers 5.x) and routers are not; ``moe_layout`` lists those.
    """
    return model_linear_shapes(meta_model(config, trust_remote_code))


def model_linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """linear_shapes of a built model: every ``nn.Linear`` but the output head and MoE routers."""
    # The head maps to the vocabulary; "all-linear" leaves it out, as PEFT does.
    head = model.get_output_embeddings()
    layout = moe_layout(model)
    # A router stored as an nn.Linear stays frozen unless lora.train_router (counted with the experts).
    routers = set(layout.routers) if layout is not None else set()
    return {
        name: (module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module is not head and name not in routers
    }


def parameter_count(config: transformers.PretrainedConfig, trust_remote_code: bool = False) -> int:
    """Every parameter of the model ``config`` describes (tied weights once), counted on the meta device."""
    return model_parameter_count(meta_model(config, trust_remote_code))


def model_parameter_count(model: nn.Module) -> int:
    """parameter_count of a built model."""
    return sum(p.numel() for p in model.parameters())


def _selected_linears(shapes: dict[str, tuple[int, int]], targets: str | list[str]) -> dict[str, tuple[int, int]]:
    targets = resolve_targets(targets)
    if isinstance(targets, str):
        if targets.lower() == ALL_LINEAR:
            return dict(shapes)
        # PEFT treats any other string as a regex over the full module name.
        return {name: shape for name, shape in shapes.items() if re.fullmatch(targets, name)}
    wanted = set(targets)
    return {name: shape for name, shape in shapes.items() if name.rsplit(".", 1)[-1] in wanted}


def targeted_shapes(shapes: dict[str, tuple[int, int]], targets: str | list[str]) -> dict[str, tuple[int, int]]:
    """The subset of ``shapes`` that ``targets`` selects, with PEFT's matching rules.

    Raises ConfigError, listing the available short names, when ``targets`` selects nothing.
    """
    selected = _selected_linears(shapes, targets)
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


# --- MoE experts: fused 3-D parameters (transformers 5.x) ------------------------------------------

# A fused parameter that stacks n projections of each expert (gate and up) gets rank n x r and alpha
# n x alpha, so every stacked projection keeps rank r and the alpha/r scaling: the rule PEFT 0.21.2
# applies when it converts a per-projection adapter (peft/utils/transformers_weight_conversion.py).
FUSED_PROJECTIONS = {"gate_up_proj": 2}
# Names in a lora.targets list that select a fused expert parameter: its own, and the per-expert
# projections it replaced (Qwen-MoE's gate/up/down_proj, Mixtral's w1/w3/w2).
EXPERT_ALIASES = {
    "gate_up_proj": {"gate_up_proj", "gate_proj", "up_proj", "w1", "w3"},
    "down_proj": {"down_proj", "w2"},
}
# Child names of an MoE block that hold its router (Qwen3-MoE and Mixtral: mlp.gate, a TopKRouter).
ROUTER_NAMES = ("gate", "router")


@dataclass(frozen=True)
class MoeLayout:
    """Where a model keeps its experts: fused parameters, routers, experts per token."""

    experts: dict[str, tuple[int, int, int]]  # fused parameter's full name -> (experts, dim 1, dim 2)
    routers: dict[str, tuple[int, int]]  # router module's full name -> (in_features, out_features = experts)
    experts_per_token: int


def moe_layout(model: nn.Module) -> MoeLayout | None:
    """The model's fused MoE experts and routers, or None for a dense model (no 3-D parameter).

    Works on meta-device models. Raises ModelError when the config does not say how many experts a
    token uses (``num_experts_per_tok``), which the default expert rank needs.
    """
    experts: dict[str, tuple[int, int, int]] = {}
    routers: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        fused = {n: p for n, p in module.named_parameters(recurse=False) if p.dim() == 3}
        for param_name, param in fused.items():
            experts[f"{name}.{param_name}"] = tuple(param.shape)
        if not fused:
            continue
        count = next(iter(fused.values())).shape[0]
        block = name.rpartition(".")[0]
        for child_name in ROUTER_NAMES:
            weight = getattr(getattr(model.get_submodule(block), child_name, None), "weight", None)
            if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] == count:
                routers[f"{block}.{child_name}"] = (weight.shape[1], weight.shape[0])
    if not experts:
        return None
    config = getattr(model, "config", None)
    text = config.get_text_config() if config is not None else None
    per_token = getattr(text, "num_experts_per_tok", None)
    if not per_token:
        raise ModelError(f"MoE model ({type(model).__name__}) has no num_experts_per_tok in its config")
    return MoeLayout(experts, routers, int(per_token))


def resolve_expert_rank(rank: int, layout: MoeLayout, expert_rank: int | None = None) -> int:
    """Rank of each expert's LoRA: ``expert_rank`` if given, else rank // experts per token (at least 1).

    docs/findings.md claim 4: one LoRA per expert, rank per expert = total rank / active experts, so a
    token passes through as many adapter directions as a dense model's rank-r MLP adapter gives it.
    """
    return expert_rank if expert_rank is not None else max(1, rank // layout.experts_per_token)


def targeted_experts(layout: MoeLayout, targets: str | list[str]) -> dict[str, tuple[int, int, int]]:
    """The fused expert parameters ``targets`` selects: all for "all-linear", by name or alias for a list,
    by full-name regex for any other string (``attention`` and ``mlp`` name such a regex: rl_lora/targets.py)."""
    targets = resolve_targets(targets)
    if isinstance(targets, str):
        if targets.lower() == ALL_LINEAR:
            return dict(layout.experts)
        return {name: shape for name, shape in layout.experts.items() if re.fullmatch(targets, name)}
    wanted = set(targets)
    return {
        name: shape
        for name, shape in layout.experts.items()
        if wanted & EXPERT_ALIASES.get(name.rsplit(".", 1)[-1], {name.rsplit(".", 1)[-1]})
    }


def expert_rank_multiple(name: str) -> int:
    """How many projections a fused expert parameter stacks (rank and alpha are multiplied by it)."""
    return FUSED_PROJECTIONS.get(name.rsplit(".", 1)[-1], 1)


@dataclass(frozen=True)
class MoePlan:
    """How a LoRA spec adapts an MoE model's experts and routers (lora.expert_rank, lora.train_router)."""

    layout: MoeLayout
    expert_rank: int | None = None
    train_router: bool = False

    def parameter_count(self, rank: int, targets: str | list[str]) -> int:
        """Adapter parameters on the targeted experts (and routers, if trained), by PEFT's formulas.

        PEFT's ParamWrapper on an (E, a, b) parameter at rank r holds A (r E x in) and B (out x r E):
        r x E x (a + b). A router weight (experts x hidden) is a plain 2-D LoRA: r x (hidden + experts).
        """
        per_expert = resolve_expert_rank(rank, self.layout, self.expert_rank)
        count = sum(
            per_expert * expert_rank_multiple(name) * e * (a + b)
            for name, (e, a, b) in targeted_experts(self.layout, targets).items()
        )
        if self.train_router:
            count += sum(rank * (d_in + d_out) for d_in, d_out in self.layout.routers.values())
        return count


def adapter_parameter_count(
    shapes: dict[str, tuple[int, int]], rank: int, targets: str | list[str], moe: MoePlan | None = None
) -> int:
    """lora_parameter_count, plus the experts (and routers) of an MoE model when ``moe`` is given."""
    if moe is None:
        return lora_parameter_count(shapes, rank, targets)
    if rank < 1:
        raise ConfigError(f"LoRA rank must be >= 1, got {rank}")
    experts = moe.parameter_count(rank, targets)
    linears = _selected_linears(shapes, targets)
    if not linears and not targeted_experts(moe.layout, targets):
        targeted_shapes(shapes, targets)  # raises, naming what is available
    return rank * sum(d_in + d_out for d_in, d_out in linears.values()) + experts


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
    dims = [min(shape) for shape in _selected_linears(shapes, targets).values()]
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
    weights = full_parameter_count(shapes, targets) if _selected_linears(shapes, targets) or moe is None else 0
    if moe is not None:
        weights += sum(e * a * b for e, a, b in targeted_experts(moe.layout, targets).values())
    lora = estimate(shapes, 1, targets, data_bits, moe)
    capacity_bits = BITS_PER_PARAM * weights
    verdict = (
        f"full-parameter run: {weights:,} weights ({capacity_bits:,.0f} bits) against data ~{data_bits:,.0f} bits; "
        "capacity is not a limit"
    )
    return CapacityEstimate(weights, capacity_bits, data_bits, verdict, lora.smallest_sufficient_rank, full=True)
