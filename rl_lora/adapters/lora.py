"""LoRA adapters through PEFT: the spec -> a LoraConfig, and parameter counts.

Dense models get PEFT's own target matching (``target_modules=lora.targets``). MoE models whose experts
are fused 3-D parameters (transformers 5.x: Qwen3-MoE, Mixtral, ...) get an explicit config: the
targeted linears by full name, and every targeted expert parameter through PEFT's ``target_parameters``
at the expert rank (``lora.expert_rank``, default rank // experts per token), the router frozen unless
``lora.train_router``. rl_lora.estimate.capacity counts exactly what this config trains.
"""

from __future__ import annotations

import re
import warnings

import torch
from peft import LoraConfig, PeftConfig
from torch import nn

from rl_lora.adapters.counting import (
    MoeLayout,
    check_fused_experts,
    expert_rank_multiple,
    model_linear_shapes,
    moe_layout,
    resolve_expert_rank,
    targeted_experts,
    targeted_shapes,
)
from rl_lora.adapters.targets import TARGET_SETS, resolve_targets
from rl_lora.config.adapter_options import ADAPTER_TYPES
from rl_lora.config.schema import LoraSpec
from rl_lora.utils.errors import ConfigError

# Linear names that PEFT 0.21.2 re-targets on models it converts from transformers v4 to v5
# (peft/utils/transformers_weight_conversion.py, _MOE_TARGET_MODULE_MAPPING): a dense linear so named
# next to fused experts (a shared expert, a dense first layer) would lose its adapter to the experts.
_PEFT_RETARGETED = frozenset({"gate", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3"})
# PEFT 0.21.2 checks rank_pattern / alpha_pattern keys against targeted *module* names only and so calls
# the per-parameter keys of fused experts "ignored" although it applies them (tests/test_capacity.py
# checks the resulting counts). Only _moe_config sets such patterns.
warnings.filterwarnings(
    "ignore",
    message=r"The following (rank|alpha)_pattern keys did not match any targeted module",
    category=RuntimeWarning,
)


def peft_config(spec: LoraSpec, task_type: str = "CAUSAL_LM", model: nn.Module | None = None) -> PeftConfig | None:
    """PEFT's config for ``spec`` (a LoraConfig, or another type's with ``lora.adapter``), or None for the
    full-parameter baseline.

    alpha is fixed (32 by default) rather than scaled with rank: with alpha/r scaling the optimal LR
    barely depends on rank (docs/findings.md, claim 5). B starts at zero, so a fresh adapter leaves
    the policy exactly equal to the base model. ``task_type="SEQ_CLS"`` (reward models) also trains
    the freshly initialised classification head in full: PEFT adds ``score`` to ``modules_to_save``.

    ``model`` (the model the adapter goes on; a meta-device copy will do) is needed for MoE models:
    without it, or for a dense model, the config is PEFT's plain target matching.
    """
    if spec.is_full:
        return None
    layout = moe_layout(model) if model is not None else None
    if spec.adapter != "lora":
        return _other_config(spec, task_type, model, layout)
    if layout is None:
        if model is not None and spec.train_router:
            raise ConfigError("lora.train_router is set but the model has no MoE router: remove it")
        return LoraConfig(
            r=int(spec.rank),
            lora_alpha=spec.alpha,  # type: ignore[arg-type]  # PEFT annotates int; it divides a float alike
            target_modules=_dense_targets(spec.targets, model),
            lora_dropout=spec.dropout,
            bias="none",
            task_type=task_type,
        )
    assert model is not None  # a layout is only read from a model
    return _moe_config(spec, task_type, model, layout)


def _other_config(spec: LoraSpec, task_type: str, model: nn.Module | None, layout: MoeLayout | None) -> PeftConfig:
    """PEFT's config of another adapter type (lora.adapter) on the same layers a LoRA would take.

    ``lora.rank`` is the type's ``r``, ``lora.dropout`` its dropout; ``lora.adapter_options`` pass as they are
    (checked against the class with the recipe). On an MoE model only its linears can take the type
    (rl_lora/adapters/counting.py check_fused_experts).
    """
    import peft

    kind = ADAPTER_TYPES[spec.adapter]
    check_fused_experts(spec.adapter, layout, spec.targets)
    if layout is not None and model is not None:
        linears = targeted_shapes(model_linear_shapes(model), spec.targets)
        if task_type == "SEQ_CLS":
            linears = {name: shape for name, shape in linears.items() if name.rsplit(".", 1)[-1] != "score"}
        targets: str | list[str] = sorted(linears)
    else:
        targets = _dense_targets(spec.targets, model)
    options: dict[str, object] = {"r": int(spec.rank), "target_modules": targets, kind.dropout_field: spec.dropout,
                                  "task_type": task_type, **kind.fixed, **spec.adapter_options}
    if spec.adapter == "dora":
        options.update(lora_alpha=spec.alpha, bias="none")
    try:
        return getattr(peft, kind.peft_class)(**options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"lora.adapter_options {spec.adapter_options}: PEFT's {kind.peft_class} refuses them "
                          f"({str(exc).splitlines()[0]})") from None


def _dense_targets(targets: str | list[str], model: nn.Module | None) -> str | list[str]:
    """PEFT's ``target_modules``. A named layer set (``attention``, ``mlp``) becomes the full names of the
    linears it selects when the model is at hand: as a regex PEFT would also match the non-linear modules
    inside those blocks (an MLP's activation), and refuse them."""
    if model is not None and isinstance(targets, str) and targets.lower() in TARGET_SETS:
        return sorted(targeted_shapes(model_linear_shapes(model), targets))
    return resolve_targets(targets)


def _moe_config(spec: LoraSpec, task_type: str, model: nn.Module, layout: MoeLayout) -> LoraConfig:
    """Attention and dense linears at lora.rank; each targeted fused expert parameter at the expert rank."""
    if spec.dropout:
        # PEFT's ParamWrapper (peft/tuners/lora/layer.py) refuses dropout: it cannot be factored out of x.
        raise ConfigError(f"lora.dropout {spec.dropout:g}: LoRA on fused MoE experts supports no dropout; set 0")
    rank = int(spec.rank)
    shapes = model_linear_shapes(model)
    experts = targeted_experts(layout, spec.targets)
    linears = targeted_shapes(shapes, spec.targets) if not experts else _maybe(shapes, spec.targets)
    if task_type == "SEQ_CLS":
        # The one-logit head is trained in full (modules_to_save), as PEFT's "all-linear" leaves it to be.
        linears = {name: shape for name, shape in linears.items() if name.rsplit(".", 1)[-1] != "score"}
    clash = sorted({name for name in linears if name.rsplit(".", 1)[-1] in _PEFT_RETARGETED})
    if clash:
        raise ConfigError(
            f"lora.targets selects dense linears {clash[:3]} next to fused MoE experts; PEFT 0.21.2 would move "
            "their adapters onto the experts. Leave their names (gate_proj, up_proj, down_proj) out of lora.targets"
        )
    per_expert = resolve_expert_rank(rank, layout, spec.expert_rank)
    ranks = {re.escape(name): per_expert * expert_rank_multiple(name) for name in experts}
    alphas = {re.escape(name): spec.alpha * expert_rank_multiple(name) for name in experts}
    parameters = sorted(experts)
    if spec.train_router:
        # A router weight (experts x hidden) gets a plain rank-r LoRA, like a dense linear.
        parameters += sorted(f"{name}.weight" for name in layout.routers)
    return LoraConfig(
        r=rank,
        lora_alpha=spec.alpha,  # type: ignore[arg-type]  # PEFT annotates int; it divides a float alike
        target_modules=sorted(linears),
        target_parameters=parameters,
        rank_pattern=ranks,
        alpha_pattern=alphas,
        lora_dropout=0.0,
        bias="none",
        task_type=task_type,
    )


def _maybe(shapes: dict[str, tuple[int, int]], targets: str | list[str]) -> dict[str, tuple[int, int]]:
    """The targeted linears, possibly none (a list naming experts only)."""
    try:
        return targeted_shapes(shapes, targets)
    except ConfigError:
        return {}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; for a PEFT model the total includes the adapter.

    A 4-bit (QLoRA) weight counts its logical elements: bitsandbytes' Params4bit packs two weights into
    each uint8 element, so its ``numel()`` is half the layer's weights.
    """
    trainable = total = 0
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        count = state.shape.numel() if state is not None else p.numel()
        total += count
        if p.requires_grad:
            trainable += count
    return trainable, total


def keep_adapters_fp32(model: torch.nn.Module) -> None:
    """Cast the trainable (LoRA) parameters of a quantised-base model back to fp32, before the optimizer exists.

    TRL 1.16's GRPO and DPO trainers cast QLoRA adapters to bf16 (the QLoRA paper's recipe). Here they stay fp32:
    on CPU bf16 is emulated and a bf16 model ran ~19x slower, and fp32 adapters keep a QLoRA run comparable
    with a plain LoRA run, whose adapters are fp32, so that only the base's quantisation differs.
    """
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
