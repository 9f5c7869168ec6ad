"""Metrics: one record per logged step, written to ``metrics.jsonl`` and to W&B alike.

TRL's trainers log their own figures (loss, reward, entropy, KL, ...) through transformers'
callback system but no memory and no held-out accuracy; ``RunTracker`` merges those in, so the
file and the dashboard always hold the same record. Only the main process writes.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from tqdm.auto import tqdm
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from rl_lora.tasks.base import Metric
from rl_lora.training.flops import linear_inventory, peak_tflops, training_flops_per_token
from rl_lora.training.memory import peak_memory, state_bytes

# TRL's key -> ours. Keys not listed are kept under their own names.
_RENAME = {"learning_rate": "lr"}


def held_out_label(key: str) -> str:
    """How a held-out metric is shown: ``accuracy`` -> "held-out accuracy", ``held_out_reward/x`` ->
    "held-out reward/x"."""
    return "held-out " + key.removeprefix("held_out_").replace("_", " ")


def wandb_host() -> str:
    """The W&B server's host name: a self-hosted server's (WANDB_BASE_URL) or the public one."""
    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    return urlparse(base if "//" in base else f"https://{base}").hostname or "api.wandb.ai"


def wandb_mode() -> str:
    """'online' when a W&B login for the configured server is present, else 'offline'; WANDB_MODE wins."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators(wandb_host()):  # `wandb login --host` writes the server's own entry
            return "online"
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"


class WandbSink:
    """A W&B run living in the run folder; offline unless the user is logged in."""

    def __init__(self, run_dir: Path, project: str, name: str, group: str | None, config: dict[str, Any],
                 tags: list[str], job_type: str) -> None:
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        self.mode = wandb_mode()
        self.run = wandb.init(
            project=project, name=name, group=group, job_type=job_type, tags=tags, config=config,
            # mode: WANDB_MODE as the user set it, validated by wandb itself (its stub lists only the current names)
            dir=str(run_dir), mode=self.mode, reinit="finish_previous",  # type: ignore[arg-type]
        )

    def log(self, record: dict[str, Any], step: int) -> None:
        self.run.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def update_config(self, values: dict[str, Any]) -> None:
        self.run.config.update(values, allow_val_change=True)

    def update_summary(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            if isinstance(value, (int, float, str, bool)):
                self.run.summary[key] = value

    def finish(self, summary: dict[str, Any]) -> str | None:
        """Close the run; returns the `wandb sync` command for an offline run."""
        self.update_summary(summary)
        run_dir = getattr(self.run, "dir", None)
        self.run.finish()
        if self.mode == "offline" and run_dir:
            return f"wandb sync {Path(run_dir).parent}"
        return None


class RunTracker(TrainerCallback):
    """Adds step time, tokens/s, memory and the held-out metrics to each logged record and writes it."""

    def __init__(
        self,
        metrics_path: Path,
        evaluate: Callable[[Any], dict[str, float]],
        eval_every: int,
        static: dict[str, Any],
        sink: WandbSink | None = None,
        progress: bool = True,
        main: bool = True,
        metric: Metric | None = None,
    ) -> None:
        self.metrics_path = metrics_path
        self.metric = metric  # the headline held-out metric: its best evaluation goes into the summary
        self.evaluate = evaluate
        self.eval_every = eval_every
        self.static = static
        self.sink = sink
        self.progress = progress
        # Every process evaluates (under ZeRO-3 a forward pass needs them all); only the main one writes.
        self.main = main
        self.records: list[dict[str, Any]] = []
        self.start_eval: dict[str, float] = {}
        self.last_eval: dict[str, float] = {}
        self._pending_eval: dict[str, float] = {}
        self._step_times: list[float] = []
        self._last_tick = 0.0
        self._last_tokens = 0.0
        self._bar: tqdm | None = None
        self._model: Any = None
        self._optimizer: Any = None
        # Read off the trainer at on_train_begin: completions (or pairs) per optimizer step, and the
        # estimated training FLOPs per trained token (rl_lora/training/flops.py).
        self.samples_per_step: int | None = None
        self.flops_per_token: float | None = None
        self.peak_tflops: float | None = None

    # -- transformers callback hooks -------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: Any = None, **kwargs: Any) -> None:
        self._model = model
        if model is not None:
            shapes, adapted = linear_inventory(model)
            self.flops_per_token = training_flops_per_token(shapes, adapted)
        self.samples_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        self.peak_tflops = peak_tflops()
        if self.sink is not None:  # trainable/total params are known only once the trainer has wrapped the model
            self.sink.update_config(self.static)
        if not self.records:  # a resumed run already has its step-0 evaluation
            self.start_eval = self.evaluate(model)
            self.last_eval = dict(self.start_eval)
            record = {"step": 0, **{f"eval/{k}": v for k, v in self.start_eval.items()}, **peak_memory()}
            self._write(record)
        self._bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", mininterval=2.0,
                         disable=not self.progress or not self.main)
        self._last_tick = time.perf_counter()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model: Any = None, optimizer: Any = None, **kwargs: Any) -> None:
        now = time.perf_counter()
        self._step_times.append(now - self._last_tick)
        self._last_tick = now
        self._model, self._optimizer = model, optimizer
        if state.global_step % self.eval_every == 0 or state.global_step >= state.max_steps:
            self._pending_eval = self.evaluate(model)
            self.last_eval = dict(self._pending_eval)
            control.should_log = True  # so the eval lands in a record of its own step
        if self._bar is not None:
            self._bar.update(1)
        # The eval's own time is not part of the next step's time.
        self._last_tick = time.perf_counter()

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        logs = dict(logs or {})
        if "train_runtime" in logs:  # the end-of-training summary, not a step
            return
        record: dict[str, Any] = {"step": state.global_step}
        for key, value in logs.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                record[_RENAME.get(key, key)] = value
        times = self._step_times or [float("nan")]
        record["step_time"] = sum(times) / len(times)
        record["steps_per_s"] = 1.0 / record["step_time"] if record["step_time"] > 0 else float("nan")
        tokens = float(logs.get("num_tokens", self._last_tokens))
        elapsed = sum(self._step_times)
        steps = len(self._step_times)
        record.update(self._speed(record, tokens - self._last_tokens, elapsed, steps))
        self._last_tokens = tokens
        self._step_times = []
        record.update(peak_memory())
        if self._model is not None:  # bytes THIS process holds (ZeRO slices); the main process's are written
            record.update(state_bytes(self._model, self._optimizer))
        record.update({f"eval/{k}": v for k, v in self._pending_eval.items()})
        self._pending_eval = {}
        record.update(self.static)
        self._write(record)
        if self._bar is not None:
            shown = next((k for k in ("reward", "rewards/margins", "loss") if record.get(k) is not None), None)
            postfix = {shown.split("/")[-1]: f"{record[shown]:.3f}"} if shown else {}
            shown_evals = [self.metric.name] if self.metric is not None else list(self.last_eval)
            for key in shown_evals:  # the headline metric only: the bar stays one line
                if self.last_eval.get(key) is not None:
                    postfix[held_out_label(key)] = f"{self.last_eval[key]:.3f}"
            self._bar.set_postfix(postfix, refresh=False)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        if self._bar is not None:
            self._bar.close()
        if self.sink is not None:
            self.sink.update_summary(self.summary())

    # -- helpers ---------------------------------------------------------------------------
    def _speed(self, record: dict[str, Any], tokens: float, elapsed: float, steps: int) -> dict[str, float]:
        """Throughput over the steps since the last record (step time includes rollout generation)."""
        if elapsed <= 0 or steps == 0:
            return {}
        out = {"tokens_per_s": tokens / elapsed}  # tokens the training pass ran over (prompt + completion)
        if self.samples_per_step:
            out["samples_per_s"] = self.samples_per_step * steps / elapsed
            if "completions/mean_length" in record:
                generated = record["completions/mean_length"] * self.samples_per_step * steps
                out["generated_tokens_per_s"] = generated / elapsed
        if self.flops_per_token and tokens > 0:
            flops = self.flops_per_token * tokens
            out["train_flops_per_step"] = flops / steps
            out["train_tflops_per_s"] = flops / elapsed / 1e12
            if self.peak_tflops:
                out["mfu"] = out["train_tflops_per_s"] / self.peak_tflops
        return out

    def load_previous(self, records: list[dict[str, Any]]) -> None:
        """Continue a resumed run: keep its records up to the checkpoint (the caller truncated them)."""
        self.records = list(records)
        evals = [r for r in records if any(k.startswith("eval/") for k in r)]
        if evals:
            self.start_eval = {k[5:]: v for k, v in evals[0].items() if k.startswith("eval/")}
            self.last_eval = {k[5:]: v for k, v in evals[-1].items() if k.startswith("eval/")}
        self._last_tokens = float(next((r["num_tokens"] for r in reversed(records) if "num_tokens" in r), 0.0))

    def best_eval(self, metric: Metric) -> tuple[int, float] | None:
        """(step, value) of the best evaluation of ``metric`` so far (the earliest, on a tie); None before any."""
        best = None
        for r in self.records:
            value = r.get(f"eval/{metric.name}")
            if value is not None and (best is None or metric.better(value, best[1])):
                best = (r["step"], value)
        return best

    def summary(self) -> dict[str, Any]:
        """Run-level figures for summary.json and the W&B summary: the best evaluation of the headline metric
        and its step, the mean step time, the optimizer state's size."""
        best = self.best_eval(self.metric) if self.metric is not None else None
        peaks = {}
        if best is not None and self.metric is not None:
            peaks = {f"best_{self.metric.name}": best[1], f"best_{self.metric.name}_step": best[0]}
        times = [r["step_time"] for r in self.records if r.get("step_time") is not None]
        return {
            **peaks,
            "mean_step_time": sum(times) / len(times) if times else None,
            "optimizer_bytes": next((r["optimizer_bytes"] for r in reversed(self.records) if "optimizer_bytes" in r),
                                    None),
        }

    def _write(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.records.append(clean)
        if not self.main:
            return
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")
        if self.sink is not None:
            self.sink.log(clean, step=record["step"])
