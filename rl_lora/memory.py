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


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, int]:
    """Bytes of parameters (all and trainable), gradients (during backward) and optimizer state."""
    params = sum(_tensor_bytes(p) for p in model.parameters())
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
