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
from datetime import timedelta
from pathlib import Path
from typing import Any

from rl_lora.config.schema import DistributedSpec
from rl_lora.utils.errors import ConfigError

LAUNCHED_ENV = "RL_LORA_LAUNCHED"  # set in the processes torchrun starts, so they do not launch again


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def from_main(values: list[int]) -> list[int]:
    """The main process's ``values`` on every process (a broadcast from global rank 0, which every process
    must call at the same point); ``values`` as they are in a single process."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor(values, dtype=torch.int64, device=device)
    dist.broadcast(tensor, src=0)
    return [int(v) for v in tensor.tolist()]


def init_process_group(timeout: int) -> None:
    """Under several processes on CPU, start the default (gloo) process group with a ``timeout`` of ``timeout``
    seconds for every collective, before transformers or accelerate start it.

    transformers passes ``ddp_timeout`` to the process group only on GPUs: with ``use_cpu`` it starts gloo with
    PyTorch's 30 minutes whatever ``ddp_timeout`` says, so a stalled process hung the others that long (issue
    #28 item 9). accelerate and DeepSpeed use a group that is already started. On GPUs transformers (and PPO's
    ``PartialState``) pass the timeout themselves; NCCL's watchdog then ends a stalled collective.
    """
    import torch

    if world_size() == 1 or torch.cuda.is_available():
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="gloo", timeout=timedelta(seconds=timeout))


STALE_BUILD_LOCK_S = 600  # a JIT build (DeepSpeed's CPU shared-memory op, when it was built) took about a minute; a
# lock older is a killed build's


def bound_extension_builds(timeout: int) -> None:
    """Under DeepSpeed: a wait on a JIT build's lock file ends with one line instead of lasting for ever.

    A JIT build (DeepSpeed's CPU shared-memory op, before ``skip_inference_comm_build``; any op a library compiles
    at start) runs under a ``lock`` file in torch's extension folder; a process killed while compiling leaves the
    file, and every later start waited on it for ever, idle, on every process (no collective runs, so
    ``distributed.timeout`` never fired: issue #28 item 9, seen with two environments' test runs sharing the
    folder, each rebuilding the op the other had built). Here
    the wait raises DistributedError, naming the file, once the lock is ``STALE_BUILD_LOCK_S`` old or the wait
    passes ``timeout`` s; and each Python environment builds into its own folder (``TORCH_EXTENSIONS_DIR``, unless
    set), so two environments no longer rebuild over each other.
    """
    import hashlib
    import time

    from torch.utils import cpp_extension, file_baton

    from rl_lora.utils.errors import DistributedError

    if "TORCH_EXTENSIONS_DIR" not in os.environ:  # torch's own root, a folder per environment (and Python, CUDA)
        import torch

        key = f"{sys.prefix} {sys.version} {torch.__version__} {torch.version.cuda}"
        tag = hashlib.sha256(key.encode()).hexdigest()[:12]
        os.environ["TORCH_EXTENSIONS_DIR"] = str(Path(cpp_extension.get_default_build_root()) / f"rl-lora-{tag}")
    if getattr(file_baton.FileBaton.wait, "bounded_by_rl_lora", False):
        return

    def wait(self: Any) -> None:
        start = time.time()
        while os.path.exists(self.lock_file_path):
            try:
                age = time.time() - os.path.getmtime(self.lock_file_path)
            except OSError:  # released meanwhile
                continue
            waited = time.time() - start
            if age > STALE_BUILD_LOCK_S or waited > timeout:
                raise DistributedError(
                    f"waited {waited:.0f} s on the build lock '{self.lock_file_path}' ({age:.0f} s old): a process "
                    "killed while compiling a DeepSpeed/PyTorch extension left it; if no compiler is running, delete "
                    "it and rerun (docs/distributed.md#if-a-run-hangs-at-start)")
            time.sleep(self.wait_seconds)

    wait.bounded_by_rl_lora = True  # type: ignore[attr-defined]
    file_baton.FileBaton.wait = wait  # type: ignore[method-assign]


def skip_inference_comm_build() -> None:
    """Under DeepSpeed: do not compile its shared-memory all-reduce op (``deepspeed_shm_comm``), which training
    never calls.

    DeepSpeed's communication backend builds that op as it starts, on the CPU, for its inference all-reduce
    (tensor-parallel inference) and nothing else; without the op that call falls back to the process group's
    all-reduce. Building it took about 50 CPU-seconds at a run's first start in each environment and needs a C++
    compiler. Here the op is marked unavailable in DeepSpeed's own table of compatible ops, as on a platform that
    lacks it.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # the table is probed once, then kept


# How gloo (and torch.distributed) word a collective that waited past the process group's timeout, or whose peer
# went away; matched in the text of the RuntimeError (DistBackendError) a collective raises.
_COLLECTIVE_FAILURES = ("timed out", "timeout", "connection closed by peer", "connection reset by peer",
                        "broken pipe")


def collective_failed(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective of several processes that timed out or lost a peer."""
    if world_size() == 1 or not isinstance(exc, RuntimeError):
        return False
    text = str(exc).lower()
    return any(words in text for words in _COLLECTIVE_FAILURES)


def stalled_message(where: str, timeout: int, exc: BaseException) -> str:
    """The one line a collective failure becomes: where the run was, which process saw it, and what to do."""
    from rl_lora.utils.errors import first_line

    return (f"{where}: process {rank()} of {world_size()} waited past distributed.timeout ({timeout} s) for the "
            f"others, or lost one ({first_line(exc)[:200]}); another process stalled or died (its log says which); "
            "raise distributed.timeout if one step legitimately takes longer")


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
        # Parameters under this many elements stay whole on every process. DeepSpeed's default, 1e5,
        # kept every weight of the 0.87M built-in model whole on every process; "auto" lets transformers
        # fill in 10 x hidden_size, its own choice for Trainer users (1,280 for the built-in model).
        zero["stage3_param_persistence_threshold"] = "auto"
        share_zero3_fp32_master_weights()
    return {
        "zero_optimization": zero,
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "zero_allow_untested_optimizer": True,
    }


def share_zero3_fp32_master_weights() -> None:
    """Let ZeRO-3 update fp32 weights in place instead of keeping a second fp32 copy of this process's slice.

    DeepSpeed 0.19.8 means to skip that copy when the partitioned weights already have the master
    dtype and device (runtime/zero/stage3.py, ``_create_fp32_partitions``: "we don't need another copy
    of the weights"), but it compares a tensor's ``torch.device`` with the device's *name*, a str, which
    is never equal: fp32 training kept two fp32 copies of every slice, and per-process parameter +
    optimizer bytes at 2 processes were 0.67x ZeRO-0's instead of 0.5x (docs/distributed.md). This
    makes only that comparison work; bf16/fp16 weights still get their fp32 master copy, and with
    ``offload_optimizer`` DeepSpeed's own offload branch runs first, as before. Idempotent.
    """
    import torch
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    create = getattr(Stage3, "_create_fp32_partitions", None)
    if create is None or getattr(create, "_rl_lora_shares_fp32", False):
        return

    def create_fp32_partitions(self: Any) -> None:
        name = self.device
        if isinstance(name, str) and not self.offload_optimizer:
            self.device = torch.device(name)
        try:
            create(self)
        finally:
            self.device = name

    create_fp32_partitions._rl_lora_shares_fp32 = True  # type: ignore[attr-defined]
    Stage3._create_fp32_partitions = create_fp32_partitions


def gather_container_parameters(model: Any, spec: DistributedSpec) -> int:
    """Under ZeRO-3, make the modules of PEFT's adapter types gather the parameters they read outside their
    owners' forward; returns how many it registered (0 below ZeRO-3).

    ZeRO-3 gathers a module's own parameters when the module's forward runs, and leaves every other
    parameter partitioned (empty on every process). Two of PEFT's types read parameters that way:

    - VeRA keeps its trained vectors (``vera_lambda_b``, ``vera_lambda_d``) in ``nn.ParameterDict``
      children, whose forward never runs (a 2-process ZeRO-3 run failed in its first forward: "size of
      tensor a (0) must match ... 256"): each module reading a container's parameters gathers them;
    - DoRA's magnitude module reads the LoRA matrices and the base weight (its weight norm) in its own
      forward ("tuple index out of range" on the empty ``lora_A.weight``): it gathers those.

    DeepSpeed's ``register_external_parameter`` makes a module's forward gather and release a parameter it
    does not own. Plain LoRA's matrices live in ``nn.Linear`` modules that are called, and need none of this.
    """
    if spec.zero_stage != 3:
        return 0
    from deepspeed.runtime.zero import register_external_parameter
    from torch import nn

    registered = 0
    for module in model.modules():
        for child in module.children():
            if isinstance(child, (nn.ParameterDict, nn.ParameterList)):
                for param in child.parameters():
                    register_external_parameter(module, param)
                    registered += 1
        magnitudes = getattr(module, "lora_magnitude_vector", None)  # a DoRA layer (peft.tuners.lora.LoraLayer)
        if isinstance(magnitudes, nn.ModuleDict):
            for name, magnitude in magnitudes.items():
                for param in (module.get_base_layer().weight, module.lora_A[name].weight, module.lora_B[name].weight):
                    register_external_parameter(magnitude, param)
                    registered += 1
    return registered


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
