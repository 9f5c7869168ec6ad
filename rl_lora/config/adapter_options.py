"""The PEFT adapter types a recipe can choose (``lora.adapter``) and their own options (``lora.adapter_options``).

Each type is one PEFT config class. Its options are the fields that class declares itself, from a snapshot of
the class (rl_lora/config/option_snapshot.py) rather than an import of PEFT (importing it loads torch,
seconds on 2 cores), so a misspelt option fails with the recipe, before anything loads. Options rl-lora sets
from recipe keys, or that would make the trainable count or the layer set differ from what ``lora.targets``
says, are refused with the key to use instead.

What PEFT 0.21.2 supports, read from its source (peft/tuners/<type>/model.py and layer.py):

- fused MoE experts (3-D parameters, transformers 5.x) take an adapter only through LoRA's
  ``target_parameters`` (peft/tuners/lora/layer.py ``ParamWrapper``), which refuses ``use_dora``; VeRA,
  TinyLoRA and MiSS configs have no such field;
- a 4-bit (bitsandbytes) base: LoRA and DoRA (peft/tuners/lora/bnb.py), VeRA and MiSS (their layers resolve
  the quantisation backend; MiSS not with ``init_weights: bat``); TinyLoRA takes the SVD of ``weight.data``
  with no quantised-layer path, so a 4-bit weight would be decomposed as packed bytes.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

from rl_lora.config.option_snapshot import option_names as snapshot_option_names
from rl_lora.utils.errors import ConfigError


@dataclass(frozen=True)
class AdapterType:
    """One ``lora.adapter`` value: its PEFT config class and what rl-lora knows about it."""

    name: str
    peft_class: str
    default_rank: int  # PEFT's default ``r`` (LoRA: rl-lora's rank 1)
    rank_meaning: str
    dropout_field: str
    fixed: dict[str, Any] = field(default_factory=dict)  # fields the type itself sets (DoRA: use_dora)
    merged_rollouts: bool = False  # rl_lora/adapters/rollout.py folds it into the weights
    quantized_base: bool = True  # PEFT 0.21.2 has a 4-bit base path for it
    fused_experts: bool = False  # PEFT 0.21.2 can put it on fused MoE experts


ADAPTER_TYPES: dict[str, AdapterType] = {
    "lora": AdapterType("lora", "LoraConfig", 1, "LoRA rank", "lora_dropout",
                        merged_rollouts=True, fused_experts=True),
    "dora": AdapterType("dora", "LoraConfig", 1,
                        "LoRA rank (plus one trained magnitude per output feature)", "lora_dropout",
                        fixed={"use_dora": True}),
    "vera": AdapterType("vera", "VeraConfig", 256,
                        "rank of the frozen random projections shared by all layers", "vera_dropout"),
    "tinylora": AdapterType("tinylora", "TinyLoraConfig", 2,
                            "rank of the frozen SVD of each weight (trained: `u` values per group)",
                            "tinylora_dropout", quantized_base=False),
    "miss": AdapterType("miss", "MissConfig", 64, "MiSS block rank", "miss_dropout"),
}
DEFAULT_ADAPTER = "lora"

# PEFT options rl-lora sets from a recipe key, or refuses because they would change the trained layers or
# parameters behind the back of lora.targets and the count (rl_lora/adapters/counting.py).
OWNED = {
    "r": "lora.rank", "lora_alpha": "lora.alpha", "target_modules": "lora.targets",
    "lora_dropout": "lora.dropout", "vera_dropout": "lora.dropout", "tinylora_dropout": "lora.dropout",
    "miss_dropout": "lora.dropout", "use_dora": "lora.adapter: dora",
    "target_parameters": "lora.targets (MoE experts)", "rank_pattern": "lora.expert_rank",
    "alpha_pattern": "lora.expert_rank", "modules_to_save": "rl-lora (a reward model's score head)",
    "task_type": "rl-lora (from the algorithm)",
}
NOT_SUPPORTED = {
    "bias": "rl-lora trains no biases", "lora_bias": "rl-lora trains no biases",
    "layers_to_transform": "select layers with lora.targets", "layers_pattern": "select layers with lora.targets",
    "exclude_modules": "select layers with lora.targets", "trainable_token_indices": "rl-lora trains no embeddings",
    "layer_replication": "it changes the model's depth", "fan_in_fan_out": "PEFT sets it from the layer type",
}


def option_names(adapter: str) -> frozenset[str] | None:
    """The fields PEFT's config class of ``adapter`` declares itself, or None where the installed PEFT is not
    the snapshot's (rl_lora/config/option_snapshot.py)."""
    return snapshot_option_names("peft", ADAPTER_TYPES[adapter].peft_class)


def check_adapter(adapter: str) -> str:
    """``adapter`` if it is a type rl-lora wires, else ConfigError with the nearest name."""
    if adapter in ADAPTER_TYPES:
        return adapter
    close = difflib.get_close_matches(adapter, list(ADAPTER_TYPES), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"lora.adapter '{adapter}': not an adapter type rl-lora wires{hint} "
                      f"(one of {', '.join(ADAPTER_TYPES)})")


def check_adapter_options(adapter: str, options: dict[str, Any]) -> None:
    """Refuse an option PEFT's config class of ``adapter`` lacks (naming the nearest), or one rl-lora sets or
    refuses (naming the recipe key to use, or why). No-op on names where PEFT's source is unreadable."""
    kind = ADAPTER_TYPES[adapter]
    names = option_names(adapter)
    for key in options:
        if names is not None and key not in names:
            allowed = sorted(names - OWNED.keys() - NOT_SUPPORTED.keys() - kind.fixed.keys())
            close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            hint = f"; did you mean 'lora.adapter_options.{close[0]}'?" if close else ""
            raise ConfigError(f"lora.adapter_options.{key}: not an option of PEFT's {kind.peft_class} "
                              f"(lora.adapter: {adapter}){hint}")
        if key in OWNED or key in kind.fixed:
            raise ConfigError(f"lora.adapter_options.{key}: rl-lora sets it from "
                              f"{OWNED.get(key, f'lora.adapter: {adapter}')}: set that instead")
        if key in NOT_SUPPORTED:
            raise ConfigError(f"lora.adapter_options.{key}: not supported here ({NOT_SUPPORTED[key]})")
