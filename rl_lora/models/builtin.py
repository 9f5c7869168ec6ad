"""The embedded default model: a tiny Llama with a character tokenizer, warmed up and cached.

Built deterministically the first time a recipe asks for it (about half a minute on 2 CPU cores),
saved as an ordinary transformers folder (safetensors + tokenizer) and reused afterwards, so it
loads through the same ``from_pretrained`` path as any local model. The cache key covers the
architecture, the tokenizer, the warm-up length and the data split, so changing any of them builds
a new copy instead of reusing a stale one.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rl_lora.config import DataSpec
from rl_lora.files import build_folder_atomically
from rl_lora.models.tokenizer import CHARS, SPECIALS, build_char_tokenizer
from rl_lora.tasks import arithmetic
from rl_lora.warmup import supervised_warmup

BUILTIN_PREFIX = "builtin:"
BUILTIN_NAMES = ("arithmetic-tiny",)
BUILD_VERSION = 1  # bump when the build procedure changes
BUILD_DATA_FIELDS = ("task", "min_operand", "max_operand", "eval_size", "split_seed")


def tiny_llama_config(vocab_size: int, pad: int, bos: int, eos: int) -> LlamaConfig:
    """hidden 128, 4 layers, MLP 384: ~0.86M parameters, a few ms per forward pass on CPU."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        pad_token_id=pad,
        bos_token_id=bos,
        eos_token_id=eos,
    )


def builtin_config() -> LlamaConfig:
    """The built-in model's config, with the built-in tokenizer's vocabulary and special tokens."""
    tok = build_char_tokenizer()
    return tiny_llama_config(len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)


def cache_root() -> Path:
    return Path(os.environ.get("RL_LORA_CACHE", Path.home() / ".cache" / "rl-lora"))


def _build_key(name: str, warmup_steps: int, data: DataSpec) -> str:
    payload = {
        "name": name,
        "version": BUILD_VERSION,
        "vocab": SPECIALS + CHARS,
        "warmup_steps": warmup_steps,
        # Only the fields that shape the build: keys added to DataSpec later (preference files, ...)
        # must not invalidate every cached model.
        "data": data.model_dump(include=set(BUILD_DATA_FIELDS)),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def builtin_path(name: str, warmup_steps: int, data: DataSpec, progress: bool = True) -> Path:
    """The folder of the built-in model, building and caching it first if needed."""
    if name not in BUILTIN_NAMES:
        from rl_lora.errors import ModelError

        raise ModelError(f"unknown built-in model '{BUILTIN_PREFIX}{name}' (known: {', '.join(BUILTIN_NAMES)})")
    target = cache_root() / "builtin" / f"{name}-w{warmup_steps}-{_build_key(name, warmup_steps, data)}"
    if (target / "build.json").is_file():
        return target
    return build_folder_atomically(target, lambda staging: _build(staging, warmup_steps, data, progress))


def _build(folder: Path, warmup_steps: int, data: DataSpec, progress: bool) -> None:
    tokenizer = build_char_tokenizer()
    config = builtin_config()
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    train, held_out = arithmetic.split(data)
    started = time.perf_counter()
    losses = supervised_warmup(model, tokenizer, train, warmup_steps, progress=progress) if warmup_steps else []
    answer_tokens = len(str(2 * data.max_operand)) + 1
    accuracy = arithmetic.exact_answer_accuracy(model, tokenizer, held_out, answer_tokens)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    info = {
        "warmup_steps": warmup_steps,
        "final_loss": losses[-1] if losses else None,
        "held_out_accuracy": accuracy,
        "seconds": round(time.perf_counter() - started, 2),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    (folder / "build.json").write_text(json.dumps(info, indent=2))
