"""Fast LoRA rollouts: generate with the adapters folded into the weights, then restore them exactly.

An unmerged adapter costs two extra small matrix products per adapted layer and per generated token;
at rollout time, where the policy only runs forward, that made LoRA generation slower than the plain
model's (docs/findings.md, "what users run into"). Here each adapted layer's weight tensor is swapped
for W + scale·B·A while the adapters are disabled, so generation runs exactly the plain model's
kernels; on exit the original tensor objects are put back. Nothing is subtracted (W + BA - BA is not
W in floating point), so the base weights are bitwise what they were.

Not used under DeepSpeed ZeRO-3, where weights are partitioned across ranks (the trainer skips it).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def _adapted_linears(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora import Linear as LoraLinear

    return [m for m in model.modules() if isinstance(m, LoraLinear) and m.active_adapters and not m.merged]


@contextmanager
def merged_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model`` computes base + adapter with plain linear layers.

    ``model`` must be a PEFT model (anything else is yielded unchanged). Extra memory: one weight
    matrix per adapted layer, for the duration of the block.
    """
    layers = _adapted_linears(model) if hasattr(model, "disable_adapter") else []
    if not layers:
        yield model
        return
    originals: list[tuple[nn.Parameter, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for layer in layers:
                weight = layer.get_base_layer().weight
                delta = sum(layer.get_delta_weight(name) for name in layer.active_adapters)
                originals.append((weight, weight.data))
                weight.data = weight.data + delta.to(weight.dtype)
        with model.disable_adapter():
            yield model
    finally:
        for weight, data in originals:
            weight.data = data  # the very tensor that was there: no arithmetic, bitwise restore
