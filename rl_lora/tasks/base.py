"""What a task is: the prompts a policy trains on, the held-out prompts it is judged on, and the judgement.

The rest of the library sees a task only through this protocol, so the built-in arithmetic task
(rl_lora/tasks/arithmetic/task.py), the dataset task (rl_lora/tasks/dataset.py) and a user's own task are
interchangeable. A task is made by a factory ``factory(config, **data.task_kwargs) -> Task`` that a
recipe names in ``data.task`` (rl_lora/tasks/registry.py says how names are found).

Required:

- ``metric``: the headline metric, a ``Metric`` (its name is the key ``evaluate`` returns it under; its
  ``unit`` declares whether it is a rate in [0, 1] or has units of its own);
- ``train_dataset(tokenizer)``: a ``datasets.Dataset`` with a text ``prompt`` column (already rendered
  through the chat template where the task is conversational); every other column reaches the reward
  functions as a keyword argument;
- ``evaluate(model, tokenizer, max_new_tokens)``: held-out figures of a policy, a dict holding at least
  the headline metric (``max_new_tokens`` is the algorithm's completion length, or None: the task's own).

Optional:

- ``check()``: everything that can fail on the user's input without a model, run before any model
  loads and before the run folder exists; returns figures for summary.json (e.g. row counts);
- ``columns``: the names of the columns ``train_dataset`` will carry, so a reward function that needs
  a column the data lacks is refused before training starts.

Only the headline metric declares a unit; the run's closing lines show the other keys ``evaluate`` returns in
their raw units, never in points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # the protocol is read before any heavy library loads (rl_lora/launch/precheck.py)
    from datasets import Dataset


RATE = "rate"  # Metric.unit of a fraction in [0, 1]: margins and changes in points (0.05 = 5 points)

# Run folders written before metrics declared their unit: the built-in headline metrics, all rates. Any other
# metric without a declared unit is read as units without a name (never as a rate).
LEGACY_RATES = frozenset({"accuracy", "pairwise_accuracy"})


@dataclass(frozen=True)
class Metric:
    """A held-out metric: the key it is logged under, which direction is better, what it measures, and its unit.

    ``unit`` is declared, never guessed from values: ``"rate"`` (``RATE``) for a fraction in [0, 1] (accuracy,
    pass rate), whose margins and changes read in points; any other string names the metric's units
    (``"tokens"``, ``"reward"``, ``"ECE"``), whose margins are fractions of how far training moved it (see
    ``margin_in_units``). None (not declared) is read as units without a name, never as a rate.
    ``resolution``: the smallest step between two values of the metric where it is known (1 / held-out size
    for a rate over a fixed held-out set); reports floor a zero-spread interval with it.
    """

    name: str
    higher_is_better: bool = True
    description: str = ""
    unit: str | None = None
    resolution: float | None = None

    @property
    def is_rate(self) -> bool:
        return self.unit == RATE

    def better(self, a: float, b: float) -> bool:
        """Whether ``a`` is strictly better than ``b``."""
        return a > b if self.higher_is_better else a < b

    def margin_in_units(self, fraction: float, best: float, start: float | None = None) -> float:
        """A margin given as a fraction (e.g. 0.05), in the metric's own units.

        A rate: the fraction itself (0.05 = 5 points). Units: that fraction of how far training moved the metric
        (|best - start|), so a metric centred on 0 gets a margin in proportion to its movement, not about 0;
        of |best| where no start is known or training did not move it.
        """
        if self.is_rate:
            return fraction
        moved = abs(best - start) if start is not None and math.isfinite(start) else 0.0
        return fraction * (moved if moved > 0 else abs(best))

    def format_change(self, change: float) -> str:
        """A difference of two values: in points for a rate, in the metric's units otherwise."""
        if self.is_rate:
            return f"{100 * change:+.1f} points"
        return f"{change:+.4g}" + (f" {self.unit}" if self.unit else "")

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "higher_is_better": self.higher_is_better, "description": self.description,
                "unit": self.unit, "resolution": self.resolution}

    @classmethod
    def from_summary(cls, summary: dict[str, Any]) -> Metric:
        """The headline metric a run's summary.json declares (``headline_unit``; run folders from before units
        were declared: ``LEGACY_RATES`` are rates, anything else units without a name)."""
        name = summary.get("headline_metric", "accuracy")
        unit = summary.get("headline_unit", RATE if name in LEGACY_RATES else None)
        return cls(name, bool(summary.get("higher_is_better", True)), str(summary.get("held_out_metric") or ""),
                   unit, summary.get("headline_resolution"))


@runtime_checkable
class Task(Protocol):
    metric: Metric

    def train_dataset(self, tokenizer: Any) -> Dataset: ...

    def evaluate(self, model: Any, tokenizer: Any, max_new_tokens: int | None) -> dict[str, float]: ...
