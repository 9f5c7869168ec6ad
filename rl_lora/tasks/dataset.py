"""The dataset task: a user's prompts from a file or ``datasets`` source, judged by the recipe's own functions.

Rows follow TRL's prompt formats: ``prompt`` (or ``data.prompt_column``) is a string (standard) or a list
of chat messages (conversational, rendered through the policy's chat template; ``data.chat_prompts`` sends
string prompts as one user message the same way). Every other column reaches the reward
functions as a keyword argument, as in TRL. Held-out prompts come from ``data.eval_source``, another
split of the source (``data.eval_split``), or a seeded ``data.eval_fraction`` of the rows, which are
then never trained on; at most ``data.eval_size`` of them are evaluated.

The held-out evaluation greedily completes each held-out prompt and scores the completions with the
recipe's reward functions (``held_out_reward/<name>`` per function and ``held_out_reward``, their
weighted sum) and with ``data.metrics`` (each under its label). The headline metric is the first of
``data.metrics``, or ``held_out_reward`` when there is none.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rl_lora.config.schema import GrpoRecipe, PpoRecipe, RecipeConfig, RewardFunctionSpec
from rl_lora.data.chat import check_messages, render_chat, require_chat_template, require_policy_chat_template
from rl_lora.data.sources import BadRow, NumberedRows, read_rows, report_bad_rows
from rl_lora.tasks.base import Metric
from rl_lora.tasks.scoring import Scorer, metric_scorer, reward_scorer, score_mean
from rl_lora.utils.errors import ConfigError, DataError

if TYPE_CHECKING:  # datasets and torch load only when the task is used, not when its data is checked
    from datasets import Dataset

HELD_OUT_REWARD = "held_out_reward"
DPO_EVAL_TOKENS = 256  # greedy completion length under DPO, which has no completion length of its own


@dataclass
class PromptRows:
    """Validated rows of one source: plain dicts with a ``prompt`` column, and whether prompts are messages."""

    source: str
    rows: list[dict[str, Any]]
    conversational: bool

    @property
    def columns(self) -> list[str]:
        return list(self.rows[0])


def validate_prompt_rows(numbered: NumberedRows, source: str, prompt_column: str = "prompt") -> PromptRows:
    """Every row an object with a non-empty prompt (a string or messages) and the first good row's columns.

    The prompt column (``data.prompt_column``) is renamed ``prompt``; a row that already has a ``prompt``
    column besides it is refused rather than silently overwritten. Every bad row is reported in one DataError.
    """
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    first: tuple[list[str], bool] | None = None
    for row_no, raw in numbered:
        where = f"dataset '{source}' row {row_no}"
        try:
            row = _prompt_row(raw, where, prompt_column)
            kind = (list(row), isinstance(row["prompt"], list))
            _same_layout(kind, first, where, prompt_column)
        except DataError as exc:
            problems.append(str(exc))
            continue
        first = first or kind
        rows.append(row)
    report_bad_rows(problems)
    return PromptRows(source, rows, bool(first and first[1]))


def _prompt_row(raw: Any, where: str, prompt_column: str) -> dict[str, Any]:
    if isinstance(raw, BadRow):
        raise DataError(f"{where}: {raw.problem}")
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected an object with a '{prompt_column}' field, got {type(raw).__name__}")
    if prompt_column not in raw:
        found = ", ".join(map(repr, raw)) or "none"
        hint = "set data.prompt_column to the column holding the prompts" if prompt_column == "prompt" else (
            "check data.prompt_column")
        raise DataError(f"{where}: no '{prompt_column}' column (columns: {found}); {hint}")
    if prompt_column != "prompt" and "prompt" in raw:
        raise DataError(f"{where}: has both a 'prompt' column and data.prompt_column '{prompt_column}'")
    row = {"prompt": raw[prompt_column], **{k: v for k, v in raw.items() if k != prompt_column}}
    if isinstance(row["prompt"], str):
        if not row["prompt"].strip():
            raise DataError(f"{where}: field '{prompt_column}' is empty")
    else:
        check_messages(row["prompt"], f"{where}: field '{prompt_column}'")
    return row


def _same_layout(kind: tuple[list[str], bool], first: tuple[list[str], bool] | None, where: str,
                 prompt_column: str) -> None:
    if first is None:
        return
    if kind[1] != first[1]:
        formats = ("a string", "a list of messages")
        raise DataError(f"{where}: field '{prompt_column}' is {formats[kind[1]]} but earlier rows' are "
                        f"{formats[first[1]]} (one format per dataset)")
    if set(kind[0]) != set(first[0]):
        missing = sorted(set(first[0]) - set(kind[0]))
        extra = sorted(set(kind[0]) - set(first[0]))
        detail = f"column '{missing[0]}' is missing" if missing else f"column '{extra[0]}' is not in earlier rows"
        raise DataError(f"{where}: {detail} (every row must have the columns {first[0]})")


def hold_out(rows: list[dict[str, Any]], fraction: float, seed: int, source: str) -> tuple[list[dict], list[dict]]:
    """(train, held-out): a seeded ``fraction`` of the rows, at least one each side, or DataError."""
    n_held = round(fraction * len(rows))
    if n_held < 1 or n_held >= len(rows):
        raise DataError(f"dataset '{source}': data.eval_fraction {fraction} of {len(rows)} rows leaves "
                        f"{n_held} held-out and {len(rows) - n_held} training rows (each needs at least 1)")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_held])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


class DatasetTask:
    """A task read from ``data.source`` (see the module docstring)."""

    def __init__(self, config: RecipeConfig) -> None:
        self.config = config
        self.data = config.data
        # Reward functions score held-out completions only where the recipe has them (GRPO, PPO).
        self.rewards: list[RewardFunctionSpec] = (
            list(config.reward.functions) if isinstance(config, (GrpoRecipe, PpoRecipe)) else []
        )
        if not self.data.metrics and not self.rewards:
            raise ConfigError(f"data.task dataset under algorithm {config.algorithm} has nothing to judge held-out "
                              "completions by: name at least one function in data.metrics")
        first = self.data.metrics[0] if self.data.metrics else None
        self.metric = (
            Metric(first.key, first.higher_is_better, f"mean of {first.name} over held-out greedy completions",
                   unit=first.unit)
            if first else
            Metric(HELD_OUT_REWARD, True, "weighted sum of the recipe's rewards over held-out greedy completions",
                   unit="reward")
        )
        self._train: PromptRows | None = None
        self._held: PromptRows | None = None
        self._scorers: list[tuple[str, Scorer]] | None = None
        self._rendered: list[str] | None = None

    # -- checks before any model loads -------------------------------------------------------------
    def check(self) -> dict[str, Any]:
        """Read and validate the rows, split off the held-out prompts, find every scoring function."""
        d, source = self.data, self._source
        train = validate_prompt_rows(read_rows(source, d.split, d.subset), source, d.prompt_column)
        if d.eval_source is not None or d.eval_split is not None:
            name = d.eval_source or source
            held = validate_prompt_rows(read_rows(name, d.eval_split or d.split, d.subset), name, d.prompt_column)
            if held.conversational != train.conversational:
                raise DataError(f"dataset '{name}': held-out prompts and training prompts ('{source}') are in "
                                "different formats (strings vs lists of messages)")
            if set(held.columns) != set(train.columns):
                raise DataError(f"dataset '{name}': held-out columns {held.columns} differ from the training "
                                f"columns {train.columns} of '{source}'")
        else:
            rows, held_rows = hold_out(train.rows, d.eval_fraction, d.split_seed, source)
            train, held = PromptRows(source, rows, train.conversational), PromptRows(source, held_rows,
                                                                                      train.conversational)
        held.rows = held.rows[: d.eval_size]
        if train.conversational or d.chat_prompts:  # refused now, not after the model loads
            require_policy_chat_template(self.config.model, train.source)
        self._train, self._held = train, held
        self._scorers = self._find_scorers(train.columns)
        return {"train_prompts": len(train.rows), "held_out_prompts": len(held.rows)}

    @property
    def _source(self) -> str:
        assert self.data.source is not None  # the recipe's validation requires it for data.task dataset
        return self.data.source

    def _checked(self) -> tuple[PromptRows, PromptRows, list[tuple[str, Scorer]]]:
        """(training rows, held-out rows, scorers), checked first if not yet."""
        if self._train is None or self._held is None or self._scorers is None:
            self.check()
        assert self._train is not None and self._held is not None and self._scorers is not None  # set by check
        return self._train, self._held, self._scorers

    @property
    def columns(self) -> list[str]:
        train, _, _ = self._checked()
        return [c for c in train.columns if c != "prompt"]

    def _find_scorers(self, columns: list[str]) -> list[tuple[str, Scorer]]:
        available = [c for c in columns if c != "prompt"]
        source = self._source
        keys = held_out_reward_keys(self.rewards)
        scorers = [(key, reward_scorer(f, available, source)) for key, f in zip(keys, self.rewards, strict=True)]
        labels = [m.key for m in self.data.metrics]
        duplicate = next((k for k in labels if labels.count(k) > 1), None)
        if duplicate:
            raise ConfigError(f"data.metrics: two metrics are logged as '{duplicate}' (give one a label)")
        return scorers + [(m.key, metric_scorer(m, available, source)) for m in self.data.metrics]

    # -- the protocol --------------------------------------------------------------------------------
    def train_dataset(self, tokenizer: Any) -> Dataset:
        from datasets import Dataset

        train, _, _ = self._checked()
        return Dataset.from_list([{**r, "prompt": self._render(tokenizer, r["prompt"], train)} for r in train.rows])

    def evaluate(self, model: Any, tokenizer: Any, max_new_tokens: int | None) -> dict[str, float]:
        _, held, scorers = self._checked()
        if self._rendered is None:
            self._rendered = [self._render(tokenizer, r["prompt"], held) for r in held.rows]
        from rl_lora.tasks.evaluation import greedy_completions

        tokens = self.data.eval_max_new_tokens or max_new_tokens or DPO_EVAL_TOKENS
        completions = greedy_completions(model, tokenizer, self._rendered, tokens)
        columns = {c: [r[c] for r in held.rows] for c in held.columns if c != "prompt"}
        out: dict[str, float] = {}
        total = [0.0] * len(completions)
        for (key, scorer), spec in zip(scorers, [*self.rewards, *self.data.metrics], strict=True):
            scores = scorer(self._rendered, completions, columns)
            out[key] = score_mean(scores)
            if isinstance(spec, RewardFunctionSpec):  # TRL sums weighted rewards, a missing score as 0
                total = [t + spec.weight * (s or 0.0) for t, s in zip(total, scores, strict=True)]
        if self.rewards:
            out[HELD_OUT_REWARD] = sum(total) / len(total)
        return out

    def _render(self, tokenizer: Any, prompt: Any, rows: PromptRows) -> str:
        if not rows.conversational and not self.data.chat_prompts:
            return prompt
        require_chat_template(tokenizer, getattr(tokenizer, "name_or_path", "") or "the policy", rows.source)
        messages = prompt if rows.conversational else [{"role": "user", "content": prompt}]
        return render_chat(tokenizer, messages)


def spec_key(spec: RewardFunctionSpec) -> str:
    """A reward's name in held-out keys: the function's name (``file.py:score`` -> ``score``), ``learned``
    for a reward model."""
    if spec.name.startswith("learned:"):
        return "learned"
    return spec.name.rpartition(":")[2] or spec.name


def held_out_reward_keys(specs: list[RewardFunctionSpec]) -> list[str]:
    """Each reward's held-out key, ``held_out_reward/<name>`` (``spec_key``). Rewards that share a name
    (``a.py:score`` and ``b.py:score``, two ``learned:`` rewards) are numbered in the recipe's order
    (``score_1``, ``score_2``) with a warning saying which is which, so none overwrites another."""
    names = [spec_key(f) for f in specs]
    keys = list(names)
    for name in dict.fromkeys(names):
        same = [i for i, n in enumerate(names) if n == name]
        if len(same) < 2:
            continue
        for number, i in enumerate(same, 1):
            keys[i] = f"{name}_{number}"
        told = ", ".join(f"'{specs[i].name}' as {HELD_OUT_REWARD}/{keys[i]}" for i in same)
        warnings.warn(f"reward.functions: {len(same)} rewards are named '{name}'; held out as: {told}",
                      stacklevel=3)
    clash = next((k for k in keys if keys.count(k) > 1), None)
    if clash is not None:
        raise ConfigError(f"reward.functions: two rewards would be held out as '{HELD_OUT_REWARD}/{clash}' "
                          "(rename one of the functions)")
    return [f"{HELD_OUT_REWARD}/{k}" for k in keys]


def make_task(config: RecipeConfig) -> DatasetTask:
    return DatasetTask(config)

