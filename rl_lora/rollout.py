"""Fast LoRA rollouts: generate with the adapters folded into the weights, then restore them exactly.

An unmerged adapter costs two extra small matrix products per adapted layer and per generated token;
at rollout time, where the policy only runs forward, that made LoRA generation slower than the plain
model's (docs/findings.md, "what users run into"). Here each adapted layer's weight tensor is swapped
for W + scale·B·A and the LoRA wrapper module itself is swapped for its plain base ``nn.Linear``, so
generation runs exactly the plain model's modules and kernels (no per-layer wrapper overhead either);
on exit the original tensors and modules are put back. Nothing is subtracted (W + BA - BA is not W
in floating point), so the base weights are bitwise what they were.

Not used under DeepSpeed ZeRO-3, where weights are partitioned across ranks (the trainer skips it).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def _adapted_linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent module, attribute name, LoRA layer) for every active, unmerged LoRA linear."""
    from peft.tuners.lora import Linear as LoraLinear

    found = []
    for name, module in model.named_modules():
        active = isinstance(module, LoraLinear) and module.active_adapters and not module.disable_adapters
        if active and not module.merged:
            parent_name, _, attr = name.rpartition(".")
            found.append((model.get_submodule(parent_name), attr, module))
    return found


@contextmanager
def merged_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model`` computes base + adapter with plain linear layers.

    ``model`` must be a PEFT model (anything else is yielded unchanged). Extra memory: one weight
    matrix per adapted layer, for the duration of the block.
    """
    layers = _adapted_linears(model) if hasattr(model, "disable_adapter") else []
    weights: list[tuple[nn.Parameter, torch.Tensor]] = []
    modules: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        with torch.no_grad():
            for parent, attr, layer in layers:
                base = layer.get_base_layer()
                delta = sum(layer.get_delta_weight(name) for name in layer.active_adapters)
                weights.append((base.weight, base.weight.data))
                base.weight.data = base.weight.data + delta.to(base.weight.dtype)
                modules.append((parent, attr, layer))
                setattr(parent, attr, base)
        yield model
    finally:
        for parent, attr, layer in modules:
            setattr(parent, attr, layer)
        for weight, data in weights:
            weight.data = data  # the very tensor that was there: no arithmetic, bitwise restore
