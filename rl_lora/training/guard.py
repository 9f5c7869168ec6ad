"""Reward over-optimization, seen while a run trains and acted on.

A policy trained against a proxy (a learned reward model, a shaped reward, a preference margin) can keep
raising the proxy while what the proxy stands for gets worse. ``OverOptimizationGuard`` watches both at
every held-out evaluation: when the task's headline metric has fallen more than ``guard.margin`` below its
best evaluation while the training proxy is above what it was then (at ``guard.patience`` evaluations in a
row), or when the KL to the reference has
stayed above its budget, it records an event (step, proxy, metric, KL) in summary.json
(``overoptimization``), prints it, and with ``guard.action: stop`` ends the run there. With
``guard.keep_best`` it saves the policy of the best evaluation to ``<run>/best/``.

The proxy is what each algorithm optimizes: the training reward (GRPO, PPO), the DPO reward margin, the
reward model's training accuracy.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from rl_lora.config.schema import GuardSpec
from rl_lora.tasks.base import Metric

PROXY = {"grpo": "reward", "ppo": "reward", "dpo": "rewards/margins", "reward": "accuracy"}
PROXY_WINDOW = 10  # logged steps averaged for the proxy's level (one step is noisy)


def metric_drop(metric: Metric, best: float, now: float) -> float:
    """How much worse ``now`` is than ``best`` (positive = worse), in the metric's own units."""
    return best - now if metric.higher_is_better else now - best


def drop_margin(spec: GuardSpec, best: float) -> float:
    """The margin in the metric's units: absolute for a metric in [0, 1], relative to |best| otherwise."""
    return spec.margin if 0.0 <= best <= 1.0 else spec.margin * abs(best)


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

    # -- figures -----------------------------------------------------------------------------------
    def _proxy_level(self, upto_step: int) -> float | None:
        """Mean proxy over the PROXY_WINDOW logged steps up to ``upto_step``; at the start (no step logged yet),
        over the first PROXY_WINDOW logged steps: the proxy before training has moved it far."""
        values = [(r["step"], r[self.proxy]) for r in self.records if r.get(self.proxy) is not None]
        before = [v for step, v in values if step <= upto_step]
        window = before[-PROXY_WINDOW:] if before else [v for _, v in values[:PROXY_WINDOW]]
        return statistics.fmean(window) if window else None

    def _kl_streak(self) -> int:
        streak = 0
        for r in reversed(self.records):
            kl = r.get("kl_per_completion", r.get("kl"))
            if kl is None:
                continue
            if kl <= self.kl_budget * (1 + self.spec.kl_tolerance):
                break
            streak += 1
        return streak

    # -- the callback ------------------------------------------------------------------------------
    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        new, self._checked = self.records[self._checked:], len(self.records)
        key = f"eval/{self.metric.name}"
        for record in new:
            if record.get(key) is None:
                continue
            step, value = record["step"], record[key]
            if self._best is None or self.metric.better(value, self._best[1]):
                self._best = (step, value)
                self._streak = []
                if self.spec.keep_best and self.save_best is not None and self.best_dir is not None:
                    self.save_best(self.best_dir)
                continue
            self._check_overoptimization(step, value)
        if self.kl_budget is not None and self._kl_streak() >= self.spec.kl_patience and not any(
                e["kind"] == "kl_over_budget" for e in self.events):
            last = self.records[-1]
            self._event({"kind": "kl_over_budget", "step": last["step"],
                         "kl": last.get("kl_per_completion", last.get("kl")), "kl_budget": self.kl_budget,
                         "proxy": self.proxy, "proxy_now": last.get(self.proxy)})
        if self.events and self.spec.action == "stop":
            control.should_training_stop = True

    def _check_overoptimization(self, step: int, value: float) -> None:
        best_step, best = self._best
        proxy_then, proxy_now = self._proxy_level(best_step), self._proxy_level(step)
        fell = metric_drop(self.metric, best, value) > drop_margin(self.spec, best)
        # The metric fell without the proxy rising: not over-optimization (the end-of-run note covers it).
        rose = proxy_then is not None and proxy_now is not None and proxy_now > proxy_then
        self._streak = [*self._streak, step] if fell and rose else []
        if len(self._streak) < self.spec.patience:
            return
        if any(e["kind"] == "proxy_up_metric_down" for e in self.events):
            return  # reported once
        last = next((r for r in reversed(self.records) if r["step"] <= step and "kl" in r), {})
        self._event({"kind": "proxy_up_metric_down", "step": step, "first_seen": self._streak[0],
                     "metric": self.metric.name, "value": value,
                     "best": best, "best_step": best_step, "proxy": self.proxy, "proxy_then": proxy_then,
                     "proxy_now": proxy_now, "kl": last.get("kl_per_completion", last.get("kl"))})

    def _event(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        if not self.main:
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
        if self.spec.keep_best and self._best is not None:
            out["best_saved"] = {"step": self._best[0], self.metric.name: self._best[1], "path": str(self.best_dir)}
        return out
