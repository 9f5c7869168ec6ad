"""Will it fit? A recipe's memory per device and training FLOPs, from its model's config alone.

    rl-lora plan RECIPE [key.path=value ...] [--devices N] [--device-memory 80GB] [--prompt-tokens N]

No weights are loaded: the model is built on PyTorch's meta device (rl_lora/estimate/capacity.py), so a 70B config
costs about a second. For full fine-tuning and for the recipe's LoRA rank it adds up, per device:

- **weights**: the policy (a 4-bit base under QLoRA), its adapters, PPO's critic (a value adapter and
  head on the shared base, or a full copy of the decoder) and a separate frozen reference where the
  algorithm keeps one (full-parameter DPO, PPO, and GRPO with ``grpo.beta > 0``; with LoRA the reference
  is the adapter-off policy and costs nothing);
- **gradients, optimizer state and master weights**: AdamW's two moments per trainable parameter, in
  the parameter's dtype without DeepSpeed; under DeepSpeed with bf16/fp16 every trainable parameter
  also has an fp32 master copy and fp32 moments; ZeRO-2 splits gradients and optimizer state over the
  devices, ZeRO-3 the weights as well (tensor by tensor, tensors of at most ``10 x hidden`` elements
  kept whole, as transformers' "auto" sets it);
- **activations** of one micro-batch, with and without gradient checkpointing, and the **generation
  KV cache** of a rollout (formulas at ``activation_bytes`` and ``kv_cache_bytes``: estimates);

then the peak, whether it fits ``--device-memory`` less ``HEADROOM``, and the smallest device count
that fits. The parameter, gradient and optimizer bytes are exact: ``Breakdown.logged`` gives what a run's
``metrics.jsonl`` reports for them, and tests/test_plan.py checks the two are equal. docs/plan.md has
the worked 8B/70B examples and the estimate against measured peak memory; rl_lora/estimate/plan_text.py prints a plan.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
import transformers
from torch import nn

from rl_lora.adapters.counting import (
    MoeLayout,
    MoePlan,
    adapter_type_parameter_count,
    check_fused_experts,
    expert_rank_multiple,
    meta_model,
    model_linear_shapes,
    moe_layout,
    resolve_expert_rank,
    targeted_experts,
    targeted_shapes,
)
from rl_lora.adapters.targets import ALL_LINEAR
from rl_lora.config.adapter_options import ADAPTER_TYPES
from rl_lora.config.algorithms import algorithm_info
from rl_lora.config.schema import DpoRecipe, GrpoRecipe, PpoRecipe, RecipeConfig, RewardRecipe
from rl_lora.utils.errors import ConfigError, ModelError, first_line

Shapes = dict[str, tuple[int, int]]
Method = int | Literal["full"]  # a LoRA rank, or full fine-tuning

# Fraction of a device's memory left for what the estimate leaves out: the CUDA context, the allocator's
# fragmentation, temporaries (a ZeRO-3 layer gathered for its forward, communication buckets, the
# optimizer step's scratch). A judgement, not a measurement.
HEADROOM = 0.10
# The families whose layers the activation and KV-cache formulas describe: attention with (grouped)
# key/value heads and a gated MLP (gate, up, down), or routed experts of such MLPs. Others are estimated as
# if they were built that way, and the plan says so; parameter counts are exact for every architecture.
MODELLED = frozenset({
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "granite", "olmo2", "smollm3", "cohere",
    "qwen2_moe", "qwen3_moe", "mixtral",
})
# Where a config names them: fields every estimate needs (transformers would silently fill its defaults).
REQUIRED_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size")
# Search bound for the smallest device count that fits (the batch bounds it first).
MAX_DEVICES = 4096
# transformers' "auto" for ZeRO-3's stage3_param_persistence_threshold: tensors of at most this many
# elements per unit of hidden size stay whole on every device (rl_lora/training/distributed.py).
PERSISTENCE_PER_HIDDEN = 10
# ZeRO-1/2 pad each optimizer param group to a multiple of this x the device count (DeepSpeed's
# nccl_start_alignment_factor, runtime/zero/stage_1_and_2.py).
ZERO2_ALIGNMENT = 2
# Names transformers' Trainer leaves out of weight decay: its second optimizer param group.
NO_DECAY_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")
# Tokens the arithmetic task's plain prompt "a+b=" has besides its operands' digits ("+", "=", BOS).
ARITHMETIC_PROMPT_EXTRA = 3
DEFAULT_PROMPT_TOKENS = 256

# The rows of rl-lora plan's table, in this order (labels of ``parts``).
PART_ORDER = ("policy weights", "LoRA adapter", *(f"{t} adapter" for t in ADAPTER_TYPES if t != "lora"),
              "score head copy", "value adapter", "value head", "critic copy", "reference copy")
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_UNITS = {"": 10**9, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
GB = 10**9


def parse_memory(text: str) -> int:
    """Bytes in ``80GB``, ``80 GB``, ``141GiB``, ``512MB`` (a bare number is GB). Raises ConfigError."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ConfigError(f"--device-memory '{text}': not a memory size; write e.g. 80GB, 80GiB or 141GB "
                          "(units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    return int(float(match.group(1)) * _UNITS[unit])


# --- the model, from its config ---------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFacts:
    """What the estimate reads of a model: its shape fields and every parameter's size, from a meta build."""

    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int  # the MLP's width (an expert's, for MoE)
    vocab: int
    params: dict[str, int]  # name -> elements, tied weights once
    no_decay: frozenset[str]  # names transformers' Trainer leaves out of weight decay
    decoder: tuple[str, ...]  # the parameters of the decoder without the output head (PPO's critic copy)
    linears: Shapes  # nn.Linear shapes without the head (LoRA targets)
    head: tuple[int, int] | None  # the output head's (in, out), tied or not
    moe: MoeLayout | None

    @property
    def parameters(self) -> int:
        return sum(self.params.values())

    @property
    def modelled(self) -> bool:
        return self.model_type in MODELLED



def _raw_config(policy: str) -> dict | None:
    """The config.json mapping of a folder, a file or a cached hub id; None for what has none to read."""
    from rl_lora.models.policies import classify

    if classify(policy).form in ("source", "gguf"):
        return None
    try:
        raw, _ = transformers.PretrainedConfig.get_config_dict(policy)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.policy '{policy}': cannot read its config ({first_line(exc)})") from exc
    return raw


def _check_fields(policy: str, raw: dict) -> None:
    """The architecture is one transformers knows, and the shape fields the estimate needs are written."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    kind = raw.get("model_type")
    if not kind:
        raise ModelError(f"model.policy '{policy}': its config has no model_type, so the architecture is unknown")
    if kind not in CONFIG_MAPPING:
        raise ModelError(f"model.policy '{policy}': unknown architecture '{kind}' (transformers "
                         f"{transformers.__version__} does not know this model_type)")
    config_class = CONFIG_MAPPING[kind]
    text = raw.get("text_config") or raw
    aliases = getattr(config_class, "attribute_map", {})
    probe = config_class()
    missing = [name for name in REQUIRED_FIELDS
               if name not in text and aliases.get(name) not in text and hasattr(probe.get_text_config(), name)]
    if missing:
        raise ModelError(f"model.policy '{policy}': its config lacks {', '.join(missing)}, which the estimate needs "
                         f"(a {kind} config.json names them; transformers would fill in its defaults)")


def plan_model_config(config: RecipeConfig) -> transformers.PretrainedConfig:
    """The recipe's model config: the advisor's (built-in model, folder, cached hub id, GGUF), or a bare
    ``config.json`` file; the shape fields are checked first. Raises ModelError."""
    from rl_lora.estimate.advisor import recipe_model_config

    policy = config.model.policy
    raw = _raw_config(policy)
    if raw is not None:
        _check_fields(policy, raw)
    if Path(policy).is_file() and policy.endswith(".json"):
        return transformers.AutoConfig.from_pretrained(policy, trust_remote_code=config.model.trust_remote_code)
    return recipe_model_config(config)


def _first(text: transformers.PretrainedConfig, *names: str) -> int | None:
    return next((int(getattr(text, n)) for n in names if getattr(text, n, None)), None)


def model_facts(model_config: transformers.PretrainedConfig, reward_model: bool = False,
                trust_remote_code: bool = False) -> ModelFacts:
    """Measure the model on the meta device: every parameter, the linears, the MoE layout, the shape fields.

    ``reward_model``: the sequence classifier reward-model training trains (a one-logit ``score`` head in
    place of the output head).
    """
    from transformers.trainer_pt_utils import get_parameter_names

    text = model_config.get_text_config()
    try:
        if reward_model:  # as rl_lora.models.loading loads it: one logit
            scorer = copy.deepcopy(model_config)
            scorer.num_labels = 1
            with torch.device("meta"):
                model = transformers.AutoModelForSequenceClassification.from_config(
                    scorer, trust_remote_code=trust_remote_code)
        else:
            model = meta_model(model_config, trust_remote_code)
    except (ValueError, KeyError, ImportError) as exc:
        raise ModelError(f"model type '{model_config.model_type}': transformers cannot build it from its config "
                         f"({first_line(exc)})") from exc
    params = {name: p.numel() for name, p in model.named_parameters()}
    decay = set(get_parameter_names(model, [nn.LayerNorm], list(NO_DECAY_PATTERNS)))
    prefix = model.base_model_prefix
    decoder = tuple(n for n in params if n.startswith(f"{prefix}."))
    head = model.get_output_embeddings() if not reward_model else getattr(model, "score", None)
    heads = _first(text, "num_attention_heads")
    hidden = _first(text, "hidden_size")
    layers = _first(text, "num_hidden_layers")
    if hidden is None or heads is None or layers is None:
        raise ModelError(f"model type '{model_config.model_type}': its config names no hidden_size, "
                         "num_hidden_layers or num_attention_heads")
    linears = model_linear_shapes(model)
    if reward_model and isinstance(head, nn.Linear):
        linears.pop("score", None)
    return ModelFacts(
        model_type=str(model_config.model_type),
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=_first(text, "num_key_value_heads") or heads,
        head_dim=_first(text, "head_dim") or hidden // heads,
        # an architecture that names its MLP width otherwise (OPT's ffn_dim): the widest linear
        intermediate=_first(text, "moe_intermediate_size", "intermediate_size") or max(
            (max(shape) for shape in linears.values()), default=4 * hidden),
        vocab=_first(text, "vocab_size") or 0,
        params=params,
        no_decay=frozenset(params) - decay,
        decoder=decoder,
        linears=linears,
        head=(head.in_features, head.out_features) if isinstance(head, nn.Linear) else None,
        moe=moe_layout(model),
    )


# --- what training holds ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """Tensors training holds for one purpose (policy weights, an adapter, the critic, the reference)."""

    label: str
    sizes: tuple[int, ...]  # elements of each tensor: ZeRO-3 partitions tensor by tensor
    element_bytes: int  # bytes per element as held
    trainable: bool = False
    groups: tuple[int, ...] = ()  # the optimizer param group of each tensor (ZeRO-1/2 pad each group)
    engine: bool = True  # inside the DeepSpeed engine (partitioned by ZeRO-3); a PPO reference is not
    tracked: bool = True  # held by the module a run's tracker measures (rl_lora/training/memory.py state_bytes)
    quantized: tuple[int, ...] = ()  # of ``sizes``, the 4-bit ones (QLoRA's base linears)

    @property
    def elements(self) -> int:
        return sum(self.sizes)


def _nf4_bytes(elements: int) -> int:
    """A bitsandbytes NF4 weight: two codes per byte, an fp32 absmax per 64 weights, a 16-entry fp32 code book
    (rl_lora.training.memory.quantization_state_bytes)."""
    return math.ceil(elements / 2) + 4 * math.ceil(elements / 64) + 16 * 4


def _targeted_linears(facts: ModelFacts, targets: str | list[str]) -> Shapes:
    """The linears ``targets`` selects; none is fine on an MoE model whose targets name experts only."""
    try:
        return targeted_shapes(facts.linears, targets)
    except ConfigError:
        if facts.moe is not None and targeted_experts(facts.moe, targets):
            return {}
        raise


def adapter_sizes(facts: ModelFacts, rank: int, targets: str | list[str], moe: MoePlan | None) -> tuple[int, ...]:
    """Elements of each LoRA tensor PEFT creates: A (r x in) and B (out x r) per targeted linear; on fused
    experts (E, a, b) at expert rank r_e, A (r_e E x a) and B (b x r_e E); routers when trained."""
    sizes: list[int] = []
    for d_in, d_out in _targeted_linears(facts, targets).values():
        sizes += [rank * d_in, rank * d_out]
    if moe is not None:
        per_expert = resolve_expert_rank(rank, moe.layout, moe.expert_rank)
        for name, (experts, a, b) in targeted_experts(moe.layout, targets).items():
            r = per_expert * expert_rank_multiple(name) * experts
            sizes += [r * a, r * b]
        if moe.train_router:
            for d_in, d_out in moe.layout.routers.values():
                sizes += [rank * d_in, rank * d_out]
    return tuple(sizes)


def adapter_type_sizes(facts: ModelFacts, config: RecipeConfig, rank: int) -> tuple[int, ...]:
    """Elements of each trainable tensor of another adapter type (``lora.adapter``), per targeted linear; TinyLoRA's
    shared vectors once each. Frozen buffers (VeRA's projections, TinyLoRA's SVD factors) are not counted."""
    lora = config.lora
    check_fused_experts(lora.adapter, facts.moe, lora.targets)
    linears = _targeted_linears(facts, lora.targets)
    if lora.adapter == "tinylora":
        total = adapter_type_parameter_count(linears, "tinylora", rank, ALL_LINEAR, lora.adapter_options)
        groups = adapter_type_parameter_count(linears, "tinylora", rank, ALL_LINEAR,
                                              {**lora.adapter_options, "u": 1})
        return (total // groups,) * groups
    return tuple(adapter_type_parameter_count({name: shape}, lora.adapter, rank, ALL_LINEAR, lora.adapter_options)
                 for name, shape in linears.items())


@dataclass(frozen=True)
class Precision:
    """How the run stores each kind of tensor (rl_lora/algorithms/common.py, PEFT, DeepSpeed).

    PEFT keeps adapters fp32 on a bf16 base (autocast_adapter_dtype), and torch's AdamW keeps its moments
    in each parameter's dtype: a bf16 full fine-tune without DeepSpeed has bf16 moments and no master
    copy. DeepSpeed with bf16/fp16 (``mixed``) casts every parameter to that dtype and keeps an fp32 master
    copy and fp32 moments of every trainable one.
    """

    weights: int  # bytes per element of the base (model.dtype), and of activations
    adapters: int  # LoRA tensors and PPO's value head
    mixed: bool


def precision(config: RecipeConfig) -> Precision:
    weights = _DTYPE_BYTES[config.model.dtype]
    mixed = config.distributed.zero_stage is not None and weights < 4
    return Precision(weights, weights if mixed else 4, mixed)


def _policy_part(facts: ModelFacts, config: RecipeConfig, p: Precision, trainable: bool) -> Part:
    names = list(facts.params)
    sizes = tuple(facts.params[n] for n in names)
    groups = tuple(int(n in facts.no_decay) for n in names)
    quantized: tuple[int, ...] = ()
    if config.model.quantization == "nf4":  # bitsandbytes quantises the linears, not the head or the experts
        quantized = tuple(i for i, n in enumerate(names) if n.removesuffix(".weight") in facts.linears)
    return Part("policy weights", sizes, p.weights, trainable, groups, quantized=quantized)


def parts(facts: ModelFacts, config: RecipeConfig, rank: Method) -> list[Part]:
    """Everything the recipe's algorithm holds in training at ``rank`` (a number, or "full")."""
    p = precision(config)
    full = rank == "full"
    lora = config.lora
    info = algorithm_info(config.algorithm)
    out = [_policy_part(facts, config, p, trainable=full)]
    if not full:
        moe = MoePlan(facts.moe, lora.expert_rank, lora.train_router) if facts.moe is not None else None
        if lora.adapter == "lora":
            sizes = adapter_sizes(facts, int(rank), lora.targets, moe)
        else:
            sizes = adapter_type_sizes(facts, config, int(rank))
        label = "LoRA adapter" if lora.adapter == "lora" else f"{lora.adapter} adapter"
        out.append(Part(label, sizes, p.adapters, True, (0,) * len(sizes)))
        if info.scores_sequences:  # PEFT's modules_to_save: a trainable copy of the score head beside the original
            score = tuple(facts.params[n] for n in facts.params if n.startswith("score."))
            out.append(Part("score head copy", score, p.adapters, True, (0,) * len(score)))
        if info.has_critic:  # the critic: a second adapter on the same base, and a value head (fp32)
            out.append(Part("value adapter", sizes, p.adapters, True, (1,) * len(sizes)))
    if info.has_critic:
        if full:  # a deep copy of the decoder (the output head is not part of it)
            critic = tuple(facts.params[n] for n in facts.decoder)
            out.append(Part("critic copy", critic, p.weights, True, (1,) * len(critic), tracked=False))
        out.append(Part("value head", (facts.hidden, 1), p.adapters, True, (1, 1), tracked=False))
    if full and (info.keeps_reference or (isinstance(config, GrpoRecipe) and config.grpo.beta > 0)):
        ref = tuple(facts.params.values())  # TRL partitions its reference under ZeRO-3; PPO's stays whole
        out.append(Part("reference copy", ref, p.weights, engine=info.trl_config is not None,
                        tracked=False))
    return out


# --- per device -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where the run goes: devices and the recipe's DeepSpeed settings (``distributed:``)."""

    devices: int = 1
    zero_stage: int | None = None  # None: no DeepSpeed (one process, or DDP: everything on every device)
    offload_optimizer: bool = False
    offload_params: bool = False
    persistence: int = 0  # ZeRO-3: tensors of at most this many elements stay whole on every device


@dataclass(frozen=True)
class Breakdown:
    """Bytes per device for one method; ``weights`` by part label."""

    weights: dict[str, int]
    gradients: int
    moments: int
    master: int
    offloaded: int  # optimizer state and master weights (and ZeRO-3 parameter slices) moved to CPU memory
    activations: int
    activations_checkpointed: int
    kv_cache: int
    merged_copy: int = 0  # LoRA rollouts with merged adapters: a merged copy of every adapted weight (rollout.py)
    accumulating: bool = False  # several micro-steps per optimizer step: their gradients add up in place
    logged: dict[str, int] = field(default_factory=dict)  # what metrics.jsonl reports (rl_lora/training/memory.py)

    @property
    def states(self) -> int:
        return sum(self.weights.values()) + self.moments + self.master

    def training(self, checkpointing: bool = False) -> int:
        """Gradients and activations at their highest: a backward pass frees each layer's activations as it
        makes that layer's gradients, so in one micro-step the two peak apart (the larger of them); when
        micro-steps accumulate, the gradients of the earlier ones are whole under the next one's activations."""
        act = self.activations_checkpointed if checkpointing else self.activations
        return self.gradients + act if self.accumulating else max(self.gradients, act)

    def peak(self, checkpointing: bool = False) -> int:
        """Weights and optimizer state always; then the larger of training and a rollout's generation (KV
        cache, merged weights): gradients are freed before the next rollout."""
        return self.states + max(self.training(checkpointing), self.kv_cache + self.merged_copy)


def _part_bytes(part: Part, layout: Layout, gathered: bool = True) -> tuple[int, int]:
    """(bytes on the device, bytes offloaded to CPU memory) of a part's tensors.

    Under ZeRO-3 a device holds each tensor's slice, ceil(n / devices) elements, and a tensor small enough
    to persist whole as well, once a forward pass has gathered it (``gathered``); with
    ``offload_params`` the slices of the other tensors live in CPU memory.
    """
    zero3 = layout.zero_stage == 3 and part.engine
    device = host = 0
    for i, size in enumerate(part.sizes):
        if i in part.quantized:
            device += _nf4_bytes(size)
        elif not zero3:
            device += size * part.element_bytes
        else:
            persists = size <= layout.persistence
            whole = size if persists and gathered else 0
            piece = math.ceil(size / layout.devices)
            offloaded = layout.offload_params and not persists
            device += (whole + (0 if offloaded else piece)) * part.element_bytes
            host += piece * part.element_bytes if offloaded else 0
    return device, host


def _optimizer_slices(all_parts: list[Part], layout: Layout) -> int | None:
    """Trainable elements whose gradients and optimizer state one device holds under ZeRO-2/3, else None."""
    trainable = [p for p in all_parts if p.trainable]
    if layout.zero_stage == 3:
        return sum(math.ceil(s / layout.devices) for p in trainable for s in p.sizes)
    if layout.zero_stage == 2:
        per_group: dict[int, int] = {}
        for p in trainable:
            for size, group in zip(p.sizes, p.groups, strict=True):
                per_group[group] = per_group.get(group, 0) + size
        align = ZERO2_ALIGNMENT * layout.devices
        return sum(math.ceil(n / align) * align // layout.devices for n in per_group.values() if n)
    return None


def state_breakdown(all_parts: list[Part], layout: Layout, p: Precision) -> Breakdown:
    """Weights, gradients, optimizer state and master weights per device; activations left at 0."""
    placed = {part.label: _part_bytes(part, layout) for part in all_parts}
    weights = {label: device for label, (device, _) in placed.items()}
    trainable_bytes = sum(weights[part.label] for part in all_parts if part.trainable)
    trainable_elements = sum(part.elements for part in all_parts if part.trainable)
    slices = _optimizer_slices(all_parts, layout)
    if slices is None:  # every device holds every gradient and all of the optimizer state
        gradients, master = trainable_bytes, 4 * trainable_elements if p.mixed else 0
        moments = sum(part.elements * (8 if p.mixed else 2 * part.element_bytes)
                      for part in all_parts if part.trainable)
    else:  # ZeRO-2/3: this device's slices, gradients reduced into the fp32 master dtype
        gradients, moments = 4 * slices, 8 * slices
        # ZeRO-2 always keeps an fp32 copy of its slice; ZeRO-3 updates fp32 weights in place
        # (rl_lora.training.distributed.share_zero3_fp32_master_weights) unless they are bf16/fp16 or offloaded.
        shared = layout.zero_stage == 3 and not p.mixed and not layout.offload_optimizer
        master = 0 if shared else 4 * slices
    # rl_lora.training.memory counts the optimizer's state wherever it lives; without ZeRO-2/3 it sees the torch
    # optimizer's moments only (DeepSpeed's ZeRO-0 bf16/fp16 wrapper keeps its master copy elsewhere).
    logged = _logged(all_parts, layout, weights, gradients, moments + master if slices is not None else moments,
                     slices is not None)
    offloaded = sum(host for _, host in placed.values())
    if layout.offload_optimizer and layout.zero_stage in (2, 3):
        offloaded, moments, master = offloaded + moments + master, 0, 0
    return Breakdown(weights, gradients, moments, master, offloaded, 0, 0, 0, logged=logged)


def _logged(all_parts: list[Part], layout: Layout, weights: dict[str, int], gradients: int, optimizer: int,
            zero: bool) -> dict:
    """What rl_lora.training.memory.state_bytes logs for these parts: the tracked module's parameters, its trainable
    ones and, without ZeRO-2/3, their gradients; all of the optimizer's state. PPO's tracker sees the
    policy module, so its value head and a full critic count in the optimizer only (and their gradients
    under ZeRO-2/3, where the gradients are the optimizer's slices); a reference copy is logged apart, as
    reference_param_bytes, once, before its first forward pass (under ZeRO-3: its slices only)."""
    tracked = [p for p in all_parts if p.tracked]
    trainable = sum(weights[p.label] for p in tracked if p.trainable)
    reference = sum(_part_bytes(p, layout, gathered=False)[0] for p in all_parts if p.label == "reference copy")
    return {
        "param_bytes": sum(weights[p.label] for p in tracked),
        "trainable_param_bytes": trainable,
        "grad_bytes": gradients if zero else trainable,
        "optimizer_bytes": optimizer,
        "reference_param_bytes": reference,
    }


# --- activations, generation, FLOPs -----------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """One optimizer step's sequences, per device, as the recipe's trainer runs them."""

    train_sequences: int  # per device per micro-step (a PPO minibatch's share; DPO: chosen + rejected)
    train_length: int  # tokens per training sequence
    vocab_positions: int  # positions per sequence whose vocabulary logits are kept (0: a value or score head)
    passes: int  # networks trained in one backward (PPO: policy and critic)
    generated_sequences: int  # per device per rollout (0: no generation)
    generated_length: int  # prompt + completion
    trained_tokens: int  # all devices, one optimizer step, every pass (for FLOPs)
    prompt_tokens: int
    prompt_assumed: bool  # the prompt length is a default, not the task's
    micro_steps: int = 1  # micro-steps whose gradients accumulate into one optimizer step


def default_prompt_tokens(config: RecipeConfig) -> tuple[int, bool]:
    """(prompt tokens, assumed?): the arithmetic task's plain prompt "a+b=" is a few characters; for other
    tasks the length is unknown here, so a default is assumed (``--prompt-tokens`` sets it)."""
    data = config.data
    if data.task == "arithmetic" and data.prompt_style == "plain":
        return 2 * len(str(data.max_operand)) + ARITHMETIC_PROMPT_EXTRA, False
    return DEFAULT_PROMPT_TOKENS, True


def workload(config: RecipeConfig, devices: int, prompt_tokens: int | None = None,
             micro_batch: int | None = None) -> Workload:
    """What one step trains and generates, per device; shares round up where the batch does not divide.

    ``micro_batch``: at most this many completions (or pairs) per device per micro-step, as more gradient
    accumulation would keep it on fewer devices (PPO accumulates nothing: its share of a minibatch).
    """
    assumed = prompt_tokens is None
    prompt = prompt_tokens if prompt_tokens is not None else default_prompt_tokens(config)[0]
    assumed = assumed and default_prompt_tokens(config)[1]
    batch, accum = config.train.batch_size, config.distributed.gradient_accumulation
    share = min(math.ceil(batch / (devices * accum)), micro_batch or batch)
    steps = math.ceil(batch / (devices * share))
    if isinstance(config, GrpoRecipe):
        length = prompt + config.grpo.max_completion_length
        return Workload(share, length, config.grpo.max_completion_length, 1, math.ceil(batch / devices), length,
                        batch * length, prompt, assumed, steps)
    if isinstance(config, PpoRecipe):
        ppo = config.ppo
        length = prompt + ppo.max_completion_length
        # every epoch trains each completion once, through the policy and through the critic; each minibatch
        # is an optimizer step of its own
        return Workload(math.ceil(ppo.minibatch_size / devices), length, ppo.max_completion_length + 1, 2,
                        math.ceil(batch / devices), length, 2 * ppo.epochs * batch * length, prompt, assumed)
    if isinstance(config, DpoRecipe):  # TRL runs chosen and rejected together, at most dpo.max_length tokens each
        length = config.dpo.max_length
        return Workload(2 * share, length, length, 1, 0, 0, 2 * batch * length, prompt, False, steps)
    assert isinstance(config, RewardRecipe)  # the one algorithm left
    length = config.reward_model.max_length
    return Workload(2 * share, length, 0, 1, 0, 0, 2 * batch * length, prompt, False, steps)


def layer_elements(facts: ModelFacts) -> int:
    """Activation elements one decoder layer keeps per token for the backward pass (an estimate).

    Attention: the norm's input, normalised value and output (3h), q, k and v as SDPA keeps them
    ((heads + 2 kv heads) x head_dim), SDPA's output and o_proj's contiguous input (2 heads x head_dim); no
    seq x seq scores (SDPA / flash attention; eager attention keeps heads x seq more per token). Gated MLP:
    the norm (3h) and gate, up, act(gate), act(gate) x up (4 x MLP width). MoE: each of the k experts a
    token visits keeps its copy of the token and its 4 x expert width, and the router its logits.
    LoRA adds only its rank-wide intermediates and, with frozen norms, keeps no normalised values: the
    full-parameter figure serves both (bench/plan_vs_measured.py: 3% above what autograd keeps for full
    fine-tuning, 16% above for LoRA).
    """
    h, d = facts.hidden, facts.head_dim
    attention = 3 * h + (3 * facts.heads + 2 * facts.kv_heads) * d
    if facts.moe is not None:
        experts = next(iter(facts.moe.experts.values()))[0]
        k = facts.moe.experts_per_token
        return attention + 3 * h + k * (h + 4 * facts.intermediate) + experts
    return attention + 3 * h + 4 * facts.intermediate


def activation_bytes(facts: ModelFacts, work: Workload, element_bytes: int, checkpointing: bool) -> int:
    """Bytes one micro-batch's forward keeps for its backward, per device (an estimate):

        tokens x (layers x layer_elements x bytes  [checkpointing: layers x hidden x bytes + one layer's])
        + sequences x kept positions x vocab x (bytes + 4)   (the logits, and their fp32 gradient)

    for each network the step trains (PPO: the policy's pass and the critic's, which keeps no logits).
    """
    tokens = work.train_sequences * work.train_length
    per_layer = layer_elements(facts) * element_bytes
    if checkpointing:  # each layer's input, and one layer recomputed at a time during the backward
        body = work.passes * tokens * facts.layers * facts.hidden * element_bytes + tokens * per_layer
    else:
        body = work.passes * tokens * facts.layers * per_layer
    logits = work.train_sequences * work.vocab_positions * facts.vocab * (element_bytes + 4)
    return body + logits


def kv_cache_bytes(facts: ModelFacts, work: Workload, element_bytes: int) -> int:
    """A rollout's generation, per device: keys and values of every layer for every position of every
    sequence, 2 x layers x kv heads x head_dim x (prompt + completion) x sequences x bytes, plus one
    position's fp32 logits per sequence. MoE and MLA variants that cache less are not modelled."""
    if not work.generated_sequences:
        return 0
    cache = 2 * facts.layers * facts.kv_heads * facts.head_dim * work.generated_length * work.generated_sequences
    return cache * element_bytes + work.generated_sequences * facts.vocab * 4


def merged_copy_bytes(facts: ModelFacts, config: RecipeConfig, method: Method, layout: Layout) -> int:
    """A LoRA rollout with merged adapters (``grpo.merge_rollouts`` / ``ppo.merge_rollouts``) generates with
    W + scale B A in place of each adapted weight and keeps W to put back (rl_lora/adapters/rollout.py): one more
    copy of every adapted linear's weight while it generates. Skipped under ZeRO-3 and on a 4-bit base."""
    merging = ((isinstance(config, GrpoRecipe) and config.grpo.merge_rollouts)
               or (isinstance(config, PpoRecipe) and config.ppo.merge_rollouts))
    if method == "full" or not merging or layout.zero_stage == 3 or config.model.quantization != "none":
        return 0
    if config.lora.adapter != "lora":  # other adapter types generate unmerged
        return 0
    weights = sum(d_in * d_out for d_in, d_out in _targeted_linears(facts, config.lora.targets).values())
    return weights * precision(config).weights


def flops_per_token(facts: ModelFacts, config: RecipeConfig, rank: Method) -> float:
    """Training FLOPs per token of one network: rl_lora.training.flops over the linears and the head (as a run's
    tracker counts them), plus the experts a token visits on an MoE model."""
    from rl_lora.training.flops import training_flops_per_token

    shapes = dict(facts.linears)
    if facts.head is not None:
        shapes["<head>"] = facts.head
    full = rank == "full"
    adapted = {} if full else {name: int(rank) for name in _targeted_linears(facts, config.lora.targets)}
    total = training_flops_per_token(shapes, adapted)
    if facts.moe is not None:
        k = facts.moe.experts_per_token
        targeted = targeted_experts(facts.moe, config.lora.targets) if not full else {}
        per_expert = 0 if full else resolve_expert_rank(int(rank), facts.moe, config.lora.expert_rank)
        for name, (_, a, b) in facts.moe.experts.items():
            dense = 2.0 * a * b * k
            if full:
                total += 3 * dense
            else:
                r = per_expert * expert_rank_multiple(name) if name in targeted else 0
                total += 2 * dense + 6.0 * r * (a + b) * k
    return total


# --- the plan ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodPlan:
    """One method (full, or a LoRA rank) at the plan's layout."""

    method: Method
    breakdown: Breakdown
    flops_per_step: float
    smallest: dict[tuple[int | None, bool], int | None]  # (ZeRO stage, checkpointing) -> devices, None: none fit
    adapter: str = "lora"  # lora.adapter of a non-full method

    @property
    def label(self) -> str:
        if self.method == "full":
            return "full"
        return f"LoRA r{self.method}" if self.adapter == "lora" else f"{self.adapter} r{self.method}"


@dataclass(frozen=True)
class Plan:
    config: RecipeConfig
    facts: ModelFacts
    layout: Layout
    device_memory: int
    work: Workload
    methods: list[MethodPlan]

    @property
    def usable(self) -> int:
        """Device memory less HEADROOM: what the peak must stay under."""
        return int(self.device_memory * (1 - HEADROOM))


def recipe_layout(config: RecipeConfig, facts: ModelFacts, devices: int) -> Layout:
    spec = config.distributed
    persistence = PERSISTENCE_PER_HIDDEN * facts.hidden if spec.zero_stage == 3 else 0
    return Layout(devices, spec.zero_stage, spec.offload_optimizer, spec.offload_params, persistence)


def breakdown(facts: ModelFacts, config: RecipeConfig, method: Method, layout: Layout,
              prompt_tokens: int | None = None, micro_batch: int | None = None) -> Breakdown:
    """Every figure per device for one method at ``layout`` (``micro_batch``: see ``workload``)."""
    p = precision(config)
    states = state_breakdown(parts(facts, config, method), layout, p)
    work = workload(config, layout.devices, prompt_tokens, micro_batch)
    return replace(states, activations=activation_bytes(facts, work, p.weights, False),
                   activations_checkpointed=activation_bytes(facts, work, p.weights, True),
                   kv_cache=kv_cache_bytes(facts, work, p.weights),
                   merged_copy=merged_copy_bytes(facts, config, method, layout), accumulating=work.micro_steps > 1)


def device_counts(config: RecipeConfig) -> list[int]:
    """Device counts the recipe's batch divides over, ascending (PPO's minibatch as well), up to MAX_DEVICES."""
    batch = config.train.batch_size
    counts = [n for n in range(1, min(batch, MAX_DEVICES) + 1) if batch % n == 0]
    if isinstance(config, PpoRecipe):
        counts = [n for n in counts if config.ppo.minibatch_size % n == 0]
    return counts


def micro_batch(config: RecipeConfig, devices: int) -> int:
    """Completions (or pairs) per device per micro-step at ``devices`` devices."""
    return math.ceil(config.train.batch_size / (devices * config.distributed.gradient_accumulation))


def smallest_devices(facts: ModelFacts, config: RecipeConfig, method: Method, layout: Layout, usable: int,
                     checkpointing: bool, prompt_tokens: int | None = None) -> int | None:
    """The fewest devices whose per-device peak fits ``usable`` bytes, or None: among the counts the batch
    divides over, each device at most at ``layout``'s micro-batch (fewer devices take more micro-steps of
    gradient accumulation, not bigger ones; PPO's minibatch share is what it is).

    The peak never grows with the device count, so a bisection over the counts finds it.
    """
    cap = micro_batch(config, layout.devices)

    def fits(n: int) -> bool:
        size = replace(layout, devices=n)
        return breakdown(facts, config, method, size, prompt_tokens, cap).peak(checkpointing) <= usable

    counts = device_counts(config)
    if not fits(counts[-1]):
        return None
    low, high = 0, len(counts) - 1
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if fits(counts[mid]) else (mid + 1, high)
    return counts[high]


def recipe_facts(config: RecipeConfig) -> ModelFacts:
    """The shapes the plan reads for ``config``'s policy (a sequence-scoring model for a reward model)."""
    return model_facts(plan_model_config(config), algorithm_info(config.algorithm).scores_sequences,
                       config.model.trust_remote_code)


def fewest_devices(config: RecipeConfig, device_memory: int, prompt_tokens: int | None = None) -> int | None:
    """The fewest devices of ``device_memory`` bytes one run of ``config`` needs as written: its own method (full
    or its rank), ZeRO stage and gradient checkpointing (``trl.gradient_checkpointing``); None when no count the
    batch divides over fits. A sweep on Ray gives each arm this many devices unless ``--devices`` says otherwise."""
    facts = recipe_facts(config)
    method: Method = "full" if config.lora.is_full else int(config.lora.rank)
    checkpointing = bool((getattr(config, "trl", None) or {}).get("gradient_checkpointing", False))
    usable = int(device_memory * (1 - HEADROOM))
    return smallest_devices(facts, config, method, recipe_layout(config, facts, 1), usable, checkpointing,
                            prompt_tokens)


def _with(config: RecipeConfig, section: str, **values: object) -> RecipeConfig:
    """``config`` with keys of one section replaced (not validated again: the plan's variants only)."""
    return config.model_copy(update={section: getattr(config, section).model_copy(update=values)})


def compare_methods(config: RecipeConfig) -> list[Method]:
    """Full fine-tuning and the recipe's rank (rank 1 when the recipe itself is full)."""
    return ["full", 1 if config.lora.is_full else int(config.lora.rank)]


def make_plan(config: RecipeConfig, devices: int = 1, device_memory: int = 80 * GB,
              prompt_tokens: int | None = None) -> Plan:
    """The plan of ``config`` on ``devices`` devices of ``device_memory`` bytes. Raises ModelError/ConfigError."""
    if devices < 1:
        raise ConfigError(f"--devices {devices}: must be at least 1")
    if prompt_tokens is not None and prompt_tokens < 1:
        raise ConfigError(f"--prompt-tokens {prompt_tokens}: must be at least 1")
    facts = recipe_facts(config)
    layout = recipe_layout(config, facts, devices)
    usable = int(device_memory * (1 - HEADROOM))
    stages = [layout.zero_stage] + ([3] if layout.zero_stage != 3 else [])
    methods = []
    for method in compare_methods(config):
        # the full-parameter baseline of a QLoRA recipe trains an unquantised base
        method_config = _with(config, "model", quantization="none") if method == "full" else config
        smallest = {}
        for stage in stages:
            staged = _with(method_config, "distributed", zero_stage=stage,
                           offload_params=method_config.distributed.offload_params and stage == 3)
            refused = stage is not None and method_config.model.quantization != "none"  # QLoRA: no DeepSpeed
            for checkpointing in (False, True):
                smallest[(stage, checkpointing)] = None if refused else smallest_devices(
                    facts, staged, method, recipe_layout(staged, facts, devices), usable, checkpointing,
                    prompt_tokens)
        flops = workload(method_config, devices, prompt_tokens).trained_tokens * flops_per_token(
            facts, method_config, method)
        methods.append(MethodPlan(method, breakdown(facts, method_config, method, layout, prompt_tokens), flops,
                                  smallest, config.lora.adapter))
    return Plan(config, facts, layout, device_memory, workload(config, devices, prompt_tokens), methods)
