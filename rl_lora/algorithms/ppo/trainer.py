"""PPO with a critic. TRL 1.16 has no PPOTrainer (removed after 1.12), so the loop is written here.

The memory-efficient layout (rl_lora/algorithms/ppo/actor_critic.py): with LoRA, policy, critic and
reference all live on ONE frozen copy of the base model, as two adapters and the adapters-off
network; with ``lora.rank: full`` (the baseline) policy, critic and reference are three copies.

Per step: sample ``train.batch_size`` completions (``ppo.samples_per_prompt`` per prompt) from the
policy; score them with the recipe's rewards; per-token rewards are -kl_coef * KL_t to the reference
plus the task score on the last token; GAE gives advantages and returns; then ``ppo.epochs`` passes
over shuffled minibatches of the clipped policy loss + vf_coef x the clipped value loss. The math is
in rl_lora/algorithms/ppo/losses.py (pure functions), the models in actor_critic.py; this module holds the loop.

Departures from Ziegler et al. 2019 / TRL 1.12's PPO: the critic is an adapter on the policy's own
frozen base (TRL 1.12 kept a full trainable value model even with ``peft_config``), policy and
critic gradients are clipped separately in one process (their loss scales differ), and KL is logged
as the mean per-sequence sum of k1 over the rollout.

Several processes (``distributed.zero_stage`` and ``--nproc``): every trainable part (the PeftModel
with both adapters, or policy + critic copy, and the value head) is ONE nn.Module, ``ActorCritic``,
prepared by accelerate into ONE DeepSpeed engine with ONE optimizer (a param group each for policy
and critic LRs); every forward pass goes through the engine. Each process samples its share of the
step's prompts; the engine averages gradients over processes, and the logged figures are averaged
over them too. DeepSpeed clips one global gradient norm over everything it optimizes, so under it
policy and critic are clipped together (``train.max_grad_norm`` on their joint norm), not
separately. Advantages are whitened over each process's share of the batch. Under ZeRO-3 rollouts
generate with ``synced_gpus`` so processes that stop early keep serving the others' gathers.

Checkpoints (``train.save_every``) and ``--resume`` work in one process and under DeepSpeed on one
machine (every process writes its shards, the main process seals); the content is in
rl_lora/algorithms/ppo/checkpoint.py.

    rl-lora run recipes/ppo_arithmetic.yaml                  # rank-1 LoRA, one shared base
    rl-lora run recipes/ppo_arithmetic.yaml lora.rank=full   # separate policy, critic and reference
    rl-lora run recipes/ppo_arithmetic.yaml distributed.zero_stage=3 --nproc 2
"""

from __future__ import annotations

import math
import os
import random
import shutil
from contextlib import nullcontext
from dataclasses import dataclass, fields
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DeepSpeedPlugin, gather_object
from datasets import Dataset
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback, TrainingArguments, get_scheduler
from transformers.trainer_callback import CallbackHandler, TrainerControl, TrainerState

from rl_lora.adapters.rollout import merged_adapters
from rl_lora.algorithms.common import RolloutInputs, check_rollout, load_rollout
from rl_lora.algorithms.contract import Loaded, parameter_figures
from rl_lora.algorithms.ppo import checkpoint as ppo_checkpoint
from rl_lora.algorithms.ppo import losses as pm
from rl_lora.algorithms.ppo.actor_critic import (
    ActorCritic,
    build_actor_critic,
    unique_param_bytes,
)
from rl_lora.config.schema import PpoRecipe
from rl_lora.tasks.rewards import trainer_rewards
from rl_lora.training.distributed import deepspeed_config, gather_container_parameters
from rl_lora.training.sealing import non_finite_parameters
from rl_lora.utils.errors import CheckpointError, ConfigError, RlLoraError

if TYPE_CHECKING:
    from peft import PeftModel


@dataclass(frozen=True)
class PpoArguments:
    """The TrainingArguments fields transformers callbacks (RunTracker, SealCheckpoints) read."""

    per_device_train_batch_size: int  # completions per step and process
    gradient_accumulation_steps: int
    world_size: int
    max_steps: int
    logging_steps: int
    seed: int
    output_dir: str  # checkpoints are staged in output_dir/checkpoint-N, then sealed


@dataclass
class Rollout:
    """One batch of sampled completions with everything the PPO epochs need; rows are completions."""

    ids_B_L: Tensor  # prompt (left-padded) + completion
    attention_B_L: Tensor
    positions_B_L: Tensor
    completion_B_T: Tensor
    mask_B_T: Tensor  # real completion tokens (through the first EOS)
    old_logps_B_T: Tensor
    ref_logps_B_T: Tensor
    old_values_B_T: Tensor
    scores_B: Tensor
    advantages_B_T: Tensor
    returns_B_T: Tensor

    def rows(self, index: Tensor) -> Rollout:
        return Rollout(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def inputs(self) -> dict[str, Tensor]:
        return {"input_ids": self.ids_B_L, "attention_mask": self.attention_B_L, "position_ids": self.positions_B_L}


def completion_mask(completion_B_T: Tensor, eos_id: int) -> Tensor:
    """1 on each completion's tokens up to and including its first EOS, 0 after it."""
    is_eos_B_T = (completion_B_T == eos_id).long()
    eos_before_B_T = is_eos_B_T.cumsum(dim=1) - is_eos_B_T
    return (eos_before_B_T == 0).long()


def make_accelerator(config: PpoRecipe) -> Accelerator:
    """Plain accelerate in one process, or a DeepSpeed engine configured from the recipe.

    The DeepSpeed dict is rl_lora.training.distributed's, with its "auto" fields filled here (accelerate fills
    them from a dataloader, and this loop has none): one micro-batch is one process's share of a PPO
    minibatch, every minibatch is one optimizer step, and DeepSpeed clips at ``train.max_grad_norm``.
    """
    on_gpu = torch.cuda.is_available()
    ds = deepspeed_config(config.distributed)
    if ds is None:
        return Accelerator(cpu=not on_gpu)
    # gloo on CPU; the state is shared below. A process stalled past distributed.timeout fails the run, not hangs it.
    state = PartialState(cpu=not on_gpu, timeout=timedelta(seconds=config.distributed.timeout))
    processes = int(state.num_processes)
    ds.update({
        "train_micro_batch_size_per_gpu": config.ppo.minibatch_size // processes,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": config.train.max_grad_norm,
        "bf16": {"enabled": on_gpu and config.model.dtype == "bfloat16"},
    })
    # No cpu=True here: with it accelerate ignores the plugin; the PartialState above already chose CPU.
    return Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds))


def check_layout(config: PpoRecipe, processes: int, deepspeed: bool, nodes: int = 1) -> None:
    """Refuse, naming the keys, what PPO cannot split over ``processes`` (on ``nodes`` machines) or save."""
    t, spec = config.train, config.ppo
    if processes > 1 and not deepspeed:
        raise ConfigError("algorithm 'ppo' under several processes needs distributed.zero_stage (0, 2 or 3): "
                          "its policy, critic and reference passes go through one DeepSpeed engine")
    if config.distributed.gradient_accumulation != 1:
        raise ConfigError(f"algorithm 'ppo': distributed.gradient_accumulation must be 1 (is "
                          f"{config.distributed.gradient_accumulation}); ppo.minibatch_size sets the update size")
    prompts = t.batch_size // spec.samples_per_prompt
    if prompts % processes or spec.minibatch_size % processes:
        raise ConfigError(f"algorithm 'ppo': the step's prompts (train.batch_size {t.batch_size} / "
                          f"ppo.samples_per_prompt {spec.samples_per_prompt} = {prompts}) and ppo.minibatch_size "
                          f"({spec.minibatch_size}) must divide evenly over {processes} processes")
    if deepspeed and t.save_every and nodes > 1:
        # Every process writes its shard into the one staging folder the main process seals: on several
        # machines those writes land on each machine's own disk unless the run folder is shared.
        raise ConfigError(f"algorithm 'ppo': train.save_every under DeepSpeed works on one machine only (this "
                          f"launch spans {nodes}, --nnodes); drop train.save_every or run on one machine")


def zero3_local_values(p: Tensor, rank: int) -> Tensor:
    """The elements of ``p`` this process holds: its ZeRO-3 partition without the padding, or ``p``.

    DeepSpeed gives every process a partition of ceil(numel / processes) elements; the last ones run
    past the parameter's end and are padding that is never written (a 1-element bias split over two
    processes is all padding on the second), so their bytes are whatever the allocator left there.
    """
    part = getattr(p, "ds_tensor", None)
    if part is None:
        return p
    size = part.numel()
    # ds_numel: the whole parameter's size, set by DeepSpeed's ZeRO-3 beside ds_tensor (not in torch's stubs)
    return part.view(-1).narrow(0, 0, max(0, min(size, p.ds_numel - rank * size)))  # type: ignore[attr-defined]


class PPOTrainer:
    """PPO with a critic. ``.model`` is the policy (what evaluation and saving use); ``.train()`` runs it."""

    def __init__(self, config: PpoRecipe, ac: ActorCritic, tokenizer: PreTrainedTokenizerBase,
                 train_dataset: Dataset, lr: float, base_param_bytes: int, output_dir: Path) -> None:
        self.config, self.ac, self.tokenizer = config, ac, tokenizer
        self.accelerator = make_accelerator(config)
        self.processes, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        self.is_deepspeed_enabled = self.accelerator.state.deepspeed_plugin is not None
        nodes = self.processes // int(os.environ.get("LOCAL_WORLD_SIZE", self.processes))  # set by torchrun
        check_layout(config, self.processes, self.is_deepspeed_enabled, nodes)
        self.spec, t = config.ppo, config.train
        self.base_param_bytes = base_param_bytes
        self.rows = train_dataset.to_list()
        self.rng = random.Random(t.seed)  # the data order: the same on every process, each takes its share
        self.order: list[int] = []
        self.rewards = trainer_rewards(config.reward.functions)
        self.kl_coef = self.spec.kl_coef
        self.num_tokens = 0
        self.nonfinite = 0
        self.engine: nn.Module = ac  # the DeepSpeed engine (or the module itself) once prepared in train()
        self.prepared = False
        groups = [{"params": ac.policy_params, "lr": lr},
                  {"params": ac.critic_params, "lr": lr * self.spec.value_lr_multiplier}]
        self.optimizer: Any = torch.optim.AdamW(groups, lr=lr, weight_decay=t.weight_decay)
        # Stepped once per PPO step by this loop, never by DeepSpeed (which would step it per minibatch);
        # it sets the LR on the param groups DeepSpeed's optimizer reads.
        self.lr_scheduler = get_scheduler(t.lr_scheduler, self.optimizer,
                                          num_warmup_steps=int(t.warmup_ratio * t.steps), num_training_steps=t.steps)
        self.args = PpoArguments(t.batch_size // self.processes, 1, self.processes, t.steps, t.log_every, t.seed,
                                 str(output_dir))
        self.state = TrainerState(max_steps=t.steps, logging_steps=t.log_every, train_batch_size=t.batch_size,
                                  is_world_process_zero=self.accelerator.is_main_process,
                                  is_local_process_zero=self.accelerator.is_local_main_process)
        self.control = TrainerControl()
        self.callback_handler = CallbackHandler([], self.model, tokenizer, self.optimizer, self.lr_scheduler)
        if self.processes > 1:  # the same initial weights everywhere (seeded above), different samples per process
            torch.manual_seed(t.seed + self.rank)

    def _prepare(self) -> None:
        """Place (one process) or wrap in the DeepSpeed engine (ZeRO) the trainable module and optimizer.

        Done at the start of training, as transformers' Trainer does, so the parameter counts the runner
        reads after building are whole tensors, not ZeRO-3 partitions.
        """
        if self.prepared:  # by an earlier train() call
            return
        self.engine, self.optimizer = self.accelerator.prepare(self.ac, self.optimizer)
        self.prepared = True
        self.callback_handler.optimizer = self.optimizer
        if self.ac.reference is not None:
            self.ac.reference.to(self.accelerator.device)

    @property
    def model(self) -> PreTrainedModel | PeftModel:
        return self.ac.policy

    @property
    def _callback_args(self) -> TrainingArguments:
        """``args`` as transformers' CallbackHandler types them: PpoArguments has the fields its callbacks read."""
        return cast(TrainingArguments, self.args)

    # -- the TrainerHandle (rl_lora/algorithms/contract.py) --------------------------------------
    @property
    def global_step(self) -> int:
        return self.state.global_step

    def attach(self, callbacks: list[TrainerCallback]) -> None:
        for callback in callbacks:
            self.callback_handler.add_callback(callback)

    def figures(self) -> dict[str, int | float]:
        return {**parameter_figures(self, self.ref_model), **self.memory_figures()}

    def save_policy(self, folder: Path) -> None:
        if self.is_deepspeed_enabled:
            self.save_model(str(folder))
        else:
            self.ac.policy.save_pretrained(str(folder))

    def restore(self, checkpoint: Path, step: int) -> None:
        self._prepare()
        self._load_checkpoint(checkpoint)  # the step is the checkpoint's own

    @property
    def ref_model(self) -> nn.Module | None:
        """The separate frozen reference (full-parameter mode); None when it is the adapter-off policy."""
        return self.ac.reference

    def memory_figures(self) -> dict[str, Any]:
        """Parameter bytes of policy + critic + reference (shared tensors once) against one base model."""
        held = self.ac.param_bytes()
        trainable = {id(p): getattr(p, "ds_numel", p.numel()) for p in (*self.ac.policy_params, *self.ac.critic_params)}
        return {
            "ppo_param_bytes": held,
            "ppo_base_param_bytes": self.base_param_bytes,
            "ppo_param_bytes_vs_base": round(held / self.base_param_bytes, 4),
            "ppo_trainable_params": sum(trainable.values()),
        }

    # -- rollouts ---------------------------------------------------------------------------
    def _next_rows(self, n: int) -> list[dict[str, Any]]:
        """The next ``n`` prompts of a reshuffled pass over the training set (like a dataloader's epochs)."""
        out = []
        for _ in range(n):
            if not self.order:
                self.order = list(range(len(self.rows)))
                self.rng.shuffle(self.order)
            out.append(self.rows[self.order.pop()])
        return out

    @torch.no_grad()
    def _sample(self, prompts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        """(prompt ids, prompt mask, completion ids) sampled from the policy at the recipe's temperature."""
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"  # generation continues from the right edge
        try:
            batch = self.tokenizer(prompts, return_tensors="pt", padding=True).to(self.accelerator.device)
        finally:
            self.tokenizer.padding_side = side
        self.model.eval()
        # top_k=0, top_p=1: sample from exactly the distribution the log-probs are computed under
        # (transformers' default top_k is 50, which would truncate it). Under ZeRO-3 each forward gathers
        # the weights from every process: synced_gpus keeps a process whose completions all ended
        # stepping until every process is done, instead of leaving the others waiting forever.
        # LoRA: the policy adapter folded into the weights for generation (rl_lora/adapters/rollout.py), not under
        # ZeRO-3 where each process holds only a slice of every weight.
        merge = self.spec.merge_rollouts and not self._zero3()
        with merged_adapters(self.model) if merge else nullcontext():
            out_B_L = self.ac.policy.generate(
                **batch, do_sample=True, temperature=self.spec.temperature, top_k=0, top_p=1.0,
                max_new_tokens=self.spec.max_completion_length, synced_gpus=self._zero3() and self.processes > 1,
                pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
            )
        self.model.train()
        return batch["input_ids"], batch["attention_mask"], out_B_L[:, batch["input_ids"].shape[1]:]

    def _zero3(self) -> bool:
        return self.config.distributed.zero_stage == 3

    def _score(self, rows: list[dict[str, Any]], completions: list[str]) -> Tensor:
        """Weighted sum of the recipe's rewards; a None score adds nothing (as TRL sums rewards)."""
        prompts = [r["prompt"] for r in rows]
        columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
        total = [0.0] * len(rows)
        for spec, reward in zip(self.config.reward.functions, self.rewards, strict=True):
            scores = reward(prompts, completions, None, trainer_state=self.state, **columns)
            total = [t + (spec.weight * s if s is not None else 0.0) for t, s in zip(total, scores, strict=True)]
        return torch.tensor(total, dtype=torch.float32, device=self.accelerator.device)

    def _logps(self, logits_B_K_V: Tensor, completion_B_T: Tensor) -> Tensor:
        # The last of the K = T+1 kept positions predicts past the end; temperature as when sampling.
        return pm.token_logps(logits_B_K_V[:, :-1] / self.spec.temperature, completion_B_T)

    def _step_rows(self) -> list[dict[str, Any]]:
        """This process's prompts of the step, each repeated ``samples_per_prompt`` times.

        Every process draws the whole step's prompts in the same order and keeps its own slice, so the
        data position is one number for all of them (and in one process nothing changes).
        """
        prompts = self.config.train.batch_size // self.spec.samples_per_prompt
        share = prompts // self.processes
        rows = self._next_rows(prompts)[self.rank * share:(self.rank + 1) * share]
        return [r for r in rows for _ in range(self.spec.samples_per_prompt)]

    @torch.no_grad()
    def rollout(self) -> Rollout:
        """Sample, score, and compute old log-probs, reference log-probs, values, advantages, returns."""
        rows = self._step_rows()
        prompt_B_P, prompt_mask_B_P, completion_B_T = self._sample([r["prompt"] for r in rows])
        mask_B_T = completion_mask(completion_B_T, self.tokenizer.eos_token_id)
        ids_B_L = torch.cat([prompt_B_P, completion_B_T], dim=1)
        attention_B_L = torch.cat([prompt_mask_B_P, mask_B_T], dim=1)
        # Positions count real tokens only, as generate() numbered them behind the left padding.
        positions_B_L = (attention_B_L.cumsum(dim=1) - 1).clamp(min=0)
        inputs = {"input_ids": ids_B_L, "attention_mask": attention_B_L, "position_ids": positions_B_L}
        keep = completion_B_T.shape[1] + 1
        old_logps_B_T = self._logps(self.engine("policy", **inputs, keep=keep), completion_B_T)
        ref_logps_B_T = self._logps(self.engine("reference", **inputs, keep=keep), completion_B_T)
        old_values_B_T = self.engine("value", **inputs)[:, -keep:-1]
        scores_B = self._score(rows, self.tokenizer.batch_decode(completion_B_T, skip_special_tokens=True))
        kl_B_T = pm.kl_estimate(old_logps_B_T, ref_logps_B_T, self.spec.kl_estimator)
        rewards_B_T = pm.kl_penalised_rewards(scores_B, kl_B_T, mask_B_T, self.kl_coef)
        advantages_B_T, returns_B_T = pm.gae(rewards_B_T, old_values_B_T, mask_B_T, self.spec.gamma, self.spec.lam)
        if self.spec.whiten_advantages:
            advantages_B_T = pm.masked_whiten(advantages_B_T, mask_B_T)
        return Rollout(ids_B_L, attention_B_L, positions_B_L, completion_B_T, mask_B_T, old_logps_B_T, ref_logps_B_T,
                       old_values_B_T, scores_B, advantages_B_T, returns_B_T)

    # -- optimisation -----------------------------------------------------------------------
    def _losses(self, mb: Rollout) -> dict[str, Tensor]:
        """Policy and value losses of one minibatch, with the figures logged about them."""
        keep = mb.completion_B_T.shape[1] + 1
        logits_B_K_V = self.engine("policy", **mb.inputs(), keep=keep)
        logps_B_T = self._logps(logits_B_K_V, mb.completion_B_T)
        pg, clip_frac = pm.policy_loss(logps_B_T, mb.old_logps_B_T, mb.advantages_B_T, mb.mask_B_T, self.spec.clip)
        values_B_T = self.engine("value", **mb.inputs())[:, -keep:-1]
        vf, value_clip_frac = pm.value_loss(values_B_T, mb.old_values_B_T, mb.returns_B_T, mb.mask_B_T,
                                            self.spec.value_clip)
        entropy_B_T = pm.entropy_from_logits(logits_B_K_V[:, :-1].detach() / self.spec.temperature)
        return {"loss": pg + self.spec.vf_coef * vf, "loss/policy": pg, "loss/value": vf, "clip_frac": clip_frac,
                "value_clip_frac": value_clip_frac, "entropy": pm.masked_mean(entropy_B_T, mb.mask_B_T)}

    def _apply(self, loss: Tensor) -> bool:
        """One optimizer update from ``loss``; a non-finite loss is skipped and counted.

        Under several processes the update is skipped on all of them when any one's loss is non-finite
        (a process leaving the gradient all-reduce alone would hang the others).
        """
        bad = torch.tensor(float(not torch.isfinite(loss)), device=self.accelerator.device)
        if self.processes > 1:
            bad = self.accelerator.reduce(bad, "sum")
        if bad.item() > 0:
            self.nonfinite += 1
            if self.nonfinite >= self.config.train.max_nonfinite_steps:  # updates in a row, here
                raise RlLoraError(f"ppo: {self.nonfinite} updates in a row had a non-finite loss "
                                  f"(last at step {self.state.global_step + 1}); stopping before the weights go bad")
            return False
        self.nonfinite = 0
        self.accelerator.backward(loss)  # under DeepSpeed: backward, all-reduce, clip, step, zero the grads
        if not self.is_deepspeed_enabled:
            max_norm = self.config.train.max_grad_norm
            self.accelerator.clip_grad_norm_(self.ac.policy_params, max_norm)
            self.accelerator.clip_grad_norm_(self.ac.critic_params, max_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return True

    def update(self, ro: Rollout) -> tuple[dict[str, float], int]:
        """``ppo.epochs`` passes over shuffled minibatches: the mean of each logged figure, and the
        tokens the training passes ran over."""
        sums: dict[str, float] = {}
        count = skipped = tokens = 0
        size = ro.ids_B_L.shape[0]
        minibatch = self.spec.minibatch_size // self.processes
        for _ in range(self.spec.epochs):
            order = torch.randperm(size, device=ro.ids_B_L.device)
            for start in range(0, size, minibatch):
                mb = ro.rows(order[start:start + minibatch])
                losses = self._losses(mb)
                tokens += int(mb.attention_B_L.sum())
                skipped += not self._apply(losses["loss"])
                for key, value in losses.items():
                    sums[key] = sums.get(key, 0.0) + float(value.detach())
                count += 1
        out = {k: v / count for k, v in sums.items()}
        out["skipped_updates"] = skipped
        return out, tokens

    def _over_processes(self, logs: dict[str, float], tokens: int) -> tuple[dict[str, float], int]:
        """Figures averaged and tokens summed over processes, so the main process logs the whole step."""
        if self.processes == 1:
            return logs, tokens
        keys = sorted(logs)
        values = torch.tensor([logs[k] for k in keys] + [float(tokens)], dtype=torch.float64,
                              device=self.accelerator.device)
        summed = self.accelerator.reduce(values, "sum").tolist()
        return {k: v / self.processes for k, v in zip(keys, summed, strict=False)}, int(summed[-1])

    def step(self) -> dict[str, float]:
        """One PPO step: a rollout batch, its update, and the KL coefficient's adaptation."""
        ro = self.rollout()
        k1_B_T = pm.kl_estimate(ro.old_logps_B_T, ro.ref_logps_B_T, "k1")
        kl = float(torch.where(ro.mask_B_T.bool(), k1_B_T, 0.0).sum(dim=1).mean())  # per completion, then mean
        logs, tokens = self.update(ro)
        logs.update({
            "kl": kl,
            "reward": float(ro.scores_B.mean()),
            "return_mean": float(pm.masked_mean(ro.returns_B_T, ro.mask_B_T)),
            "explained_variance": float(pm.explained_variance(ro.old_values_B_T, ro.returns_B_T, ro.mask_B_T)),
            "completions/mean_length": float(ro.mask_B_T.sum(1).float().mean()),
        })
        logs, tokens = self._over_processes(logs, tokens)
        self.num_tokens += tokens
        logs.update({"kl_coef": self.kl_coef, "lr": self.lr_scheduler.get_last_lr()[0], "num_tokens": self.num_tokens})
        if self.spec.adaptive_kl:
            self.kl_coef = pm.adaptive_kl_coef(self.kl_coef, logs["kl"], self.spec.target_kl,
                                               self.config.train.batch_size, self.spec.kl_horizon)
        self.lr_scheduler.step()
        return logs

    def train(self, resume_from_checkpoint: str | None = None) -> None:
        """Run ``train.steps`` PPO steps (from a sealed checkpoint's step when resuming), calling the
        transformers callbacks as a Trainer would: step end, log, save."""
        self._prepare()
        pending: list[dict[str, float]] = []
        if resume_from_checkpoint:
            pending = self._load_checkpoint(Path(resume_from_checkpoint))
        h, args = self.callback_handler, self._callback_args
        self.control = h.on_train_begin(args, self.state, self.control)
        for step in range(self.state.global_step + 1, args.max_steps + 1):
            pending.append(self.step())
            self.state.global_step = step
            self.state.num_input_tokens_seen = self.num_tokens
            self.control = h.on_step_end(args, self.state, self.control)
            if step % args.logging_steps == 0 or self.control.should_log or step == args.max_steps:
                logs = _mean_logs(pending)
                self.state.log_history.append({**logs, "step": step})
                self.control = h.on_log(args, self.state, self.control, logs)
                self.control.should_log = False
                pending = []
            if self.config.train.save_every and step % self.config.train.save_every == 0:
                self._save_checkpoint(pending)
            if self.control.should_training_stop:  # e.g. the over-optimization guard's stop
                break
        self.control = h.on_train_end(args, self.state, self.control)

    # -- checkpoints ------------------------------------------------------------------------
    def _save_checkpoint(self, pending: list[dict[str, float]]) -> None:
        """Stage everything an exact resume needs, then let SealCheckpoints seal it.

        One process: the main process writes the folder alone. Under DeepSpeed every process takes part
        (_save_shards); the weights are checked first on every process, and all refuse together.
        """
        step = self.state.global_step
        bad = non_finite_parameters(self.ac) if not self.is_deepspeed_enabled else self._non_finite_anywhere()
        if bad:
            raise CheckpointError(f"step {step}: not saving a checkpoint with non-finite weights "
                                  f"({', '.join(bad[:3])})")
        state = {
            "global_step": step,
            "order": list(self.order),
            **ppo_checkpoint.rng_states(self.rng),
            "kl_coef": self.kl_coef,
            "num_tokens": self.num_tokens,
            "nonfinite": self.nonfinite,
            "pending": pending,  # steps run since the last log record (train.log_every > 1)
        }
        staging = Path(self.args.output_dir) / f"checkpoint-{step}"
        if self.is_deepspeed_enabled:
            self._save_shards(staging, state)
            return
        if self.state.is_world_process_zero:
            ppo_checkpoint.write(staging, self.ac, self.optimizer, self.lr_scheduler, state)
        self.control = self.callback_handler.on_save(self._callback_args, self.state, self.control)

    def _non_finite_anywhere(self) -> list[str]:
        """Trainable parameters holding NaN or inf in any process's share (a ZeRO-3 partition is checked
        where it lives), the same list on every process, so all refuse together and name the same ones."""
        bad = [n for n, p in self.ac.named_parameters()
               if p.requires_grad and not torch.isfinite(zero3_local_values(p, self.rank)).all()]
        if self.processes == 1:
            return bad
        return sorted(set(gather_object(bad)))

    def _save_shards(self, staging: Path, state: dict[str, Any]) -> None:
        """Under DeepSpeed: every process writes its share into one staging folder; the main process seals it.

        Three barriers: the main process empties the folder before anyone writes, every process has
        written before it is sealed, and it is sealed before any process goes on (so no process starts the
        next checkpoint's folder, or exits, with this one unsealed).
        """
        if self.accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)  # what a killed save left
            staging.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        ppo_checkpoint.write_shard(staging, self.engine, self.lr_scheduler, state, self.rank,
                                   self.accelerator.is_main_process)
        self.accelerator.wait_for_everyone()
        self.control = self.callback_handler.on_save(self._callback_args, self.state, self.control)
        self.accelerator.wait_for_everyone()

    def _load_checkpoint(self, folder: Path) -> list[dict[str, float]]:
        """Restore weights, optimizer, scheduler, data position, RNG states and counters from ``folder``."""
        if self.is_deepspeed_enabled:
            state = ppo_checkpoint.read_shard(folder, self.engine, self.lr_scheduler, self.rank, self.processes)
        else:
            state = ppo_checkpoint.read(folder, self.ac, self.optimizer, self.lr_scheduler)
        self.state.global_step = int(state["global_step"])
        self.order = [int(i) for i in state["order"]]
        ppo_checkpoint.restore_rng_states(state, self.rng)
        self.kl_coef = float(state["kl_coef"])
        self.num_tokens = int(state["num_tokens"])
        self.nonfinite = int(state["nonfinite"])
        self.state.num_input_tokens_seen = self.num_tokens
        return list(state["pending"])

    # -- saving (the runner calls this under DeepSpeed) -------------------------------------
    def save_model(self, output_dir: str) -> None:
        """Save the policy (adapter, or full model) from every process's view: under ZeRO-3 the weights
        are gathered from all processes first (each holds a slice), and only the main process writes."""
        # LoRA: both adapters (the value adapter is saved beside the policy's); full: the whole policy.
        params = [p for p in self.model.parameters() if p.requires_grad or self.config.lora.is_full]
        gather = nullcontext()
        if any(hasattr(p, "ds_id") for p in params):
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        with gather:
            if self.accelerator.is_main_process:
                self.ac.policy.save_pretrained(output_dir)
        self.accelerator.wait_for_everyone()


def _mean_logs(records: list[dict[str, float]]) -> dict[str, float]:
    """Means over the steps since the last log; running figures (tokens, coefficient, LR) as of the last."""
    last = {"num_tokens", "kl_coef", "lr"}
    out = {}
    for key in records[-1]:
        values = [r[key] for r in records if not (isinstance(r[key], float) and math.isnan(r[key]))]
        out[key] = records[-1][key] if key in last else (sum(values) / len(values) if values else float("nan"))
    return out


class Ppo:
    """PPO's steps (rl_lora/algorithms/contract.py's Algorithm); check and load are GRPO's (common.py)."""

    name = "ppo"
    final_metrics = {"final_reward": "reward"}

    def check(self, config: PpoRecipe) -> RolloutInputs:
        return check_rollout(config)

    def load(self, config: PpoRecipe, checked: RolloutInputs, progress: bool) -> Loaded:
        return load_rollout(config, checked, progress, config.ppo.max_completion_length)

    def build(self, config: PpoRecipe, loaded: Loaded, lr: float, output_dir: Path) -> PPOTrainer:
        """``output_dir`` is the scratch folder checkpoints are staged in before they are sealed."""
        torch.manual_seed(config.train.seed)  # the value head's initialisation and the rollouts' sampling
        base_param_bytes = unique_param_bytes(loaded.model)
        ac = build_actor_critic(loaded.model, config.lora)
        gather_container_parameters(ac, config.distributed)
        return PPOTrainer(config, ac, loaded.tokenizer, loaded.train_dataset, lr, base_param_bytes, output_dir)

    def kl_budget(self, config: PpoRecipe) -> float | None:
        return config.ppo.target_kl if config.ppo.adaptive_kl else None


ALGORITHM = Ppo()
