"""The LoRA advisor: a recipe's capacity estimate and guardrails, from its model's shapes alone.

    rl-lora capacity RECIPE [key.path=value ...]     # prints capacity_lines(config)

No weights are loaded: the model config comes from the built-in model's code or a folder's
``config.json`` (a folder holding nothing else works), and the layer shapes from a model built on the
meta device (rl_lora/estimate/capacity.py). A run calls ``check_recipe`` and ``enforce`` before its model loads
(rl_lora/launch/runner.py): the guardrails that fire are warned about (``LoraAdvice``) or, with ``advisor.strict``,
refuse the run with a ConfigError. Each rule, its threshold and its source in docs/findings.md: docs/advisor.md.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import transformers
from transformers import AutoConfig

from rl_lora.adapters.counting import (
    MoeLayout,
    MoePlan,
    adapter_type_parameter_count,
    check_fused_experts,
    meta_model,
    model_linear_shapes,
    model_parameter_count,
    moe_layout,
    resolve_expert_rank,
    targeted_experts,
    targeted_shapes,
)
from rl_lora.adapters.targets import ALL_LINEAR, ATTENTION_PARTS, MLP_NAMES, MLP_PARTS
from rl_lora.config.adapter_options import ADAPTER_TYPES
from rl_lora.config.algorithms import algorithm_info
from rl_lora.config.schema import BUILTIN_PREFERENCES, DpoRecipe, GrpoRecipe, PpoRecipe, RecipeConfig, RewardRecipe
from rl_lora.estimate.capacity import (
    BITS_PER_PARAM,
    CLEAR_MARGIN,
    SMALLEST_LABEL,
    CapacityEstimate,
    adapter_estimate,
    estimate,
    full_estimate,
    margin_text,
    pair_data_bits,
    rl_data_bits,
)
from rl_lora.estimate.lr_rule import resolve_lr
from rl_lora.models.gguf import read_config as read_gguf_config
from rl_lora.models.policies import classify
from rl_lora.utils.errors import ConfigError, ModelError, first_line

Shapes = dict[str, tuple[int, int]]
ModuleKind = Literal["attention", "mlp", "other"]

# The guardrails, in the order check_recipe reports them (docs/advisor.md numbers them the same way).
ATTENTION_ONLY = "attention-only"
LR_TOO_LOW = "lr-too-low"
LARGE_BATCH = "large-batch"
BELOW_CAPACITY = "below-capacity"
RULES = (ATTENTION_ONLY, LR_TOO_LOW, LARGE_BATCH, BELOW_CAPACITY)

# Full-parameter LRs run 5e-7..5e-6 (docs/findings.md, users' complaints: 5e-7..1e-6; Unsloth's RL guide
# uses 5e-6), and LoRA's optimum is ~10x full fine-tuning's (claim 5). A LoRA LR at or below the top of
# the full-parameter range is the usual cause of "LoRA RL does not learn".
LORA_LR_CEILING_OF_FULL_RANGE = 5e-6

# docs/findings.md claim 3: large batches hurt LoRA more than full fine-tuning, the gap is small at
# batch 32 and grows with the batch, and more rank does not fix it (it is a property of the B·A
# product). 256 completions = 32 prompts x the default 8 completions per prompt (grpo.num_generations):
# at that size the step holds the batch of 32 the findings call safe, counted in prompts. Counted in
# completions it is already 8x past 32, so the rule is lenient on purpose: it flags clearly large GRPO
# batches, not every batch above 32 (the default recipe alone uses 64 = 8 x 8). The evidence against
# points the same way: an OpenReview submission reports high-rank LoRA collapsing under large-batch GRPO.
LARGE_BATCH_COMPLETIONS = 256

# Module-name parts that mark a linear as attention or MLP. Layers that hold their MLP linears
# directly (OPT's fc1/fc2) are recognised by the linear's own name instead.


@dataclass(frozen=True)
class Advice:
    """One guardrail that fired: its code (one of RULES) and a one-line message naming the keys to change."""

    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class LoraAdvice(UserWarning):
    """A LoRA advisor guardrail that fired on a recipe (see docs/advisor.md)."""


# --- the recipe's model, without its weights ------------------------------------------------------



def recipe_model_config(config: RecipeConfig) -> transformers.PretrainedConfig:
    """The transformers config of the recipe's policy; loads no weights and builds nothing.

    Raises ModelError when the policy names an unknown built-in model, a file, or a folder or hub id
    whose config cannot be read.
    """
    policy = config.model.policy
    kind = classify(policy)
    if kind.source is not None:
        return kind.source.config(kind.name)  # shapes only: the model need not be built (or cached)
    if kind.form == "gguf":
        return read_gguf_config(policy)
    if kind.form == "file":
        raise ModelError(f"model.policy '{policy}' is a file; expected a model folder or a hub id")
    try:
        return AutoConfig.from_pretrained(policy, trust_remote_code=config.model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.policy '{policy}': cannot read its config ({first_line(exc)})") from exc


@dataclass(frozen=True)
class PolicyShapes:
    """The recipe's policy measured once, on the meta device: all that the capacity estimate, the guardrails
    and ``rl-lora capacity`` read of it.

    Measuring reads the policy's config (for a GGUF policy not yet dequantised, a parse of the file's whole
    header) and builds the model on the meta device, so a caller measures once and passes this down.
    """

    model_config: transformers.PretrainedConfig
    linears: Shapes  # {linear module name: (in_features, out_features)}, output head and MoE routers excluded
    moe: MoeLayout | None  # fused MoE experts and routers; None for a dense model
    parameters: int  # every parameter, tied weights once


def policy_shapes(config: RecipeConfig) -> PolicyShapes:
    """Measure the recipe's policy: one config read, one meta-device build. Raises ModelError."""
    model_config = recipe_model_config(config)
    try:
        model = meta_model(model_config, config.model.trust_remote_code)
        return PolicyShapes(model_config, model_linear_shapes(model), moe_layout(model), model_parameter_count(model))
    except (ValueError, KeyError, ImportError) as exc:
        raise ModelError(
            f"model.policy '{config.model.policy}': transformers cannot build a causal LM from its config "
            f"({first_line(exc)})"
        ) from exc


def recipe_shapes(config: RecipeConfig) -> Shapes:
    """{linear module name: (in_features, out_features)} of the recipe's policy (output head excluded)."""
    return policy_shapes(config).linears


def recipe_moe(config: RecipeConfig, policy: PolicyShapes | None = None) -> MoePlan | None:
    """How the recipe's LoRA adapts its policy's fused MoE experts, or None for a dense policy.

    The same rules rl_lora.adapters.lora.peft_config applies: experts at ``lora.expert_rank`` (default rank //
    experts per token), routers only with ``lora.train_router``. ``policy`` saves measuring it again.
    """
    layout = (policy_shapes(config) if policy is None else policy).moe
    if layout is None:
        return None
    return MoePlan(layout, config.lora.expert_rank, config.lora.train_router)


def distinct_pairs_available(config: DpoRecipe | RewardRecipe) -> int | None:
    """How many distinct training pairs the recipe's data can give, or None when unknown.

    Built-in pairs: at most one per training problem. A file: its rows (less the held-out share when
    a reward model holds some out); None if it cannot be read here (the run's own check names why).
    """
    data = config.data
    if config.preferences_source == BUILTIN_PREFERENCES:
        return (data.max_operand - data.min_operand + 1) ** 2 - data.eval_size
    from rl_lora.data.preferences import read_preference_file
    from rl_lora.utils.errors import DataError

    try:
        return len(read_preference_file(config.preferences_source, split=data.split, subset=data.subset))
    except (DataError, OSError):
        return None


def data_bits_per_step(config: RecipeConfig) -> float:
    """Bits one optimizer step's batch adds while no sample repeats."""
    return float(config.train.batch_size)  # one bit per episode (RL) or per pair (DPO, reward)


def recipe_data_bits(config: RecipeConfig) -> tuple[float, str]:
    """(bits the recipe's training data carries, how that number was made)."""
    batch, steps = config.train.batch_size, config.train.steps
    if algorithm_info(config.algorithm).uses_rewards:
        # Claim 1: a policy-gradient episode (one completion) carries at most ~1 bit, its one scalar advantage.
        bits = rl_data_bits(batch, steps)
        return bits, f"{batch} completions/step x {steps} steps, <= 1 bit per episode"
    if isinstance(config, (DpoRecipe, RewardRecipe)):
        # One bit per distinct pair: rl-lora's own estimate, not the study's (rl_lora/estimate/capacity.py says why and
        # what it does not know); a second pass over the same pairs adds none.
        seen = batch * steps
        available = distinct_pairs_available(config)
        distinct = seen if available is None else min(seen, available)
        cap = "" if available is None else f", at most {available:,} in the data"
        how = (
            f"{distinct:,} distinct pairs ({batch} pairs/step x {steps} steps{cap}), "
            "1 bit per pair (rl-lora's estimate)"
        )
        return pair_data_bits(distinct), how
    raise ConfigError(f"algorithm '{config.algorithm}': the advisor has no data-bits estimate for it yet")


def recipe_capacity(config: RecipeConfig, policy: PolicyShapes | None = None) -> CapacityEstimate:
    """The capacity estimate of the recipe's adapter against its data; ``policy`` saves measuring it again.

    On an MoE policy the count includes the experts (and trained routers). For ``lora.rank: full`` the
    count is the targeted weights and the verdict says capacity is not a limit
    (rl_lora.estimate.capacity.full_estimate).
    """
    policy = policy_shapes(config) if policy is None else policy
    moe = recipe_moe(config, policy)
    bits, _ = recipe_data_bits(config)
    if config.lora.is_full:
        return full_estimate(policy.linears, config.lora.targets, bits, moe)
    if config.lora.adapter != "lora":
        check_fused_experts(config.lora.adapter, policy.moe, config.lora.targets)
        linears = targeted_shapes(policy.linears, config.lora.targets) if moe is None else _maybe_targeted(
            policy.linears, config)
        return adapter_estimate(linears, config.lora.adapter, int(config.lora.rank), ALL_LINEAR,
                                config.lora.adapter_options, bits)
    return estimate(policy.linears, int(config.lora.rank), config.lora.targets, bits, moe)


def check_adapter_fits(config: RecipeConfig) -> None:
    """Refuse, before the model loads, an adapter type PEFT cannot put on the recipe's policy (fused MoE experts
    take LoRA only). Silent where the policy's shapes cannot be read here (the adapter's build checks again)."""
    if config.lora.is_full or config.lora.adapter == "lora":
        return
    try:
        policy = policy_shapes(config)
    except ModelError:
        return
    check_fused_experts(config.lora.adapter, policy.moe, config.lora.targets)


def module_kind(name: str) -> ModuleKind:
    """'attention', 'mlp' or 'other' for a linear module's full name (MoE experts count as MLP)."""
    parts = name.split(".")
    if parts[-1] in MLP_NAMES or any(p in MLP_PARTS for p in parts[:-1]):
        return "mlp"
    if any(p in ATTENTION_PARTS for p in parts[:-1]):
        return "attention"
    return "other"


def params_by_kind(
    shapes: Shapes, rank: int | Literal["full"], targets: str | list[str]
) -> dict[ModuleKind, tuple[int, int]]:
    """{kind: (trainable parameters, number of linears)} over the targeted linears, kinds that occur only.

    A rank-r adapter adds r x (d_in + d_out) per linear; ``rank="full"`` counts the weights d_in x d_out.
    """
    result: dict[ModuleKind, tuple[int, int]] = {}
    for name, (d_in, d_out) in targeted_shapes(shapes, targets).items():
        kind = module_kind(name)
        params, count = result.get(kind, (0, 0))
        added = d_in * d_out if rank == "full" else rank * (d_in + d_out)
        result[kind] = (params + added, count + 1)
    return result


# --- the guardrails -------------------------------------------------------------------------------


def _attention_only(config: RecipeConfig, policy: PolicyShapes) -> Advice | None:
    shapes, moe = policy.linears, policy.moe
    targets = config.lora.targets
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        return None
    if moe is not None and targeted_experts(moe, targets):
        return None
    if any(module_kind(name) == "mlp" for name in targeted_shapes(shapes, targets)):
        return None
    mlp_names = sorted({name.rsplit(".", 1)[-1] for name in shapes if module_kind(name) == "mlp"})
    also = f" (or add {', '.join(mlp_names)})" if mlp_names else ""
    listed = targets if isinstance(targets, str) else ", ".join(targets)
    return Advice(
        ATTENTION_ONLY,
        f"lora.targets [{listed}] adapts no MLP layer: set lora.targets to all-linear{also}; attention-only "
        "r=256 (0.25B params) lost to MLP-only r=128 (0.24B) at matched size (docs/findings.md claim 4)",
    )


def _lr_too_low(config: RecipeConfig) -> Advice | None:
    lr = resolve_lr(config.train.lr, config.lora, config.train.steps)
    if lr.lr > LORA_LR_CEILING_OF_FULL_RANGE:
        return None
    if config.lora.lr is not None:
        source, keys = f"lora.lr {lr.lr:g}", "lora.lr"
    elif config.lora.lr_multiplier is not None:
        source, keys = f"{lr.multiplier:g} x train.lr {config.train.lr:g}", "lora.lr_multiplier or train.lr"
    else:
        source = f"{lr.multiplier:g} x train.lr {config.train.lr:g}"
        keys = "train.lr (the full-parameter LR the LoRA LR is scaled from) or set lora.lr"
    return Advice(
        LR_TOO_LOW,
        f"LoRA LR {lr.lr:g} ({source}) is within the typical full-parameter range 5e-7..5e-6, where LoRA RL "
        f"'does not learn'; LoRA wants ~10x a full-parameter LR (docs/findings.md claim 5, users' complaints): "
        f"raise {keys}",
    )


def _large_batch(config: RecipeConfig) -> Advice | None:
    batch, steps = config.train.batch_size, config.train.steps
    if batch <= LARGE_BATCH_COMPLETIONS:
        return None
    # The batch holds whole groups of completions per prompt (config validation requires it); pairs do not group.
    group_key, group = "", 1
    if isinstance(config, GrpoRecipe):
        group_key, group = "grpo.num_generations", config.grpo.num_generations
    elif isinstance(config, PpoRecipe):
        group_key, group = "ppo.samples_per_prompt", config.ppo.samples_per_prompt
    # The largest batch within the threshold that still holds whole groups.
    smaller = LARGE_BATCH_COMPLETIONS // group * group
    keep = f"{batch * steps:,} episodes"
    if smaller == 0:
        fix = f"lower {group_key} ({group}) and train.batch_size to <= {LARGE_BATCH_COMPLETIONS}"
    else:
        fix = f"lower train.batch_size to {smaller} and raise train.steps to {math.ceil(batch * steps / smaller)}"
    return Advice(
        LARGE_BATCH,
        f"train.batch_size {batch} completions per step is over {LARGE_BATCH_COMPLETIONS}: large batches hurt "
        f"LoRA more than full fine-tuning and a higher lora.rank does not fix it (docs/findings.md claim 3): "
        f"{fix} (keeps the {keep})",
    )


def _below_capacity(config: RecipeConfig, policy: PolicyShapes) -> Advice | None:
    est = recipe_capacity(config, policy)
    # Fires where the verdict says "likely too small"; between 1/CLEAR_MARGIN and 1 the estimate is too
    # rough to call, and a warning there would claim more than it knows (rl_lora/estimate/capacity.py).
    if est.margin > 1 / CLEAR_MARGIN:
        return None
    _, how = recipe_data_bits(config)
    # Below the data's size, bits grow linearly with steps: the longest run this adapter holds.
    max_steps = math.floor(est.capacity_bits / data_bits_per_step(config))
    fewer = f"train.steps to <= {max_steps}" if max_steps >= 1 else "train.batch_size"
    if config.lora.adapter != "lora":
        fix = (f"a larger adapter (lora.rank, lora.adapter_options), LoRA from rank {est.smallest_sufficient_rank} "
               f"(estimate), lora.rank full, or lower {fewer}")
    elif est.smallest_sufficient_rank is None:
        fix = f"no LoRA rank holds it: set lora.rank to full, or lower {fewer}"
    else:
        fix = f"set lora.rank to >= {est.smallest_sufficient_rank}, or lower {fewer}"
    return Advice(
        BELOW_CAPACITY,
        f"{_adapter_words(config)} holds ~{est.capacity_bits:,.0f} bits, {margin_text(est.margin)} the "
        f"~{est.data_bits:,.0f} bits of data ({how}): likely too small, rough as both figures are; past capacity "
        f"LoRA learns more slowly (docs/findings.md claims 1-2): {fix}",
    )


def _adapter_words(config: RecipeConfig) -> str:
    """'rank-1 LoRA', or 'vera rank 256' for another adapter type."""
    if config.lora.adapter == "lora":
        return f"rank-{config.lora.rank} LoRA"
    return f"{config.lora.adapter} rank-{config.lora.rank} adapter"


def check_recipe(config: RecipeConfig, policy: PolicyShapes | None = None) -> list[Advice]:
    """The guardrails that fire on a LoRA recipe, in RULES order; none for a full-parameter run.

    ``policy`` (from ``policy_shapes``) saves measuring it again. Raises ConfigError if ``lora.targets``
    matches no linear layer, and ModelError if the policy's config cannot be read.
    """
    if config.lora.is_full:
        return []
    policy = policy_shapes(config) if policy is None else policy
    found = [
        _attention_only(config, policy),
        _lr_too_low(config),
        _large_batch(config),
        _below_capacity(config, policy),
    ]
    return [advice for advice in found if advice is not None]


def enforce(advice: list[Advice], strict: bool, stacklevel: int = 2) -> None:
    """Refuse (strict: ConfigError listing every piece of advice) or warn (one ``LoraAdvice`` each)."""
    if not advice:
        return
    if strict:
        listed = "; ".join(str(a) for a in advice)
        raise ConfigError(
            f"the LoRA advisor refuses this recipe (advisor.strict is on): {listed}. "
            "Change the keys named, or set advisor.strict=false to run with warnings instead"
        )
    for a in advice:
        warnings.warn(str(a), LoraAdvice, stacklevel=stacklevel)


# --- the report -----------------------------------------------------------------------------------


def _shape_summary(model_config: transformers.PretrainedConfig) -> str:
    text = model_config.get_text_config()
    fields = (
        ("hidden", ("hidden_size",)),
        ("layers", ("num_hidden_layers",)),
        ("heads", ("num_attention_heads",)),
        ("KV heads", ("num_key_value_heads",)),
        ("MLP", ("intermediate_size",)),
        ("experts", ("num_experts", "num_local_experts")),
        ("experts/token", ("num_experts_per_tok",)),
        ("expert MLP", ("moe_intermediate_size",)),
        ("vocab", ("vocab_size",)),
    )
    parts = [str(model_config.model_type)]
    for label, attrs in fields:
        value = next((getattr(text, a) for a in attrs if getattr(text, a, None)), None)
        if value is not None:
            parts.append(f"{label} {value}")
    return " | ".join(parts)


def _by_kind_text(by_kind: dict[ModuleKind, tuple[int, int]]) -> str:
    names = {"attention": "attention", "mlp": "MLP", "other": "other"}
    return " + ".join(f"{names[kind]} {params:,} ({count} linears)" for kind, (params, count) in by_kind.items())


def capacity_lines(config: RecipeConfig) -> list[str]:
    """What ``rl-lora capacity RECIPE`` prints: model shape, adapter size by module kind, capacity, data, advice."""
    policy = policy_shapes(config)
    model_config, shapes, total = policy.model_config, policy.linears, policy.parameters
    moe = recipe_moe(config, policy)
    est = recipe_capacity(config, policy)
    _, how = recipe_data_bits(config)
    targets = config.lora.targets if isinstance(config.lora.targets, str) else ", ".join(config.lora.targets)
    linears = targeted_shapes(shapes, config.lora.targets) if moe is None else _maybe_targeted(shapes, config)
    by_kind = _by_kind_text(params_by_kind(linears, config.lora.rank, ALL_LINEAR)) if linears else ""
    if moe is not None:
        by_kind = " + ".join(part for part in (by_kind, _experts_text(config, moe)) if part)
    if config.lora.is_full:
        method, counted = "full-parameter", "full weights (targeted)"
        smallest_label = "smallest LoRA rank with capacity >= data (estimate; to compare)"
    elif config.lora.adapter != "lora":
        options = ", ".join(f"{k} {v}" for k, v in config.lora.adapter_options.items())
        kind = (f"DoRA (LoraConfig use_dora) rank {config.lora.rank}, alpha {config.lora.alpha:g}"
                if config.lora.adapter == "dora" else f"{ADAPTER_TYPES[config.lora.adapter].peft_class} rank "
                f"{config.lora.rank}")
        method = kind + (f", {options}" if options else "")
        counted = f"{config.lora.adapter} parameters"
        by_kind = _by_kind_text(_type_by_kind(config, linears)) if config.lora.adapter != "tinylora" else (
            f"{est.lora_params // _tinylora_u(config):,} trained vector(s) of u={_tinylora_u(config)} values over "
            f"{len(linears)} linears (lora.adapter_options.weight_tying "
            f"{config.lora.adapter_options.get('weight_tying', 0.0)})")
        smallest_label = "smallest LoRA rank with capacity >= data (estimate; to compare)"
    else:
        method, counted = f"LoRA rank {config.lora.rank}, alpha {config.lora.alpha:g}", "LoRA parameters"
        smallest_label = SMALLEST_LABEL
    smallest = est.smallest_sufficient_rank
    lines = [
        f"recipe:   {config.name} ({config.algorithm}, {method}, targets {targets})",
        f"policy:   {config.model.policy}",
        f"model:    {_shape_summary(model_config)} | {total:,} parameters",
        f"linears:  {len(shapes)} (output head excluded), {len(linears)} targeted",
        f"{counted}: {est.lora_params:,} = {by_kind}",
        f"capacity: {est.capacity_bits:,.0f} bits ({BITS_PER_PARAM:g} bits per parameter)",
        f"data:     ~{est.data_bits:,.0f} bits ({how})",
        f"verdict:  {est.verdict}",
        f"{smallest_label}: {'none up to full rank' if smallest is None else smallest}",
    ]
    if moe is not None:
        lines.insert(4, f"experts:  {_expert_plan_text(config, moe)}")
    advice = check_recipe(config, policy)
    lines += [f"advice:   {a}" for a in advice] or ["advice:   none"]
    return lines


def _tinylora_u(config: RecipeConfig) -> int:
    from peft import TinyLoraConfig

    return int(config.lora.adapter_options.get("u", TinyLoraConfig.u))


def _type_by_kind(config: RecipeConfig, linears: Shapes) -> dict[ModuleKind, tuple[int, int]]:
    """params_by_kind for another adapter type; none for TinyLoRA, whose groups of layers share one vector."""
    if config.lora.adapter == "tinylora":
        return {}
    by_kind: dict[ModuleKind, tuple[int, int]] = {}
    kinds: tuple[ModuleKind, ...] = ("attention", "mlp", "other")
    for kind in kinds:
        part = {name: shape for name, shape in linears.items() if module_kind(name) == kind}
        if part:
            count = adapter_type_parameter_count(part, config.lora.adapter, int(config.lora.rank), ALL_LINEAR,
                                                 config.lora.adapter_options)
            by_kind[kind] = (count, len(part))
    return by_kind


def _maybe_targeted(shapes: Shapes, config: RecipeConfig) -> Shapes:
    """The targeted linears of an MoE policy: none is fine when lora.targets names experts only."""
    try:
        return targeted_shapes(shapes, config.lora.targets)
    except ConfigError:
        return {}


def _experts_text(config: RecipeConfig, moe: MoePlan) -> str:
    """'experts N (k fused parameters)' and 'router N (k)' terms of the LoRA-parameters line."""
    experts = targeted_experts(moe.layout, config.lora.targets)
    full = config.lora.is_full
    rank = 1 if full else int(config.lora.rank)
    count = (sum(e * a * b for e, a, b in experts.values()) if full
             else MoePlan(moe.layout, moe.expert_rank, False).parameter_count(rank, config.lora.targets))
    text = f"experts {count:,} ({len(experts)} fused parameters)"
    if moe.train_router and not full:
        routers = sum(rank * (d_in + d_out) for d_in, d_out in moe.layout.routers.values())
        text += f" + router {routers:,} ({len(moe.layout.routers)} routers)"
    return text


def _expert_plan_text(config: RecipeConfig, moe: MoePlan) -> str:
    """One line: experts per layer and per token, the expert rank and where it comes from, the router."""
    layout = moe.layout
    first = next(iter(layout.experts.values()))
    router = "trained (lora.train_router)" if moe.train_router else "frozen"
    if config.lora.is_full:
        return f"{first[0]} per MoE layer, {layout.experts_per_token} per token; every weight trains"
    rank = int(config.lora.rank)
    per_expert = resolve_expert_rank(rank, layout, moe.expert_rank)
    source = ("lora.expert_rank" if moe.expert_rank is not None
              else f"lora.rank {rank} // {layout.experts_per_token} experts per token, at least 1")
    return (f"{first[0]} per MoE layer, {layout.experts_per_token} per token; expert rank {per_expert} ({source}; "
            f"gate_up_proj stacks 2 projections: rank {2 * per_expert}); router {router}")
