"""Reward over-optimization, seen while a run trains and acted on.

A policy trained against a proxy (a learned reward model, a shaped reward, a preference margin) can keep
raising the proxy while what the proxy stands for gets worse. ``OverOptimizationGuard`` watches both at
every held-out evaluation: when the task's headline metric has fallen more than ``guard.margin`` below its
best evaluation while the training proxy is above what it was then (at ``guard.patience`` evaluations in a
row), or when the KL to the reference has
stayed above its budget, it records an event (step, proxy, metric, KL) in summary.json
(``overoptimization``), prints it, and with ``guard.action: stop`` ends the run there. With
``guard.keep_best`` it saves the policy of the best evaluation to ``<run>/best/`` (``best_step.json`` names
its step).

A resumed run's guard takes its best evaluation, streak and events from the records reloaded up to the
checkpoint, saving nothing: ``best/`` is kept when it holds that best step's policy, removed otherwise.
Under several processes every one evaluates, and the main process's figures decide for all: whether to
save (it alone writes ``best/``; the others wait until it is complete) and whether to stop.

The proxy is what each algorithm optimizes: the training reward (GRPO, PPO), the DPO reward margin, the
reward model's training accuracy.
"""

from __future__ import annotations

import json
import shutil
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from rl_lora.config.schema import GuardSpec
from rl_lora.tasks.base import Metric
from rl_lora.training.distributed import from_main
from rl_lora.utils.errors import CheckpointError

PROXY_WINDOW = 10  # logged steps averaged for the proxy's level (one step is noisy)
BEST_MARKER = "best_step.json"  # in best/: the evaluation whose policy it holds, read back on resume


def metric_drop(metric: Metric, best: float, now: float) -> float:
    """How much worse ``now`` is than ``best`` (positive = worse), in the metric's own units."""
    return best - now if metric.higher_is_better else now - best


def drop_margin(spec: GuardSpec, metric: Metric, best: float, start: float | None = None) -> float:
    """``guard.margin`` in the metric's units, by its declared unit (``Metric.margin_in_units``): absolute for a
    rate, a fraction of how far training moved it (best - first evaluation) for a metric with units."""
    return metric.margin_in_units(spec.margin, best, start)


class OverOptimizationGuard(TrainerCallback):
    """Runs after the tracker (it reads the tracker's records); see the module docstring."""

    def __init__(self, spec: GuardSpec, metric: Metric, proxy: str, records: list[dict[str, Any]],
                 kl_budget: float | None = None, save_best: Callable[[Path], None] | None = None,
                 best_dir: Path | None = None, main: bool = True) -> None:
        self.spec, self.metric, self.proxy = spec, metric, proxy
        self.records = records  # the tracker's list, appended to as it logs
        self.kl_budget = kl_budget
        self.save_best, self.best_dir = save_best, best_dir
        self.main = main
        self.events: list[dict[str, Any]] = []
        self._best: tuple[int, float] | None = None
        self._streak: list[int] = []  # evaluations in a row showing the proxy up and the metric down
        self._checked = 0  # records already looked at
        self._saved_step: int | None = None  # the evaluation whose policy best/ holds
        self._restore()

    # -- figures -----------------------------------------------------------------------------------
    def _proxy_level(self, upto_step: int) -> float | None:
        """Mean proxy over the PROXY_WINDOW logged steps up to ``upto_step``; at the start (no step logged yet),
        over the first PROXY_WINDOW logged steps: the proxy before training has moved it far."""
        values = [(r["step"], r[self.proxy]) for r in self.records if r.get(self.proxy) is not None]
        before = [v for step, v in values if step <= upto_step]
        window = before[-PROXY_WINDOW:] if before else [v for _, v in values[:PROXY_WINDOW]]
        return statistics.fmean(window) if window else None

    def _kl_streak(self, budget: float) -> int:
        streak = 0
        for r in reversed(self.records):
            kl = r.get("kl_per_completion", r.get("kl"))
            if kl is None:
                continue
            if kl <= budget * (1 + self.spec.kl_tolerance):
                break
            streak += 1
        return streak

    # -- the callback ------------------------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        # The tracker has just logged the step-0 evaluation: if it is the best, best/ gets the policy it was of,
        # not the one after the first step.
        self.on_log(args, state, control)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        found_best = self._scan(announce=True)
        keeping = self.spec.keep_best and self.save_best is not None and self.best_dir is not None
        stop = bool(self.events) and self.spec.action == "stop"
        # Under several processes each one evaluates on its own; the main process's figures decide for all.
        save, stop = (bool(flag) for flag in from_main([int(found_best and keeping), int(stop)]))
        if save:
            self._save()
        if stop:
            control.should_training_stop = True

    def _scan(self, announce: bool) -> bool:
        """Take in the records logged since the last call; whether one of them is a new best evaluation."""
        new, self._checked = self.records[self._checked:], len(self.records)
        key = f"eval/{self.metric.name}"
        found_best = False
        for record in new:
            if record.get(key) is None:
                continue
            step, value = record["step"], record[key]
            if self._best is None or self.metric.better(value, self._best[1]):
                self._best = (step, value)
                self._streak = []
                found_best = True
                continue
            self._check_overoptimization(step, value, announce)
        if self.kl_budget is not None and self._kl_streak(self.kl_budget) >= self.spec.kl_patience and not any(
                e["kind"] == "kl_over_budget" for e in self.events):
            last = self.records[-1]
            self._event({"kind": "kl_over_budget", "step": last["step"],
                         "kl": last.get("kl_per_completion", last.get("kl")), "kl_budget": self.kl_budget,
                         "proxy": self.proxy, "proxy_now": last.get(self.proxy)}, announce)
        return found_best

    def _restore(self) -> None:
        """A resumed run: the best evaluation, streak and events from the records the tracker reloaded, saving
        nothing (the policy now is not the policy of those evaluations). ``best/`` is kept when its marker names
        the restored best step; otherwise (saved past the checkpoint resumed from, or unmarked) it is removed."""
        if not self.records:
            return
        self._scan(announce=False)
        if not (self.spec.keep_best and self.best_dir is not None and self.best_dir.exists()):
            return
        marker = self.best_dir / BEST_MARKER
        try:
            held = json.loads(marker.read_text())["step"]
        except (OSError, ValueError, KeyError, TypeError):
            held = None
        if self._best is not None and held == self._best[0]:
            self._saved_step = held
        elif self.main:
            shutil.rmtree(self.best_dir, ignore_errors=True)
            tqdm.write(f"rl-lora: removed {self.best_dir}: it held the policy of step {held}, not of the best "
                       f"evaluation before the checkpoint resumed from; it is saved again at the next best")

    def _save(self) -> None:
        """The policy now to ``best/`` (main process); the others wait for it to be complete."""
        assert self._best is not None and self.save_best is not None and self.best_dir is not None
        failed: BaseException | None = None
        if self.main:
            try:
                self.save_best(self.best_dir)
                (self.best_dir / BEST_MARKER).write_text(json.dumps({"step": self._best[0],
                                                                     self.metric.name: self._best[1]}))
                self._saved_step = self._best[0]
            except Exception as exc:  # told to the other processes before it is raised, so none waits on it
                failed = exc
        [main_failed] = from_main([int(failed is not None)])  # the barrier: none goes on before best/ is whole
        if failed is not None:
            raise failed
        if main_failed:
            raise CheckpointError(f"the main process could not save the best policy to '{self.best_dir}'")
        self._saved_step = self._best[0]

    def _check_overoptimization(self, step: int, value: float, announce: bool = True) -> None:
        assert self._best is not None  # called after the first evaluation set it
        best_step, best = self._best
        proxy_then, proxy_now = self._proxy_level(best_step), self._proxy_level(step)
        key = f"eval/{self.metric.name}"
        start = next((r[key] for r in self.records if r.get(key) is not None), None)  # the first evaluation
        fell = metric_drop(self.metric, best, value) > drop_margin(self.spec, self.metric, best, start)
        # The metric fell without the proxy rising: not over-optimization (the end-of-run note covers it).
        rose = proxy_then is not None and proxy_now is not None and proxy_now > proxy_then
        self._streak = [*self._streak, step] if fell and rose else []
        if len(self._streak) < self.spec.patience:
            return
        if any(e["kind"] == "proxy_up_metric_down" for e in self.events):
            return  # reported once
        last: dict[str, Any] = next((r for r in reversed(self.records) if r["step"] <= step and "kl" in r), {})
        self._event({"kind": "proxy_up_metric_down", "step": step, "first_seen": self._streak[0],
                     "metric": self.metric.name, "value": value,
                     "best": best, "best_step": best_step, "proxy": self.proxy, "proxy_then": proxy_then,
                     "proxy_now": proxy_now, "kl": last.get("kl_per_completion", last.get("kl"))}, announce)

    def _event(self, event: dict[str, Any], announce: bool = True) -> None:
        self.events.append(event)
        if not self.main or not announce:  # a resumed run's events were printed when they happened
            return
        e = event
        if e["kind"] == "proxy_up_metric_down":
            text = (f"over-optimization at step {e['step']}: training {e['proxy']} rose {e['proxy_then']:.3f} -> "
                    f"{e['proxy_now']:.3f} while held-out {e['metric'].replace('_', ' ')} fell {e['best']:.3f} "
                    f"(step {e['best_step']}) -> {e['value']:.3f}")
        else:
            text = (f"over-optimization at step {e['step']}: KL to the reference {e['kl']:.3f} per completion, over "
                    f"its budget {e['kl_budget']:g} (+{100 * self.spec.kl_tolerance:.0f}%) for "
                    f"{self.spec.kl_patience} logged steps")
        action = "; stopping (guard.action: stop)" if self.spec.action == "stop" else ""
        tqdm.write(f"rl-lora: {text}{action}")

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"overoptimization": self.events or None}
        if self.spec.keep_best and self._best is not None and self._saved_step == self._best[0]:
            out["best_saved"] = {"step": self._best[0], self.metric.name: self._best[1], "path": str(self.best_dir)}
        return out
