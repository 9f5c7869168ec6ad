"""What a PPO checkpoint holds, written into a staging folder and read back for an exact resume.

PPO's loop is our own (rl_lora/trainers/ppo.py), so transformers' Trainer does not write its
checkpoints: this module writes the same content it would, into ``<run>/trainer/checkpoint-N``,
and rl_lora.trainers.checkpointing.SealCheckpoints then seals that folder (manifest, fsync, atomic
rename, keep_last) exactly as for GRPO and DPO.

    trainable.safetensors  every trainable tensor of policy + critic + value head, by parameter name
                           (both adapters and the head with LoRA; policy, critic copy and head in full)
    optimizer.pt           AdamW state (both param groups)
    scheduler.pt           the LR scheduler's state
    state.pt               step, data order and its RNG, torch and python RNG states, kl_coef,
                           token count, non-finite streak, records not yet logged

Everything but the weights is plain Python types and tensors, so it loads with
``torch.load(weights_only=True)`` (no pickled objects; RELIABILITY.md's security defaults).
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rl_lora.errors import CheckpointError

WEIGHTS = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
STATE = "state.pt"


def trainable_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Name -> tensor of every trainable parameter (named_parameters lists a tied weight once)."""
    return {n: p.detach().contiguous() for n, p in module.named_parameters() if p.requires_grad}


def write(staging: Path, module: nn.Module, optimizer: Any, scheduler: Any, state: dict[str, Any]) -> None:
    """Write one checkpoint's content into ``staging`` (replacing what a killed save left there)."""
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file(trainable_tensors(module), str(staging / WEIGHTS))
    torch.save(optimizer.state_dict(), staging / OPTIMIZER)
    torch.save(scheduler.state_dict(), staging / SCHEDULER)
    torch.save(state, staging / STATE)


def read(folder: Path, module: nn.Module, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    """Load weights, optimizer and scheduler from a sealed checkpoint; returns the loop's state.

    The checkpoint must hold exactly the module's trainable tensors: a different rank or target list
    would load silently into the wrong shapes otherwise (resume.check_compatible refuses those first).
    """
    weights = load_file(str(folder / WEIGHTS))
    expected = set(trainable_tensors(module))
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise CheckpointError(f"checkpoint '{folder}' does not fit this model: missing {missing[:3]}, "
                              f"unexpected {extra[:3]}")
    with torch.no_grad():
        params = dict(module.named_parameters())
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(torch.load(folder / OPTIMIZER, weights_only=True))
    scheduler.load_state_dict(torch.load(folder / SCHEDULER, weights_only=True))
    return torch.load(folder / STATE, weights_only=True)


def rng_states(data_rng: random.Random) -> dict[str, Any]:
    """Every random stream the loop draws from (data order, python, torch CPU and CUDA), as plain
    lists and tensors: a python ``random`` state is a tuple holding a tuple of 625 ints."""
    return {
        "data_rng": _plain(data_rng.getstate()),
        "python_rng": _plain(random.getstate()),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_states(state: dict[str, Any], data_rng: random.Random) -> None:
    data_rng.setstate(_random_state(state["data_rng"]))
    random.setstate(_random_state(state["python_rng"]))
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])


def _plain(state: tuple) -> list[Any]:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _random_state(plain: list[Any]) -> tuple:
    version, internal, gauss = plain
    return int(version), tuple(int(i) for i in internal), gauss
