"""The built-in task's problems: two-operand addition, judged by exact answer.

Every pair (a, b) with both operands in [min_operand, max_operand] is a problem; a fixed, seeded
subset is held out for evaluation and never trained on (neither by the warm-up nor by RL).

Two prompt styles (``data.prompt_style``):

- ``plain``: ``"12+35="`` -> ``"47"``, for the built-in character model; the answer is the
  completion's first line, so ``"47"`` is right and ``"47 "`` too, but ``"= 47"`` is not.
- ``chat``: the question ``"What is 12+35? Answer with the number only."`` as a user message through
  the policy's chat template, for instruct models. Those answer in sentences as often as with the bare
  number ("12 + 35 = 47", "The answer is 47."), and a sentence's result comes at its end, so the answer
  is the completion's **last** integer (the first would read "12" out of "12 + 35 = 47").
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any

from datasets import Dataset

from reward_models.exact_answer import FIRST_LINE, LAST_INTEGER, extract_answer
from rl_lora.config.schema import DataSpec
from rl_lora.data.chat import render_chat
from rl_lora.tasks.evaluation import greedy_completions
from rl_lora.utils.errors import DataError, ModelError

__all__ = ["CHAT_QUESTION", "Problem", "answer_tokens", "chat_prompt", "exact_answer_accuracy", "extract_answer",
           "render_prompts", "split", "to_dataset"]

CHAT_QUESTION = "What is {a}+{b}? Answer with the number only."


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str
    # How the answer is read from a completion (reward_models.exact_answer.extract_answer's rules).
    rule: str = FIRST_LINE


def chat_prompt(tokenizer: Any, question: str) -> str:
    """``question`` as one user turn through the tokenizer's chat template, ready for the assistant's reply."""
    if getattr(tokenizer, "chat_template", None) is None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ModelError(f"data.prompt_style chat: the policy's tokenizer ('{name}') has no chat template "
                         "(use data.prompt_style: plain, or a chat/instruct model)")
    return render_chat(tokenizer, [{"role": "user", "content": question}])


def _all_problems(spec: DataSpec) -> list[Problem]:
    lo, hi = spec.min_operand, spec.max_operand
    if lo > hi:
        raise DataError(f"data.min_operand ({lo}) is larger than data.max_operand ({hi})")
    pairs = [(a, b) for a in range(lo, hi + 1) for b in range(lo, hi + 1)]
    if spec.prompt_style == "plain":
        return [Problem(f"{a}+{b}=", str(a + b)) for a, b in pairs]
    return [Problem(CHAT_QUESTION.format(a=a, b=b), str(a + b), LAST_INTEGER) for a, b in pairs]


def split(spec: DataSpec) -> tuple[list[Problem], list[Problem]]:
    """(train, held-out) problems; the held-out set depends only on the range and split_seed.

    Chat-style problems hold the bare question here (the same operand pairs are held out in either
    style); ``render_prompts`` puts them through the policy's chat template once the tokenizer is loaded.
    """
    problems = _all_problems(spec)
    if spec.eval_size >= len(problems):
        raise DataError(
            f"data.eval_size ({spec.eval_size}) leaves no training problems: the operand range "
            f"[{spec.min_operand}, {spec.max_operand}] has only {len(problems)} problems"
        )
    order = list(range(len(problems)))
    random.Random(spec.split_seed).shuffle(order)
    held = set(order[: spec.eval_size])
    train = [p for i, p in enumerate(problems) if i not in held]
    evaluation = [problems[i] for i in order[: spec.eval_size]]
    return train, evaluation


def render_prompts(problems: list[Problem], spec: DataSpec, tokenizer: Any) -> list[Problem]:
    """The problems as the policy is asked them: unchanged for plain prompts, each question through the
    tokenizer's chat template for ``data.prompt_style: chat``."""
    if spec.prompt_style == "plain":
        return problems
    return [replace(p, prompt=chat_prompt(tokenizer, p.prompt)) for p in problems]


def answer_tokens(spec: DataSpec) -> int:
    """Tokens a complete answer needs with the character tokenizer: the largest sum's digits + EOS."""
    return len(str(2 * spec.max_operand)) + 1


def to_dataset(problems: list[Problem]) -> Dataset:
    """A datasets.Dataset with a ``prompt`` column and an ``answer`` column (passed to rewards).

    Problems whose answer is not read from the first line add an ``answer_rule`` column, which
    ``exact_answer`` reads; plain problems leave it out, so reward plug-ins written for them see the
    columns they always saw.
    """
    columns = {"prompt": [p.prompt for p in problems], "answer": [p.answer for p in problems]}
    if any(p.rule != FIRST_LINE for p in problems):
        columns["answer_rule"] = [p.rule for p in problems]
    return Dataset.from_dict(columns)


def exact_answer_accuracy(model: Any, tokenizer: Any, problems: list[Problem], max_new_tokens: int) -> float:
    """Fraction of problems whose greedy completion's answer, read by the problem's rule, is exactly right."""
    completions = greedy_completions(model, tokenizer, [p.prompt for p in problems], max_new_tokens)
    correct = sum(extract_answer(c, p.rule) == p.answer for c, p in zip(completions, problems, strict=True))
    return correct / len(problems)

