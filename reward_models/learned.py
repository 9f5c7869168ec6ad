"""A learned reward: a sequence-classification model whose single logit scores prompt + completion.

Name one in a recipe as ``learned:<folder>``, where the folder is either a whole model (the ``model/``
folder of a full-parameter reward-model run) or a LoRA adapter of one (the ``adapter/`` folder of a
rank-r run; its base model is read from ``adapter_config.json`` unless ``kwargs.base`` names it).

A text is scored exactly as TRL's RewardTrainer trained on it: ``prompt + completion + eos`` tokenised
with the tokenizer's special tokens (conversational rows through the chat template), and the score is
``logits[:, 0]`` at the last non-pad token. Batches are padded on the right: a causal model's
position ids and attention then see the same tokens whether a text is scored alone or beside longer
or shorter texts, so a sample's score does not depend on its batch-mates. (Left padding shifts the
position ids by the padding length; rotary models such as Llama happen not to mind, models with
absolute position embeddings do.)
"""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path
from typing import Any, cast

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BatchEncoding,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from reward_models.protocol import RewardError

ADAPTER_CONFIG = "adapter_config.json"


def reward_ids(tokenizer: PreTrainedTokenizerBase, prompt: Any, completion: Any) -> list[int]:
    """Token ids of one (prompt, completion) the way TRL's RewardTrainer tokenises a preference side."""
    if isinstance(prompt, list):  # conversational: lists of {"role", "content"} messages
        messages = prompt + (completion if isinstance(completion, list) else [completion])
        # return_dict=True: a BatchEncoding (transformers types the return as the union of every mode's)
        encoded = cast(BatchEncoding, tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True))
        return list(encoded["input_ids"])
    text = prompt + completion
    eos = tokenizer.eos_token
    if eos and not text.endswith(eos):
        text += eos
    return list(tokenizer(text)["input_ids"])


@torch.no_grad()
def score_ids(model: PreTrainedModel, ids: list[list[int]], pad_token_id: int, batch_size: int = 64) -> list[float]:
    """``logits[:, 0]`` of each sequence, scored in right-padded batches of ``batch_size``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores: list[float] = []
    try:
        for start in range(0, len(ids), batch_size):
            chunk = ids[start : start + batch_size]
            width = max(len(row) for row in chunk)
            ids_B_T = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
            mask_B_T = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, row in enumerate(chunk):
                ids_B_T[i, : len(row)] = torch.tensor(row, dtype=torch.long)
                mask_B_T[i, : len(row)] = 1
            logits_B_L = model(input_ids=ids_B_T.to(device), attention_mask=mask_B_T.to(device)).logits
            scores.extend(logits_B_L[:, 0].float().cpu().tolist())
    finally:
        model.train(was_training)
    return scores


def score_texts(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[Any], completions: list[Any],
    batch_size: int = 64,
) -> list[float]:
    """One score per (prompt, completion): the reward model's ``logits[:, 0]``."""
    ids = [reward_ids(tokenizer, p, c) for p, c in zip(prompts, completions, strict=True)]
    return score_ids(model, ids, tokenizer.pad_token_id, batch_size)


def load_reward_model(folder: str | Path, base: str | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) from a sequence-classification folder or a LoRA adapter folder of one.

    An adapter is merged into its base after loading: the scores are the same (up to float rounding)
    and a merged model scores faster than one with adapters beside every linear layer.
    """
    folder = Path(folder)
    adapter = folder / ADAPTER_CONFIG
    try:
        if adapter.is_file():
            from peft import PeftModel

            base = base or json.loads(adapter.read_text())["base_model_name_or_path"]
            model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
            model = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
        else:
            model = AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=1)
        has_tokenizer = (folder / "tokenizer_config.json").is_file()
        tokenizer = AutoTokenizer.from_pretrained(str(folder) if has_tokenizer else base or str(folder))
    except (OSError, ValueError, KeyError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RewardError(f"reward model '{folder}' cannot be loaded: {first_line}") from exc
    # A missing pad token becomes the eos token, as for the policy (ensure_pad_token in rl_lora/models/loading.py,
    # not imported: rewards do not depend on the library).
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise RewardError(f"reward model '{folder}': its tokenizer has neither a pad nor an eos token")
        warnings.warn(f"tokenizer of reward model '{folder}' has no pad token; using its eos token", stacklevel=2)
        tokenizer.pad_token = tokenizer.eos_token
    # The classifier reads the last non-pad token, so the model must know which id is padding.
    model.config.pad_token_id = tokenizer.pad_token_id
    if torch.cuda.is_available():
        model = model.to("cuda")
    return model.eval(), tokenizer


@functools.lru_cache(maxsize=4)
def _cached_reward_model(folder: str, base: str | None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    # One copy per (folder, base) per process: the pre-run check and the trainer share it.
    return load_reward_model(folder, base)


class LearnedReward:
    """A reward plug-in backed by a reward model, loaded on ``load()`` or at the first call.

    Options (a recipe's ``kwargs``): ``base``, the base model folder of an adapter when its
    ``adapter_config.json`` points elsewhere; ``batch_size``, texts per forward pass (default 64).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).expanduser().resolve()
        self.__name__ = f"learned:{folder}"
        if not self.folder.is_dir():
            raise RewardError(f"reward '{self.__name__}': folder '{self.folder}' does not exist")
        if not (self.folder / ADAPTER_CONFIG).is_file() and not (self.folder / "config.json").is_file():
            raise RewardError(
                f"reward '{self.__name__}': '{self.folder}' holds neither a model (config.json) "
                f"nor a LoRA adapter ({ADAPTER_CONFIG})"
            )

    def load(self, base: str | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        return _cached_reward_model(str(self.folder), base)

    def __call__(
        self, prompts: list[Any], completions: list[Any], base: str | None = None, batch_size: int = 64, **_: Any
    ) -> list[float]:
        model, tokenizer = self.load(base)
        return score_texts(model, tokenizer, prompts, completions, batch_size)
