"""Trainable parameters of an adapter, from a model's shapes alone.

A rank-r LoRA on a linear layer (d_in -> d_out) adds r * (d_in + d_out) parameters (A is r x d_in,
B is d_out x r). The shapes come from the model built on the meta device, so an 8B config costs no
memory and no download of weights. MoE experts are counted by PEFT's own formulas (MoePlan).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM

from rl_lora.adapters.targets import ALL_LINEAR, resolve_targets
from rl_lora.utils.errors import ConfigError, ModelError


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
    # a transformers model (PEFT's wrapper forwards the call), though typed as the nn.Module it is used as
    head = cast(transformers.PreTrainedModel, model).get_output_embeddings()
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


def selected_linears(shapes: dict[str, tuple[int, int]], targets: str | list[str]) -> dict[str, tuple[int, int]]:
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
    selected = selected_linears(shapes, targets)
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
    by full-name regex for any other string (``attention`` and ``mlp`` name such a regex:
    rl_lora/adapters/targets.py)."""
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
    linears = selected_linears(shapes, targets)
    if not linears and not targeted_experts(moe.layout, targets):
        targeted_shapes(shapes, targets)  # raises, naming what is available
    return rank * sum(d_in + d_out for d_in, d_out in linears.values()) + experts


# --- other PEFT adapter types (lora.adapter) -------------------------------------------------------


def _peft_default(adapter: str, option: str) -> Any:
    """PEFT's own default for ``option`` of ``adapter``'s config class (the count follows PEFT, not a copy)."""
    import dataclasses

    import peft

    from rl_lora.config.adapter_options import ADAPTER_TYPES

    fields = {f.name: f for f in dataclasses.fields(getattr(peft, ADAPTER_TYPES[adapter].peft_class))}
    return fields[option].default


def adapter_type_parameter_count(
    shapes: dict[str, tuple[int, int]],
    adapter: str,
    rank: int,
    targets: str | list[str],
    options: Mapping[str, Any] | None = None,
) -> int:
    """Trainable parameters of PEFT's ``adapter`` type on the targeted linears, by PEFT 0.21.2's layer shapes.

    - lora: r (d_in + d_out) per layer; dora adds a magnitude per output feature (d_out);
    - vera: the shared projections are frozen buffers; per layer lambda_d (r) and lambda_b (d_out);
    - tinylora: one vector of ``u`` values per group of layers, ``round(n (1 - weight_tying))`` groups (at
      least 1) for n targeted layers (peft/tuners/tinylora/model.py); the SVD factors are frozen buffers;
    - miss: a (r x d_out) block per layer; ``init_weights: bat`` (d_out // r) r x r, ``mini`` r x mini_r.
    """
    options = dict(options or {})
    if rank < 1:
        raise ConfigError(f"lora.rank must be >= 1, got {rank}")
    selected = targeted_shapes(shapes, targets)
    outs = [d_out for _, d_out in selected.values()]
    if adapter == "lora":
        return lora_parameter_count(shapes, rank, targets)
    if adapter == "dora":
        return lora_parameter_count(shapes, rank, targets) + sum(outs)
    if adapter == "vera":
        return sum(rank + d_out for d_out in outs)
    if adapter == "tinylora":
        u = int(options.get("u", _peft_default("tinylora", "u")))
        tying = float(options.get("weight_tying", _peft_default("tinylora", "weight_tying")))
        return u * max(1, round(len(selected) * (1.0 - tying)))
    if adapter == "miss":
        mode = options.get("init_weights", _peft_default("miss", "init_weights"))
        if mode == "bat":
            return sum((d_out // rank) * rank * rank for d_out in outs)
        if mode == "mini":
            return rank * int(options.get("mini_r", _peft_default("miss", "mini_r"))) * len(outs)
        return rank * sum(outs)
    raise ConfigError(f"lora.adapter '{adapter}': no parameter count for it")


def check_fused_experts(adapter: str, layout: MoeLayout | None, targets: str | list[str]) -> None:
    """Refuse an adapter type PEFT cannot put on the fused MoE experts ``targets`` selects (LoRA only can)."""
    from rl_lora.config.adapter_options import ADAPTER_TYPES

    if layout is None or ADAPTER_TYPES[adapter].fused_experts:
        return
    experts = targeted_experts(layout, targets)
    if experts:
        raise ConfigError(
            f"lora.adapter {adapter}: PEFT 0.21.2 cannot put it on fused MoE experts ({sorted(experts)[0]}, ...: only "
            "LoRA has target_parameters, and it refuses use_dora); set lora.adapter: lora, or lora.targets: "
            "attention to adapt the attention linears only"
        )
