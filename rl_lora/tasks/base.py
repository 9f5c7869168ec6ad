"""What a task is: the prompts a policy trains on, the held-out prompts it is judged on, and the judgement.

The rest of the library sees a task only through this protocol, so the built-in arithmetic task
(rl_lora/tasks/arithmetic/task.py), the dataset task (rl_lora/tasks/dataset.py) and a user's own task are
interchangeable. A task is made by a factory ``factory(config, **data.task_kwargs) -> Task`` that a
recipe names in ``data.task`` (rl_lora/tasks/registry.py says how names are found).

Required:

- ``metric``: the headline metric, a ``Metric`` (its name is the key ``evaluate`` returns it under);
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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # the protocol is read before any heavy library loads (rl_lora/launch/precheck.py)
    from datasets import Dataset


@dataclass(frozen=True)
class Metric:
    """A held-out metric: the key it is logged under, which direction is better, and what it measures."""

    name: str
    higher_is_better: bool = True
    description: str = ""

    def better(self, a: float, b: float) -> bool:
        """Whether ``a`` is strictly better than ``b``."""
        return a > b if self.higher_is_better else a < b

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "higher_is_better": self.higher_is_better, "description": self.description}


@runtime_checkable
class Task(Protocol):
    metric: Metric

    def train_dataset(self, tokenizer: Any) -> Dataset: ...

    def evaluate(self, model: Any, tokenizer: Any, max_new_tokens: int | None) -> dict[str, float]: ...
