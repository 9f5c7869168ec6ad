"""What a PPO checkpoint holds, written into a staging folder and read back for an exact resume.

PPO's loop is our own (rl_lora/algorithms/ppo/trainer.py), so transformers' Trainer does not write its
checkpoints: this module writes the same content it would, into ``<run>/trainer/checkpoint-N``,
and rl_lora.training.sealing.SealCheckpoints then seals that folder (manifest, fsync, atomic
rename, keep_last) exactly as for GRPO and DPO.

    trainable.safetensors  every trainable tensor of policy + critic + value head, by parameter name
                           (both adapters and the head with LoRA; policy, critic copy and head in full)
    optimizer.pt           AdamW state (both param groups)
    scheduler.pt           the LR scheduler's state
    state.pt               step, data order and its RNG, torch and python RNG states, kl_coef,
                           token count, non-finite streak, records not yet logged

Everything but the weights is plain Python types and tensors, so it loads with
``torch.load(weights_only=True)`` (no pickled objects; RELIABILITY.md's security defaults).

Under DeepSpeed (ZeRO-2/3, several processes on one machine) the engine owns the partitioned optimizer
state (and, ZeRO-3, the partitioned weights), so every process writes its share into the same staging
folder (``write_shard``):

    deepspeed/             the engine's own checkpoint (``engine.save_checkpoint``): module states and one
                           ``zero_pp_rank_N_*`` optimizer (ZeRO-3: and weight) shard per process
    scheduler.pt           the LR scheduler's state (the same on every process; the main process writes it)
    state_rank{N}.pt       process N's loop state: what state.pt holds, with its own torch/python RNG
                           streams (each process samples with its own seed)

DeepSpeed's files are pickles it loads with ``weights_only=False``, as transformers' Trainer does for
GRPO and DPO under DeepSpeed; the manifest's sha256 of every file is verified before anything loads.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rl_lora.utils.errors import CheckpointError

WEIGHTS = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
STATE = "state.pt"
DEEPSPEED_TAG = "deepspeed"  # the engine's checkpoint folder inside the staging folder


def rank_state_name(rank: int) -> str:
    return f"state_rank{rank}.pt"


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


def write_shard(staging: Path, engine: Any, scheduler: Any, state: dict[str, Any], rank: int, main: bool) -> None:
    """This process's part of a DeepSpeed checkpoint, into ``staging`` (made empty by the main process).

    Every process must call it: ``engine.save_checkpoint`` is collective (each writes its own shards).
    """
    # The frozen base is the recipe's model, rebuilt on resume: only trainable tensors are saved (with
    # LoRA, kilobytes instead of the whole base; resume.check_compatible refuses a changed recipe).
    engine.save_checkpoint(str(staging), tag=DEEPSPEED_TAG, save_latest=False, exclude_frozen_parameters=True)
    torch.save(state, staging / rank_state_name(rank))
    if main:
        torch.save(scheduler.state_dict(), staging / SCHEDULER)


def read_shard(folder: Path, engine: Any, scheduler: Any, rank: int, processes: int) -> dict[str, Any]:
    """Load a DeepSpeed checkpoint into ``engine`` (collective) and return this process's loop state.

    The checkpoint must have been written by as many processes as now run: each process's RNG streams
    and DeepSpeed's optimizer partitions are per process, and a different count cannot resume exactly.
    """
    saved = sorted(folder.glob("state_rank*.pt"))
    if len(saved) != processes or not (folder / DEEPSPEED_TAG).is_dir():
        what = f"{len(saved)} processes' state" if saved else "no DeepSpeed shards (a one-process checkpoint?)"
        raise CheckpointError(f"checkpoint '{folder}' holds {what}; this run has {processes} processes under "
                              f"DeepSpeed: resume with the same --nproc and distributed.zero_stage")
    # Not strict: the module states hold the trainable tensors only (write_shard), not the frozen base.
    path, _ = engine.load_checkpoint(str(folder), tag=DEEPSPEED_TAG, load_optimizer_states=True,
                                     load_lr_scheduler_states=False, load_module_strict=False)
    if path is None:
        raise CheckpointError(f"checkpoint '{folder}': DeepSpeed could not load '{folder / DEEPSPEED_TAG}'")
    scheduler.load_state_dict(torch.load(folder / SCHEDULER, weights_only=True))
    return torch.load(folder / rank_state_name(rank), weights_only=True)


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
