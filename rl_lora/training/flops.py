"""Training FLOPs estimated from the model's linear shapes, and model-FLOPs utilisation.

Per token, a linear layer with an N_in x N_out weight costs 2·N_in·N_out FLOPs forward. Training it
fully costs 3x that (forward, gradient w.r.t. the input, gradient w.r.t. the weight). A frozen layer
with a rank-R adapter still needs the forward and the input gradient through W (4·N_in·N_out) plus
three passes through the adapter (6·R·(N_in + N_out)). For a square N x N matrix this is the findings'
(2N² + 6NR) / 3N² share of full fine-tuning's cost (docs/findings.md, claim 6).

Attention-score FLOPs (which grow with sequence length) and embeddings are left out: at the short
sequences of RL rollouts they are small next to the linear layers, and they cost LoRA and full
fine-tuning the same.
"""

from __future__ import annotations

import os

import torch

# Dense bf16 matrix-product rate measured on GPUs this project has used, for MFU. H200: ~790 TFLOP/s
# (docs/findings.md, environment notes). Other devices: set RL_LORA_PEAK_TFLOPS.
PEAK_TFLOPS = {"H200": 790.0}


def training_flops_per_token(shapes: dict[str, tuple[int, int]], adapted: dict[str, int]) -> float:
    """Estimated FLOPs to train one token. ``adapted``: {linear name: LoRA rank}; empty = full fine-tuning."""
    total = 0.0
    for name, (n_in, n_out) in shapes.items():
        dense = 2.0 * n_in * n_out
        if not adapted:
            total += 3 * dense
        elif name in adapted:
            total += 2 * dense + 6.0 * adapted[name] * (n_in + n_out)
        else:  # frozen, no adapter: forward + the input gradient flowing through it
            total += 2 * dense
    return total


def peak_tflops() -> float | None:
    """The device's dense bf16 peak, when a known GPU is present; None on CPU or unknown devices."""
    if os.environ.get("RL_LORA_PEAK_TFLOPS"):
        return float(os.environ["RL_LORA_PEAK_TFLOPS"])
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def linear_inventory(model: torch.nn.Module) -> tuple[dict[str, tuple[int, int]], dict[str, int]]:
    """Every linear layer's (in, out) shape, and the rank of those carrying a LoRA adapter."""
    from peft.tuners.lora import LoraLayer

    shapes: dict[str, tuple[int, int]] = {}
    adapted: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            if isinstance(base, torch.nn.Linear) and module.r:
                shapes[name] = (base.in_features, base.out_features)
                adapted[name] = sum(module.r.values())
        elif isinstance(module, torch.nn.Linear) and ".lora_" not in name and not name.endswith("base_layer"):
            shapes[name] = (module.in_features, module.out_features)
    return shapes, adapted
