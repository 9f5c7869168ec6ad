"""What each algorithm is, in one light table (no torch, no TRL), for every layer that treats algorithms
differently: the recipe section it reads, whether it learns from rewards or from preference pairs, the
logged figure the over-optimisation guard watches, TRL's config class, and where its trainer lives.

The trainers themselves (check, load, build) are in rl_lora/algorithms/, one module each; this table is
what the rest of the library may know about them without importing one. Nothing outside an algorithm's
own module branches on its name: it reads these facts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rl_lora.utils.errors import ConfigError


@dataclass(frozen=True)
class AlgorithmInfo:
    """The facts about one algorithm that the library outside its trainer reads."""

    name: str  # the recipe's ``algorithm``
    section: str  # its own recipe section
    learns_from: Literal["rewards", "preferences"]  # reward functions on its own rollouts, or pairs from data
    proxy: str  # the logged figure it optimises, which the guard watches against the held-out metric
    trl_config: str | None  # TRL's config class (``trl:`` options are checked against it); None: rl-lora's own loop
    builder: str  # ``module:attribute`` of its rl_lora/algorithms/contract.Algorithm object
    length_key: str | None = None  # the recipe key that limits a training sequence (preference algorithms)
    scores_sequences: bool = False  # a scalar head on the whole sequence (a reward model), not a language model
    processes_need_zero: bool = False  # several processes need distributed.zero_stage (PPO: no DDP wrapping)
    has_critic: bool = False  # a value model trained beside the policy (PPO)
    keeps_reference: bool = False  # full-parameter runs hold a frozen reference copy (GRPO only with a KL term)

    @property
    def uses_rewards(self) -> bool:
        return self.learns_from == "rewards"

    @property
    def uses_preferences(self) -> bool:
        return self.learns_from == "preferences"


ALGORITHMS: dict[str, AlgorithmInfo] = {info.name: info for info in (
    AlgorithmInfo("grpo", "grpo", "rewards", "reward", "GRPOConfig", "rl_lora.algorithms.grpo:ALGORITHM"),
    AlgorithmInfo("ppo", "ppo", "rewards", "reward", None, "rl_lora.algorithms.ppo.trainer:ALGORITHM",
                  processes_need_zero=True, has_critic=True, keeps_reference=True),
    AlgorithmInfo("dpo", "dpo", "preferences", "rewards/margins", "DPOConfig", "rl_lora.algorithms.dpo:ALGORITHM",
                  length_key="dpo.max_length", keeps_reference=True),
    AlgorithmInfo("reward", "reward_model", "preferences", "accuracy", "RewardConfig",
                  "rl_lora.algorithms.reward_model:ALGORITHM", length_key="reward_model.max_length",
                  scores_sequences=True),
)}


def algorithm_info(name: str) -> AlgorithmInfo:
    """The facts about ``name``; ConfigError naming the algorithms there are."""
    if name not in ALGORITHMS:
        raise ConfigError(f"algorithm '{name}' is not one rl-lora runs (runnable: {', '.join(sorted(ALGORITHMS))})")
    return ALGORITHMS[name]
