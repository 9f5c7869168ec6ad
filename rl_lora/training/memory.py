"""Memory accounting: peak process/device memory, and the bytes this process holds in parameters,
gradients and optimizer state (its slices under DeepSpeed ZeRO)."""

from __future__ import annotations

import resource
import sys
from typing import Any

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


def _held(p: torch.Tensor) -> list[torch.Tensor]:
    """The tensors of parameter ``p`` that live in this process.

    Under ZeRO-3 a parameter's data is empty between uses (``p.numel() == 0``) and this process keeps
    only its slice, ``p.ds_tensor``; a small "persistent" parameter keeps its whole data as well.
    """
    held = [p] if p.numel() > 0 else []
    part = getattr(p, "ds_tensor", None)
    if isinstance(part, torch.Tensor) and part.numel() > 0:
        held.append(part)
    return held


def _local_param_bytes(p: torch.Tensor) -> int:
    return sum(parameter_bytes(t) if t is p else _tensor_bytes(t) for t in _held(p))


def module_param_bytes(module: nn.Module) -> int:
    """Bytes held in this process by a module's parameters (e.g. a separate frozen reference model)."""
    return sum(_local_param_bytes(p) for p in module.parameters())


def _storage(t: torch.Tensor) -> int:
    """An id shared by every view of one buffer (ZeRO keeps parameters as views of flat buffers)."""
    return t.untyped_storage().data_ptr()


def _optimizer_chain(optimizer: Any) -> list[Any]:
    """The optimizer and what it wraps: accelerate's wrapper -> DeepSpeed's ZeRO optimizer -> torch's Adam."""
    chain = [optimizer]
    while (inner := getattr(chain[-1], "optimizer", None)) is not None and all(inner is not o for o in chain):
        chain.append(inner)
    return chain


def _zero_optimizer(chain: list[Any]) -> Any | None:
    """DeepSpeed's ZeRO optimizer in the chain (stage 1/2 or stage 3), or None."""
    zero = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat")
    return next((opt for opt in chain if any(hasattr(opt, name) for name in zero)), None)


def state_bytes(model: nn.Module, optimizer: Any | None) -> dict[str, int]:
    """Bytes held by THIS process: parameters (all and trainable), gradients and optimizer state.

    Without DeepSpeed and under ZeRO-0 each process holds everything. Under ZeRO-3 a parameter counts
    its local slice (``ds_tensor``), plus its whole data while it is gathered or persistent. The
    optimizer counts its state (Adam's two moments) and, under ZeRO-1/2/3, the fp32 master copy of
    this process's slice that DeepSpeed's ZeRO optimizer keeps; a master slice that shares its buffer
    with the weights (ZeRO-3 in fp32, rl_lora/training/distributed.py) is counted once, as a parameter.
    A 4-bit (QLoRA) base weight counts its packed bytes and its quantisation state, not 4 bytes a weight.
    """
    params = list(model.parameters())
    held = sum(_local_param_bytes(p) for p in params)
    trainable = sum(_local_param_bytes(p) for p in params if p.requires_grad)
    # Without ZeRO-2/3, gradients live from backward to the optimizer step, one per trainable parameter
    # and of its dtype; at a step boundary they are already freed, so count what backward allocates.
    grads = trainable
    optim = 0
    if optimizer is not None:
        chain = _optimizer_chain(optimizer)
        inner = chain[-1]  # the torch optimizer that owns the state
        state = getattr(inner, "state", {})
        for values in state.values():
            optim += sum(_tensor_bytes(v) for v in values.values() if torch.is_tensor(v) and v.dim() > 0)
        zero = _zero_optimizer(chain)
        if zero is not None:
            # What the torch optimizer updates under ZeRO: fp32 master slices. ZeRO-3 empties
            # param_groups after each step, so the state's keys are read as well.
            masters = {id(t): t for group in inner.param_groups for t in group["params"]}
            masters.update({id(t): t for t in state if torch.is_tensor(t)})
            slices = [t for t in masters.values() if t.numel() > 0]
            shared = {_storage(t) for p in params for t in _held(p)}
            optim += sum(_tensor_bytes(t) for t in slices if _storage(t) not in shared)
            # ZeRO-2 and ZeRO-3 reduce each gradient into this process's slice, in the master dtype;
            # ZeRO-1 keeps whole gradients.
            if hasattr(zero, "fp32_partitioned_groups_flat") or getattr(zero, "partition_gradients", False):
                grads = sum(_tensor_bytes(t) for t in slices)
    return {"param_bytes": held, "trainable_param_bytes": trainable, "grad_bytes": grads, "optimizer_bytes": optim}


def peak_memory() -> dict[str, int]:
    """Peak memory figures: CUDA allocated/reserved on GPU, and the process's peak RSS always."""
    out = {"peak_rss_bytes": peak_rss_bytes()}
    if torch.cuda.is_available():
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        out["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved()
    return out
