"""Fast LoRA rollouts: generate with the adapters folded into the weights, then restore them exactly.

An unmerged adapter costs two extra small matrix products per adapted layer and per generated token;
at rollout time, where the policy only runs forward, that made LoRA generation slower than the plain
model's (docs/findings.md, "what users run into"). Here each adapted layer's weight tensor is swapped
for W + scale·B·A and the LoRA wrapper module itself is swapped for its plain base ``nn.Linear``, so
generation runs exactly the plain model's modules and kernels (no per-layer wrapper overhead either);
on exit the original tensors and modules are put back. Nothing is subtracted (W + BA - BA is not W
in floating point), so the base weights are bitwise what they were.

The merged weight is built in one fused pass, ``addmm(W, B, A, alpha=scale)``: reading W once and
writing the new tensor once. Building ``B @ A`` first and adding it (three passes over a matrix the
size of W, two of them fresh allocations) cost 3x as long: 35.6 ms against 11.4 ms for the fold
and the restore of the 56 adapted layers of the 28M benchmark shape on 2 CPU cores, paid once per
generation call.
``fan_in_fan_out`` layers (weights stored transposed) take PEFT's own delta. Only plain LoRA is folded:
DoRA layers (whose merge also rescales W) and the other adapter types (``lora.adapter``: VeRA, TinyLoRA,
MiSS) generate through their unmerged PEFT layers, and the first rollout says so once on stderr.

Not used under DeepSpeed ZeRO-3, where weights are partitioned across ranks (the trainer skips it).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

# peft.tuners.lora.Linear: PEFT types its base layer and adapter dicts as plain Modules, whose weights and
# scalings nn.Module's attribute typing cannot follow, so it is Any here.
AdapterLayer = Any


def _merged_weight(layer: AdapterLayer) -> torch.Tensor:
    """W + sum of scale * B @ A over the active adapters, as a new tensor; W itself is not touched."""
    weight = layer.get_base_layer().weight.data
    merged = weight
    for name in layer.active_adapters:
        if layer.fan_in_fan_out:
            merged = merged + layer.get_delta_weight(name).to(weight.dtype)
            continue
        b, a = layer.lora_B[name].weight, layer.lora_A[name].weight
        merged = torch.addmm(merged, b.to(weight.dtype), a.to(weight.dtype), alpha=layer.scaling[name])
    return merged


def _adapted_linears(model: nn.Module) -> list[tuple[nn.Module, str, AdapterLayer]]:
    """(parent module, attribute name, LoRA layer) for every active, unmerged LoRA linear."""
    from peft.tuners.lora import Linear as LoraLinear

    found = []
    for name, module in model.named_modules():
        active = isinstance(module, LoraLinear) and module.active_adapters and not module.disable_adapters
        dora = active and any(module.use_dora.get(adapter, False) for adapter in module.active_adapters)
        if active and not module.merged and not dora:
            parent_name, _, attr = name.rpartition(".")
            found.append((model.get_submodule(parent_name), attr, module))
    return found


def _say_unmerged_once(model: nn.Module, merged: list[tuple[nn.Module, str, AdapterLayer]]) -> None:
    """One stderr line, the first time ``model`` generates with adapter layers this module cannot fold."""
    if model.__dict__.get("_rl_lora_unmerged_said"):
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    folded = {id(layer) for _, _, layer in merged}
    kinds = sorted({"dora" if any(getattr(m, "use_dora", {}).values()) else type(m).__module__.split(".")[-2]
                    for m in model.modules() if isinstance(m, BaseTunerLayer) and id(m) not in folded})
    model.__dict__["_rl_lora_unmerged_said"] = True
    if kinds:
        print(f"rl-lora: rollouts run with unmerged {', '.join(kinds)} adapter layers (merged rollouts fold plain "
              "LoRA only)", file=sys.stderr, flush=True)


@contextmanager
def merged_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model`` computes base + adapter with plain linear layers.

    ``model`` must be a PEFT model (anything else is yielded unchanged). Extra memory: one weight
    matrix per adapted layer, for the duration of the block.
    """
    layers = _adapted_linears(model) if hasattr(model, "disable_adapter") else []
    if hasattr(model, "disable_adapter"):
        _say_unmerged_once(model, layers)
    weights: list[tuple[nn.Parameter, torch.Tensor]] = []
    modules: list[tuple[nn.Module, str, AdapterLayer]] = []
    try:
        with torch.no_grad():
            for parent, attr, layer in layers:
                base = layer.get_base_layer()
                weights.append((base.weight, base.weight.data))
                base.weight.data = _merged_weight(layer)
                modules.append((parent, attr, layer))
                setattr(parent, attr, base)
        yield model
    finally:
        for parent, attr, layer in modules:
            setattr(parent, attr, layer)
        for weight, data in weights:
            weight.data = data  # the very tensor that was there: no arithmetic, bitwise restore
