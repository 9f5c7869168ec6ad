"""Skip optimizer steps whose loss or gradient is NaN or inf (GRPO, DPO and reward-model trainers).

transformers' Trainer, and TRL's trainers built on it, step the optimizer whatever the loss: one NaN
gradient turns every trained weight into NaN for good, and Adam's moments keep the poison after the
gradients are finite again (users of GRPO + LoRA report exactly this). ``NonFiniteGuard`` is a mixin
placed before the TRL class (``class GuardedDPOTrainer(NonFiniteGuard, DPOTrainer)``) that

- notes whether any micro-batch loss of the current optimizer step was NaN or inf (``training_step``),
- wraps the prepared optimizer's ``step`` so that, when that loss or any gradient is not finite, the
  update is skipped (the gradients are judged by the total gradient norm transformers computes before
  every optimizer step, for clipping and logging: a norm over tensors holding NaN or inf is not finite;
  no second pass over the gradients, which for a full-parameter run is a pass over as many floats as
  the model has): weights and optimizer state stay as they were (transformers zeroes the gradients
  right after, and the LR schedule still advances: the step counts toward ``train.steps``),
- logs ``nonfinite_skipped`` (skipped steps since the previous record) in every training record, and
  a null loss for a record made of skipped steps only (transformers' NaN filter would log 0.0),
- stops the run with a NonFiniteError after ``max_nonfinite_steps`` skipped steps in a row, before
  anything else is saved: a checkpoint sealed earlier holds finite weights, and sealing refuses
  non-finite weights anyway (rl_lora/training/sealing.py).

Under several processes (DDP) the decision is all-gathered, so every rank skips the same steps. Under
DeepSpeed the guard is off: the engine owns the optimizer step, and its ZeRO optimizers skip a step
whose gradient norm is not finite themselves (fp32 and fp16); ``nonfinite_skipped`` is not logged there.

transformers has no hook that can veto an optimizer step, hence the wrapper around ``step``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from rl_lora.utils.errors import RlLoraError

DEFAULT_MAX_NONFINITE_STEPS = 8  # as PPO's MAX_NONFINITE_UPDATES: a few bad batches pass, a diverged run stops
_GUARDED = "_rl_lora_nonfinite_guard"  # marks an optimizer whose step is already wrapped


class NonFiniteError(RlLoraError):
    """Too many optimizer steps in a row had a non-finite loss or gradient: the run has diverged."""


def gradients_finite(optimizer: Any) -> bool:
    """True when every gradient the optimizer would apply is finite (one norm per tensor, one sync)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return True
    device = grads[0].device
    # The norm of a tensor holding NaN or inf is NaN or inf; _foreach_norm is what clip_grad_norm_ uses.
    norms = torch._foreach_norm(grads)
    return bool(torch.stack([n.to(device, torch.float32) for n in norms]).isfinite().all())


class NonFiniteGuard:
    """Mixin for a transformers Trainer subclass; see the module docstring. Put it first in the bases."""

    max_nonfinite_steps: int = DEFAULT_MAX_NONFINITE_STEPS
    nonfinite_skipped_total: int = 0  # this process's skipped steps (a resumed run counts from its checkpoint)
    _nonfinite_loss: bool = False  # a micro-batch loss of the current optimizer step was not finite
    _nonfinite_in_a_row: int = 0
    _nonfinite_since_log: int = 0
    _steps_since_log: int = 0
    _step_grad_norm: Any = None  # transformers' total gradient norm of the current optimizer step

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
        # transformers calls this once per optimizer step, right before ``optimizer.step()``, with the
        # pre-clip norm (or computes it here when clipping is off).
        norm = super()._get_grad_norm(model, grad_norm=grad_norm)  # type: ignore[misc]
        self._step_grad_norm = norm
        return norm

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        self._guard_optimizer()
        loss = super().training_step(model, inputs, num_items_in_batch)  # type: ignore[misc]
        if not bool(torch.isfinite(loss).all()):
            self._nonfinite_loss = True
        return loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and not self._guard_is_off():  # a training record, not the end-of-run summary
            logs["nonfinite_skipped"] = self._nonfinite_since_log
            if self._steps_since_log and self._nonfinite_since_log == self._steps_since_log:
                # transformers' logging_nan_inf_filter would log 0.0 for a record of skipped steps only.
                logs["loss"] = float("nan")
            self._nonfinite_since_log = self._steps_since_log = 0
        super().log(logs, *args, **kwargs)  # type: ignore[misc]

    # -- internals -------------------------------------------------------------------------
    def _guard_is_off(self) -> bool:
        return bool(getattr(self, "is_deepspeed_enabled", False))

    def _guard_optimizer(self) -> None:
        """Wrap the prepared optimizer's ``step`` once (after accelerate has wrapped it, before its first step)."""
        optimizer = getattr(self, "optimizer", None)
        if optimizer is None or self._guard_is_off() or getattr(optimizer, _GUARDED, False):
            return
        step = optimizer.step

        @functools.wraps(step)
        def guarded_step(*args: Any, **kwargs: Any) -> Any:
            self._steps_since_log += 1
            if self._step_is_finite(optimizer):
                self._nonfinite_in_a_row = 0
                return step(*args, **kwargs)
            self._skip()
            return None

        optimizer.step = guarded_step
        setattr(optimizer, _GUARDED, True)

    def _step_is_finite(self, optimizer: Any) -> bool:
        norm, self._step_grad_norm = self._step_grad_norm, None
        if self._nonfinite_loss:
            finite = False
        elif norm is not None:
            finite = math.isfinite(float(norm))
        else:
            finite = gradients_finite(optimizer)
        self._nonfinite_loss = False
        accelerator = self.accelerator  # type: ignore[attr-defined]
        if accelerator.num_processes > 1:  # every rank must take the same decision, or the replicas drift apart
            bad = torch.tensor([0 if finite else 1], device=accelerator.device)
            finite = int(accelerator.gather(bad).sum()) == 0
        return finite

    def _skip(self) -> None:
        step = self.state.global_step + 1  # type: ignore[attr-defined]  # the step being taken now
        self._nonfinite_in_a_row += 1
        self._nonfinite_since_log += 1
        self.nonfinite_skipped_total += 1
        if self._nonfinite_in_a_row >= self.max_nonfinite_steps:
            first = step - self._nonfinite_in_a_row + 1
            raise NonFiniteError(
                f"step {step}: the loss or gradient was NaN or inf at {self._nonfinite_in_a_row} optimizer steps in "
                f"a row (steps {first}-{step}), each skipped; stopping (train.max_nonfinite_steps: "
                f"{self.max_nonfinite_steps}). Checkpoints already sealed hold finite weights"
            )
