"""Several processes: launching through torchrun, the DeepSpeed config derived from the recipe, ranks.

``rl-lora run RECIPE --nproc N`` re-runs the same command under ``torch.distributed.run`` (torchrun)
with N processes per node; ``--nnodes``, ``--node-rank``, ``--master-addr`` and ``--master-port`` spread
it over machines. The DeepSpeed config is derived from the recipe's ``distributed:`` section and
``train:`` section, so batch sizes cannot disagree: the "auto" fields are filled by transformers from
the same TrainingArguments the trainer uses, and ``train_batch_size`` is left out (an "auto" there
tripped DeepSpeed's batch check on CPU, see docs/findings.md's environment notes).

Only the main process (global rank 0) writes the run folder, metrics and W&B; every process runs the
evaluations, because under ZeRO-3 each forward pass gathers parameters from all of them.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from rl_lora.config import DistributedSpec
from rl_lora.errors import ConfigError

LAUNCHED_ENV = "RL_LORA_LAUNCHED"  # set in the processes torchrun starts, so they do not launch again


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def deepspeed_config(spec: DistributedSpec) -> dict[str, Any] | None:
    """The DeepSpeed config for ``spec``, or None when the recipe does not use DeepSpeed."""
    if spec.zero_stage is None:
        return None
    zero: dict[str, Any] = {"stage": spec.zero_stage}
    if spec.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if spec.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    if spec.zero_stage == 3:
        # Consolidate the partitioned weights when saving, so a full-parameter model loads with
        # from_pretrained and an adapter is never saved empty.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "zero_optimization": zero,
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "zero_allow_untested_optimizer": True,
    }


def per_device_batch(batch_size: int, grad_accum: int) -> int:
    """Completions (or pairs) per process per micro-step, from the recipe's global batch."""
    share = world_size() * grad_accum
    if batch_size % share:
        raise ConfigError(
            f"train.batch_size ({batch_size}) must divide evenly over {world_size()} processes x "
            f"distributed.gradient_accumulation ({grad_accum})"
        )
    return batch_size // share


def launch_command(nproc: int, nnodes: int, node_rank: int, master_addr: str, master_port: int,
                   cli_args: list[str]) -> list[str]:
    """The torchrun command that runs ``rl_lora.cli`` with ``cli_args`` in every process."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc_per_node={nproc}", f"--nnodes={nnodes}", f"--node_rank={node_rank}",
        f"--master_addr={master_addr}", f"--master_port={master_port}",
        "-m", "rl_lora.cli", *cli_args,
    ]


RUN_DIR_ENV = "RL_LORA_RUN_DIR"  # the run folder the launcher made, shared by every process it starts


def rank_report(model: Any, global_step: int) -> dict[str, Any]:
    """This process's view at the end: optimizer steps and a hash of every trainable parameter
    (gathered first under ZeRO-3, where each process holds only a slice)."""
    import hashlib

    import torch

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    digest = hashlib.sha256()
    gather = _gathered([p for _, p in params])
    with gather, torch.no_grad():
        for name, p in params:
            digest.update(name.encode())
            digest.update(p.detach().float().cpu().numpy().tobytes())
        sizes = {n: int(p.numel()) for n, p in params}
    return {"rank": rank(), "global_step": global_step, "trainable_hash": digest.hexdigest()[:16],
            "empty_trainable": [n for n, size in sizes.items() if size == 0]}


def _gathered(params: list[Any]) -> Any:
    from contextlib import nullcontext

    if not any(hasattr(p, "ds_id") for p in params):  # not partitioned by ZeRO-3
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
