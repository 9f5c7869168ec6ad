"""What an algorithm module promises the runner, and what the trainer it builds must answer.

Each algorithm is one module under rl_lora/algorithms/ (grpo, ppo, dpo, reward_model) whose ``ALGORITHM``
satisfies ``Algorithm``: three steps, so the runner reads top to bottom (setup -> train -> save -> summary)
whatever it runs:

1. ``check(config)``: everything that can fail on the user's input without a model (reward names,
   preference files, ``trl`` options), run before any model loads and before the run folder exists;
2. ``load(config, checked, progress)``: the model, tokenizer, training data and held-out evaluation;
3. ``build(config, loaded, lr, output_dir)``: a ``TrainerHandle``; the runner then reads its figures,
   makes the tracker and the other callbacks from them, and attaches those before training.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from datasets import Dataset
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

from rl_lora.tasks.base import Metric

if TYPE_CHECKING:
    from peft import PeftModel


@dataclass
class Loaded:
    """A model ready to train: what ``build`` needs and what the tracker evaluates."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str  # the folder or hub id the weights came from (the built-in model's cache folder)
    train_dataset: Dataset
    evaluate: Callable[[Any], dict[str, float]]  # held-out metrics of a model, e.g. {"accuracy": 0.46}
    metric: Metric  # the headline one of them: reports, sweeps and the closing lines judge by it
    info: dict[str, Any] = field(default_factory=dict)  # figures for summary.json (e.g. pair counts)


class TrainerHandle(Protocol):
    """The runner's whole view of a built trainer (TRL's, through common.TrlTrainerHandle, or rl-lora's PPO)."""

    @property
    def model(self) -> PreTrainedModel | PeftModel:
        """The policy being trained (PEFT's wrapper for an adapter run): what evaluation and saving use."""
        ...

    @property
    def global_step(self) -> int:
        """Optimizer steps done (a resumed run's count includes the first part's)."""
        ...

    def attach(self, callbacks: list[TrainerCallback]) -> None:
        """Add the runner's callbacks (tracker, guard, checkpoint sealing), called in this order."""
        ...

    def train(self, resume_from_checkpoint: str | None = None) -> Any:
        """Train to ``train.steps``, from a sealed checkpoint's step when given."""
        ...

    def figures(self) -> dict[str, int | float]:
        """Static figures for summary.json and every record: trainable and total parameters, and the
        bytes of a separate reference model (0 when the reference is the adapter-off policy or there is none)."""
        ...

    def save_policy(self, folder: Path) -> None:
        """Write the policy (adapter or full model) to ``folder``; every process calls it (ZeRO-3 gathers)."""
        ...

    def restore(self, checkpoint: Path, step: int) -> None:
        """Load the final sealed checkpoint (step ``step``) without training, to save what it holds."""
        ...


Checked = TypeVar("Checked")


class Algorithm(Protocol[Checked]):
    """One algorithm's steps; ``Checked`` is what its ``check`` hands its ``load``."""

    name: str  # the recipe's ``algorithm``

    @property
    def final_metrics(self) -> Mapping[str, str]:
        """summary.json key -> logged key, averaged over the last logged steps (one step is noisy)."""
        ...

    def check(self, config: Any) -> Checked: ...

    def load(self, config: Any, checked: Checked, progress: bool) -> Loaded: ...

    def build(self, config: Any, loaded: Loaded, lr: float, output_dir: Path) -> TrainerHandle: ...

    def kl_budget(self, config: Any) -> float | None:
        """The KL budget per completion a controller holds (the guard watches it), or None."""
        ...



@dataclass
class PairwiseAlgorithm:
    """An ``Algorithm`` trained on preference pairs through one of TRL's trainers (DPO, reward models):
    no rewards and no KL controller, so only its name, its final metrics and its three steps differ."""

    name: str
    final_metrics: Mapping[str, str]
    check: Callable[[Any], Any]
    load: Callable[[Any, Any, bool], Loaded]
    build: Callable[[Any, Loaded, float, Path], TrainerHandle]

    def kl_budget(self, config: Any) -> float | None:
        return None

def parameter_figures(trainer: TrainerHandle, reference: nn.Module | None) -> dict[str, int | float]:
    """Trainable and total parameters of the policy, and the bytes of a separate ``reference``."""
    from rl_lora.adapters.lora import count_parameters
    from rl_lora.training.memory import module_param_bytes

    trainable, total = count_parameters(trainer.model)
    return {"trainable_params": trainable, "total_params": total,
            "reference_param_bytes": module_param_bytes(reference) if reference is not None else 0}

