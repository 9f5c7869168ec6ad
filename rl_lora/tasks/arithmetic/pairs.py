"""The arithmetic task's preference pairs for DPO and reward-model training, from the policy's own samples.

The built-in pairs pair a prompt's correct answer (chosen) with one of the policy's OWN wrong samples
(rejected), not a random string: the mistakes a preference method must learn to tell apart are the
ones the policy actually makes. They are sampled once per policy and data section, deterministically
from ``data.split_seed``, and cached beside the built-in model.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rl_lora.config.schema import DataSpec
from rl_lora.tasks.arithmetic import problems as arithmetic
from rl_lora.tasks.arithmetic.problems import Problem, extract_answer
from rl_lora.utils.errors import DataError

PAIRS_VERSION = 1  # bump when the way built-in pairs are sampled changes
SAMPLE_BATCH = 512  # prompts per generate call while sampling built-in pairs
PAIR_FIELDS = ("task", "min_operand", "max_operand", "eval_size", "split_seed", "prompt_style", "samples_per_prompt")


@torch.no_grad()
def sample_completions(
    model: Any, tokenizer: PreTrainedTokenizerBase, prompts: list[str], n: int, max_new_tokens: int, seed: int,
) -> list[list[str]]:  # model: a causal LM (transformers 5's PreTrainedModel declares no generate)
    """``n`` completions per prompt, sampled at temperature 1 (no top-k/top-p): the policy as it is."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # generation continues from the right edge
    out: list[list[str]] = []
    try:
        for start in range(0, len(prompts), SAMPLE_BATCH):
            batch = tokenizer(prompts[start : start + SAMPLE_BATCH], return_tensors="pt", padding=True).to(model.device)
            generated_BN_T = model.generate(
                **batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=n,
                max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            texts = tokenizer.batch_decode(generated_BN_T[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            out.extend(texts[i : i + n] for i in range(0, len(texts), n))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
        torch.random.set_rng_state(generator_state)
    return out


def pairs_from_samples(problems: list[Problem], samples: list[list[str]]) -> list[dict[str, str]]:
    """One pair per problem with a wrong sample: chosen = the answer, rejected = the first wrong answer.

    A sample's answer is its first line (as the exact-answer reward reads it); empty answers are
    skipped, since an empty rejected side is not a usable preference.
    """
    pairs = []
    for problem, texts in zip(problems, samples, strict=True):
        wrong = [a for a in map(extract_answer, texts) if a and a != problem.answer]
        if wrong:
            pairs.append({"prompt": problem.prompt, "chosen": problem.answer, "rejected": wrong[0]})
    return pairs


def builtin_pairs(
    cache_dir: Path | None, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data: DataSpec,
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(training pairs, held-out pairs) of the built-in task, from the policy's own samples.

    Read from ``cache_dir`` when built before, else built (about 30 s on 2 CPU cores for the 7,800
    training prompts at 2 samples each) and saved there. ``cache_dir`` is the built-in model's own
    folder, whose name already identifies the model and the split; other models pass None and their
    pairs are rebuilt every run.
    """
    # Only the fields the pairs depended on before tasks became plug-ins, so existing caches stay valid.
    fields = {k: v for k, v in data.model_dump().items() if k in PAIR_FIELDS}
    key = hashlib.sha256(json.dumps({"version": PAIRS_VERSION, "data": fields}, sort_keys=True).encode())
    path = cache_dir / f"preferences-{key.hexdigest()[:12]}.json" if cache_dir is not None else None
    if path is not None and path.is_file():
        cached = json.loads(path.read_text(encoding="utf-8"))
        return cached["train"], cached["held_out"]
    train, held_out = arithmetic.split(data)
    pairs = {}
    for name, problems in (("train", train), ("held_out", held_out)):
        samples = sample_completions(
            model, tokenizer, [p.prompt for p in problems], data.samples_per_prompt, arithmetic.answer_tokens(data),
            data.split_seed,
        )
        pairs[name] = pairs_from_samples(problems, samples)
    if not pairs["train"]:
        raise DataError("the policy answered every training prompt correctly in every sample: no built-in "
                        "preference pairs (use a less-trained policy or more data.samples_per_prompt)")
    if path is not None:
        _write_atomic(path, pairs)
    return pairs["train"], pairs["held_out"]


def _write_atomic(path: Path, payload: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(payload, f)
    os.replace(tmp, path)
