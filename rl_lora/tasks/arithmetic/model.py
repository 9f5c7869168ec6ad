"""The embedded default model: a tiny Llama with a character tokenizer, warmed up on the built-in task.

The default build (the warm-up length and data the shipped recipes use) ships with the package as an
ordinary transformers folder (safetensors + tokenizer + build.json), so every machine starts from the
same weights: a warm-up run locally depends on the CPU's floating-point kernels (docs/reproducibility.md).
It is copied into the rl-lora cache on first use, its sha256 checked, because the DPO and reward recipes
cache their sampled pairs beside the model. Any other warm-up length or data range is built locally,
deterministically for a given CPU, and cached under a key that covers the architecture, the tokenizer,
the warm-up length and the data split.

    python -m rl_lora.tasks.arithmetic.model --rebuild        # rebuild the shipped model here and compare
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from rl_lora.config.schema import DataSpec
from rl_lora.tasks.arithmetic import problems as arithmetic
from rl_lora.tasks.arithmetic.shipped import NAMES as BUILTIN_NAMES
from rl_lora.tasks.arithmetic.shipped import PREFIX as BUILTIN_PREFIX
from rl_lora.tasks.arithmetic.shipped import SHIPPED_ROOT
from rl_lora.tasks.arithmetic.tokenizer import CHARS, SPECIALS, build_char_tokenizer
from rl_lora.tasks.arithmetic.warmup import supervised_warmup
from rl_lora.utils.errors import ModelError
from rl_lora.utils.files import build_folder_atomically, cache_root, sha256_file

BUILD_VERSION = 1  # bump when the build procedure changes
BUILD_DATA_FIELDS = ("task", "min_operand", "max_operand", "eval_size", "split_seed")
WEIGHTS = "model.safetensors"


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


def build_key(name: str, warmup_steps: int, data: DataSpec) -> str:
    """12 hex digits naming one build: architecture version, vocabulary, warm-up length, data split."""
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


def shipped_build(name: str) -> dict | None:
    """The shipped build's build.json (with its key and weights' sha256), or None if none ships."""
    info = SHIPPED_ROOT / name / "build.json"
    return json.loads(info.read_text()) if info.is_file() else None


def builtin_path(name: str, warmup_steps: int, data: DataSpec, progress: bool = True) -> Path:
    """The folder of the built-in model: the shipped build when the recipe asks for it, else a local build."""
    if name not in BUILTIN_NAMES:
        raise ModelError(f"unknown built-in model '{BUILTIN_PREFIX}{name}' (known: {', '.join(BUILTIN_NAMES)})")
    key = build_key(name, warmup_steps, data)
    shipped = shipped_build(name)
    if shipped is not None and shipped["key"] == key:
        return _shipped_copy(name, shipped)
    target = cache_root() / "builtin" / f"{name}-w{warmup_steps}-{key}"
    if (target / "build.json").is_file():
        return target
    build_folder_atomically(target, lambda staging: _build_locally(staging, name, warmup_steps, data, progress),
                            done=lambda folder: (folder / "build.json").is_file())
    return target


def _build_locally(folder: Path, name: str, warmup_steps: int, data: DataSpec, progress: bool) -> None:
    build(folder, warmup_steps, data, progress)
    shipped = shipped_build(name)
    default = f"warmup_steps {shipped['warmup_steps']} and the default data range" if shipped else "none ships"
    print(f"rl-lora: built {BUILTIN_PREFIX}{name} locally (warmup_steps {warmup_steps}): locally built weights "
          f"depend on this CPU's floating-point kernels (torch {torch.backends.cpu.get_cpu_capability()}); "
          f"the shipped build ({default}) is the same everywhere", file=sys.stderr, flush=True)


def _shipped_copy(name: str, shipped: dict) -> Path:
    """The shipped build, copied once into the cache and its weights' sha256 checked on every use."""
    source = SHIPPED_ROOT / name
    if sha256_file(source / WEIGHTS) != shipped["sha256"]:
        raise ModelError(f"the shipped weights of {BUILTIN_PREFIX}{name} ({source / WEIGHTS}) do not match the "
                         f"sha256 in its build.json; reinstall rl-lora")
    target = cache_root() / "builtin" / f"{name}-shipped-{shipped['sha256'][:12]}"
    if not _intact(target, shipped["sha256"]):
        build_folder_atomically(target, lambda staging: shutil.copytree(source, staging, dirs_exist_ok=True),
                                done=lambda folder: _intact(folder, shipped["sha256"]))
    return target


def _intact(folder: Path, sha256: str) -> bool:
    """Whether ``folder`` is a complete copy of the shipped build (a damaged copy is replaced, never used)."""
    return (folder / "build.json").is_file() and sha256_file(folder / WEIGHTS) == sha256


def build(folder: Path, warmup_steps: int, data: DataSpec, progress: bool) -> dict:
    """Warm the built-in model up from seed 0 and save it into ``folder``; returns its build.json."""
    tokenizer = build_char_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(builtin_config())
    train, held_out = arithmetic.split(data)
    started = time.perf_counter()
    losses = supervised_warmup(model, tokenizer, train, warmup_steps, progress=progress) if warmup_steps else []
    answer_tokens = len(str(2 * data.max_operand)) + 1
    accuracy = arithmetic.exact_answer_accuracy(model, tokenizer, held_out, answer_tokens)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    info = {
        "key": build_key(BUILTIN_NAMES[0], warmup_steps, data),
        "warmup_steps": warmup_steps,
        "data": data.model_dump(include=set(BUILD_DATA_FIELDS)),
        "final_loss": losses[-1] if losses else None,
        "held_out_accuracy": accuracy,
        "seconds": round(time.perf_counter() - started, 2),
        "parameters": sum(p.numel() for p in model.parameters()),
        "sha256": sha256_file(folder / WEIGHTS),
        # What the weights depend on besides the code: a rebuild matches bit for bit only on the same kernels.
        "built_with": {"torch": torch.__version__, "transformers": transformers.__version__,
                       "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
                       "machine": platform.machine()},
    }
    (folder / "build.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def _rebuild(warmup_steps: int | None, write: bool) -> int:
    """Rebuild the shipped model here and compare it with the shipped one; ``write`` replaces the shipped folder."""
    name = BUILTIN_NAMES[0]
    shipped = shipped_build(name)
    if warmup_steps is not None:
        steps = warmup_steps
    elif shipped is not None:
        steps = shipped["warmup_steps"]
    else:
        raise SystemExit("no shipped build to rebuild: give --warmup-steps")
    data = DataSpec(**shipped["data"]) if shipped else DataSpec()
    folder = Path(tempfile.mkdtemp(prefix=f"{name}-rebuild-"))
    info = build(folder, steps, data, progress=True)
    print(f"rebuilt in {folder}: warmup_steps {steps}, loss {info['final_loss']:.4f}, held-out accuracy "
          f"{info['held_out_accuracy']:.3f}, sha256 {info['sha256'][:12]} ({info['built_with']})")
    if shipped:
        same = "identical to" if info["sha256"] == shipped["sha256"] else "different from"
        print(f"shipped: warmup_steps {shipped['warmup_steps']}, loss {shipped['final_loss']:.4f}, held-out accuracy "
              f"{shipped['held_out_accuracy']:.3f}, sha256 {shipped['sha256'][:12]} ({shipped['built_with']}): "
              f"the rebuild is {same} the shipped weights")
    if write:
        shutil.rmtree(SHIPPED_ROOT / name, ignore_errors=True)
        shutil.copytree(folder, SHIPPED_ROOT / name)
        (SHIPPED_ROOT / name).chmod(0o755)  # mkdtemp's 0700 and safetensors' 0600 are not for package data
        for file in (SHIPPED_ROOT / name).iterdir():
            file.chmod(0o644)
        print(f"wrote {SHIPPED_ROOT / name}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Rebuild the shipped built-in model and compare it.")
    parser.add_argument("--rebuild", action="store_true", required=True)
    parser.add_argument("--warmup-steps", type=int, default=None, help="default: the shipped build's")
    parser.add_argument("--write", action="store_true", help="replace the shipped weights with the rebuild")
    args = parser.parse_args()
    sys.exit(_rebuild(args.warmup_steps, args.write))
