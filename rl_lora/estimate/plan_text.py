"""What ``rl-lora plan`` prints: a Plan (rl_lora/estimate/plan.py) as a table of bytes per device, fit, FLOPs and
notes."""

from __future__ import annotations

import os

from rl_lora.config.algorithms import algorithm_info
from rl_lora.config.schema import RecipeConfig
from rl_lora.estimate.plan import GB, HEADROOM, PART_ORDER, Breakdown, ModelFacts, Plan, Workload, precision
from rl_lora.training.flops import PEAK_TFLOPS


def _stage_text(stage: int | None) -> str:
    return "no DeepSpeed" if stage is None else f"ZeRO-{stage}"


def _row(label: str, values: list[str]) -> str:
    return f"  {label:<38}" + "".join(f"{v:>14}" for v in values)


def _size_text(n: int) -> str:
    return f"{n / GB:,.2f} GB" if n >= GB / 10 else f"{n / 10**6:,.2f} MB"


def _notes(plan: Plan) -> list[str]:
    config, facts, work = plan.config, plan.facts, plan.work
    info = algorithm_info(config.algorithm)
    notes = []
    if not facts.modelled:
        notes.append(f"note: '{facts.model_type}' is approximated: activations and KV cache are estimated as for a "
                     "Llama-style decoder (attention with KV heads and a gated MLP); parameter, gradient and "
                     "optimizer bytes are exact")
    if work.prompt_assumed:
        notes.append(f"note: prompts assumed {work.prompt_tokens} tokens (--prompt-tokens sets it)")
    batch = config.train.batch_size
    if batch % (plan.layout.devices * config.distributed.gradient_accumulation):
        notes.append(f"note: train.batch_size {batch} does not divide over {plan.layout.devices} devices x "
                     f"{config.distributed.gradient_accumulation} micro-steps: a run refuses it (shares rounded up)")
    if plan.layout.devices > 1 and info.processes_need_zero and plan.layout.zero_stage is None:
        notes.append(f"note: {config.algorithm} on several devices needs distributed.zero_stage (0, 2 or 3)")
    if config.model.quantization != "none":
        notes.append("note: QLoRA is refused under DeepSpeed, so its ZeRO-3 device count reads '-'")
    merged = max(m.breakdown.merged_copy for m in plan.methods)
    if merged:
        notes.append(f"note: merged rollouts keep a second copy of the adapted weights while generating "
                     f"({_size_text(merged)}); {config.algorithm}.merge_rollouts=false saves it, at some speed")
    if info.uses_preferences:
        notes.append(f"note: {config.algorithm} sequences counted at their length limit "
                     f"({work.train_length} tokens); shorter pairs need less")
    return notes


def plan_lines(plan: Plan) -> list[str]:
    """What ``rl-lora plan`` prints: the layout, bytes per device by kind for each method, fit, FLOPs."""
    config, layout = plan.config, plan.layout
    offload = [k for k, on in (("optimizer", layout.offload_optimizer), ("parameters", layout.offload_params)) if on]
    header = [
        f"plan:     {config.name} ({config.algorithm}) on {layout.devices} device(s) of "
        f"{plan.device_memory / GB:g} GB, {_stage_text(layout.zero_stage)}"
        + (f", {' and '.join(offload)} offloaded to CPU" if offload else ""),
        f"policy:   {config.model.policy}",
        f"model:    {_shape_text(plan.facts)}",
        f"dtype:    {config.model.dtype} weights"
        + (", NF4 base linears (QLoRA)" if config.model.quantization == "nf4" else "")
        + (", fp32 master weights and moments (DeepSpeed mixed precision)" if precision(config).mixed else ""),
        _batch_line(config, plan.work),
        "",
    ]
    footer = [
        "",
        "smallest device count: without / with gradient checkpointing (trl.gradient_checkpointing), among the counts "
        "the batch divides over, at most this plan's micro-batch per device (more gradient accumulation on fewer "
        "devices); '-' = none of them",
        "step time: training FLOPs over devices x the device's dense bf16 peak "
        f"({_peak_tflops():g} TFLOP/s; RL_LORA_PEAK_TFLOPS sets it); rollouts not included",
    ]
    return header + _table(plan) + footer + _notes(plan)


def _table(plan: Plan) -> list[str]:
    """Rows of figures per device, one column per method."""
    methods = plan.methods
    b = [m.breakdown for m in methods]
    unit, name = (GB, "GB") if max(x.peak() for x in b) >= GB else (10**6, "MB")

    def sizes(values: list[int]) -> list[str]:
        return [f"{n / unit:,.2f}" if n < 10 * unit else f"{n / unit:,.1f}" for n in values]

    rows = [_row(f"per device, {name}", [m.label for m in methods])]
    for label in sorted({label for x in b for label in x.weights}, key=PART_ORDER.index):
        rows.append(_row(label, [sizes([x.weights[label]])[0] if label in x.weights else "-" for x in b]))
    figures = [("gradients", [x.gradients for x in b]),
               ("optimizer state (AdamW moments)", [x.moments for x in b]),
               ("master weights (fp32)", [x.master for x in b])]
    if any(x.offloaded for x in b):
        figures.append(("offloaded to CPU memory (not counted)", [x.offloaded for x in b]))
    figures += [("activations (estimate)", [x.activations for x in b]),
                ("activations, gradient checkpointing", [x.activations_checkpointed for x in b]),
                ("generation KV cache (estimate)", [x.kv_cache for x in b]),
                ("merged-adapter weights while generating", [x.merged_copy for x in b]),
                ("peak", [x.peak() for x in b]),
                ("peak, gradient checkpointing", [x.peak(True) for x in b])]
    rows += [_row(label, sizes(values)) for label, values in figures]
    fits = f"fits {plan.device_memory / GB:g} GB less {HEADROOM:.0%}?"
    rows.append(_row(fits, [_fit_text(x, plan.usable) for x in b]))
    for stage in dict.fromkeys(k[0] for k in methods[0].smallest):
        rows.append(_row(f"smallest device count, {_stage_text(stage)}",
                         [_count_text(m.smallest[(stage, False)], m.smallest[(stage, True)]) for m in methods]))
    rows.append(_row("training TFLOP per step", [_tflop_text(m.flops_per_step) for m in methods]))
    rows.append(_row("step time at peak FLOP/s (lower bound)",
                     [_time_text(m.flops_per_step, plan.layout.devices) for m in methods]))
    return rows


def _shape_text(facts: ModelFacts) -> str:
    moe = ""
    if facts.moe is not None:
        experts = next(iter(facts.moe.experts.values()))[0]
        moe = f" | experts {experts} | experts/token {facts.moe.experts_per_token}"
    return (f"{facts.model_type} | hidden {facts.hidden} | layers {facts.layers} | heads {facts.heads} | KV heads "
            f"{facts.kv_heads} | MLP {facts.intermediate}{moe} | vocab {facts.vocab} | {facts.parameters:,} parameters")


def _batch_line(config: RecipeConfig, work: Workload) -> str:
    if algorithm_info(config.algorithm).uses_rewards:
        gen = (f"; rollouts of {work.generated_sequences} sequences x {work.generated_length} tokens per device")
        return (f"batch:    {config.train.batch_size} completions/step; training micro-batch {work.train_sequences} "
                f"x {work.train_length} tokens ({work.prompt_tokens} prompt) per device" + gen)
    return (f"batch:    {config.train.batch_size} pairs/step; training micro-batch {work.train_sequences} sequences "
            f"x {work.train_length} tokens per device")


def _fit_text(b: Breakdown, usable: int) -> str:
    plain, ckpt = b.peak() <= usable, b.peak(True) <= usable
    return "yes" if plain else ("with ckpt" if ckpt else "no")


def _count_text(plain: int | None, checkpointed: int | None) -> str:
    return f"{plain or '-'} / {checkpointed or '-'}"


def _peak_tflops() -> float:
    return float(os.environ.get("RL_LORA_PEAK_TFLOPS") or PEAK_TFLOPS["H200"])


def _tflop_text(flops: float) -> str:
    tflop = flops / 1e12
    return f"{tflop:,.0f}" if tflop >= 100 else f"{tflop:.3g}"


def _time_text(flops: float, devices: int) -> str:
    seconds = flops / devices / (_peak_tflops() * 1e12)
    return f"{seconds:.3g} s"
