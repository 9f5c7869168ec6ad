"""Memory accounting: peak process/device memory and the bytes held by parameters, grads, optimizer."""

from __future__ import annotations

import resource
import sys

import torch
from torch import nn


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (CPU memory high-water mark)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def quantization_state_bytes(t: torch.Tensor) -> int:
    """Bytes a 4-bit weight keeps beside its packed data: its quantisation state, 0 for other tensors.

    bitsandbytes' Params4bit holds two 4-bit codes per uint8 element (counted by ``_tensor_bytes``)
    and a QuantState: one absmax per block of 64 weights (fp32, or 8-bit plus a nested state with
    bnb_4bit_use_double_quant) and the 16-entry NF4 code book.
    """
    state = getattr(t, "quant_state", None)
    if state is None:
        return 0
    tensors = [state.absmax, state.code]
    nested = getattr(state, "state2", None)
    if nested is not None:
        tensors += [nested.absmax, nested.code]
    return sum(_tensor_bytes(x) for x in tensors if isinstance(x, torch.Tensor))


def parameter_bytes(p: torch.Tensor) -> int:
    """Bytes a parameter holds in memory: element size x elements, plus a 4-bit weight's quantisation state."""
    return _tensor_bytes(p) + quantization_state_bytes(p)


def module_param_bytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters (e.g. a separate frozen reference model)."""
    return sum(_tensor_bytes(p) for p in module.parameters())


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, int]:
    """Bytes of parameters (all and trainable), gradients (during backward) and optimizer state.

    A 4-bit (QLoRA) base weight counts its packed bytes and its quantisation state, not 4 bytes a weight.
    """
    params = sum(parameter_bytes(p) for p in model.parameters())
    trainable = sum(_tensor_bytes(p) for p in model.parameters() if p.requires_grad)
    # Gradients live from backward to the optimizer step, one per trainable parameter and of its
    # dtype; at a step boundary they are already freed, so count what backward allocates.
    grads = trainable
    optim = 0
    if optimizer is not None:
        for state in optimizer.state.values():
            optim += sum(_tensor_bytes(v) for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
    return {"param_bytes": params, "trainable_param_bytes": trainable, "grad_bytes": grads, "optimizer_bytes": optim}


def peak_memory() -> dict[str, int]:
    """Peak memory figures: CUDA allocated/reserved on GPU, and the process's peak RSS always."""
    out = {"peak_rss_bytes": peak_rss_bytes()}
    if torch.cuda.is_available():
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        out["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved()
    return out
