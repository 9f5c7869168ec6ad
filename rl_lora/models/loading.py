"""Loading the policy a recipe names: the built-in default, a local folder, a GGUF file or package, or a hub id.

Every form ends as a folder (or hub id) that ``from_pretrained`` loads: the built-in model and GGUF
models are built or dequantised once into the rl-lora cache (rl_lora/tasks/arithmetic/model.py, gguf.py).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rl_lora.config.schema import DataSpec, ModelSpec
from rl_lora.models.gguf import cached_copy, require_gguf_reader, resolve_gguf
from rl_lora.models.policies import classify
from rl_lora.utils.errors import ConfigError, ModelError, first_line

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_policy_path(spec: ModelSpec, data: DataSpec, progress: bool = True) -> str:
    """A path or hub id ``from_pretrained`` can load; builds the built-in model or dequantises a GGUF
    model on first use (both cached)."""
    policy = classify(spec.policy)
    if policy.source is not None:
        return str(policy.source.folder(policy.name, spec, data, progress))
    if policy.form == "gguf":
        return str(resolve_gguf(spec.policy, progress=progress))
    return spec.policy


def check_policy(spec: ModelSpec) -> None:
    """Fail before any run folder or model exists when a GGUF policy's file, package or reader is missing."""
    if classify(spec.policy).form == "gguf" and cached_copy(spec.policy) is None:  # cached_copy locates the file
        require_gguf_reader(spec.policy)


def load_policy(
    spec: ModelSpec, data: DataSpec, progress: bool = True
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """(model, tokenizer, source) for the recipe's policy, with a usable pad token."""
    source = resolve_policy_path(spec, data, progress)
    if Path(source).exists() and not Path(source).is_dir():
        raise ModelError(f"model.policy '{source}' is a file; expected a model folder, a .gguf file or a hub id")
    tokenizer = load_tokenizer(spec, source)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=_DTYPES[spec.dtype], trust_remote_code=spec.trust_remote_code, **quantization_kwargs(spec)
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.policy '{spec.policy}' cannot be loaded: {first_line(exc)}") from exc
    if spec.quantization != "none":
        keep_4bit_layers_differentiable(model)
    return model, tokenizer, source


def keep_4bit_layers_differentiable(model: PreTrainedModel) -> int:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference; returns the number of 4-bit layers.

    On a CPU with AVX512-BF16, bitsandbytes 0.50's Linear4bit repacks its weight on the first no-grad
    eval forward (a rollout, a held-out evaluation) and from then on multiplies with ``gemv_4bit``, which
    has no autograd kernel: gradients stop flowing through the frozen base into earlier layers' adapters,
    with only a UserWarning ("an autograd kernel was not registered"). Without the repacking every
    forward dequantises and multiplies through bitsandbytes' differentiable MatMul4Bit.
    """
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    for layer in layers:
        # bitsandbytes' flag, a plain attribute; torch types nn.Module.__setattr__ for tensors and modules only
        layer.support_avx512bf16_for_cpu = False  # type: ignore[assignment]
    return len(layers)


def quantization_kwargs(spec: ModelSpec) -> dict[str, Any]:
    """``from_pretrained`` keywords for ``model.quantization``: none, or a 4-bit NF4 base (QLoRA).

    NF4 (Dettmers et al. 2023, QLoRA) stores the linear layers' weights in 4 bits with one absmax per
    64 weights; matrix products run in ``bnb_4bit_compute_dtype``. fp32 on CPU, where bf16 autocast is
    refused and a bf16 base ran ~19x slower, else the recipe's dtype.
    Embeddings, norms and the output head stay in ``model.dtype``; the LoRA adapters PEFT adds stay fp32.
    """
    if spec.quantization == "none":
        return {}
    try:
        import bitsandbytes  # noqa: F401  (transformers needs it; the error below says how to get it)
    except ImportError as exc:
        raise ConfigError(
            f"model.quantization {spec.quantization} needs bitsandbytes: pip install 'rl-lora[qlora]' "
            "(or pip install bitsandbytes), or set model.quantization: none"
        ) from exc
    on_gpu = torch.cuda.is_available()
    compute = _DTYPES[spec.dtype] if on_gpu else torch.float32
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
    # bitsandbytes >= 0.45 quantises on CPU too; device_map places the 4-bit weights where they will run.
    return {"quantization_config": config, "device_map": "cuda:0" if on_gpu else "cpu"}


def load_tokenizer(spec: ModelSpec, source: str) -> PreTrainedTokenizerBase:
    """The tokenizer at ``source``, with a pad token (its eos token when it has none)."""
    return ensure_pad_token(_read_tokenizer(spec, source), f"'{spec.policy}'")


def _read_tokenizer(spec: ModelSpec, source: str) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.policy '{spec.policy}' cannot be loaded: {first_line(exc)}") from exc


def policy_tokenizer_and_context(spec: ModelSpec) -> tuple[PreTrainedTokenizerBase, int | None] | None:
    """The policy's tokenizer and context length (max_position_embeddings), read without building, loading
    or dequantising any weights: for checks of the data that run before the model loads.

    None for a GGUF policy, whose tokenizer lives inside the weights file.
    """
    policy = classify(spec.policy)
    if policy.source is not None:
        return policy.source.tokenizer(policy.name), policy.source.config(policy.name).max_position_embeddings
    if policy.form in ("gguf", "file"):
        return None  # a GGUF policy; a plain file is refused with a clear error when the model loads
    tokenizer = _read_tokenizer(spec, spec.policy)
    try:
        config = AutoConfig.from_pretrained(spec.policy, trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError):
        return tokenizer, None  # the model load names the problem
    return tokenizer, getattr(config.get_text_config(), "max_position_embeddings", None)


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase, owner: str) -> PreTrainedTokenizerBase:
    """Give a tokenizer without a pad token its eos token as pad (with a warning naming ``owner``).

    Generation masks everything after the first EOS and classifiers read the last non-pad token, so
    pad = EOS is safe for rollouts and reward scoring; a tokenizer with neither is refused.
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"tokenizer of {owner} has neither a pad nor an eos token")
        warnings.warn(f"tokenizer of {owner} has no pad token; using its eos token", stacklevel=3)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_reward_backbone(spec: ModelSpec, source: str, pad_token_id: int) -> PreTrainedModel:
    """The policy's architecture with a one-logit head (``num_labels=1``), its body from ``source``.

    The head (``score``) is not in a causal-LM checkpoint and starts random: seed before calling.
    """
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=1, dtype=_DTYPES[spec.dtype], trust_remote_code=spec.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.policy '{spec.policy}' cannot be loaded as a reward model: "
                         f"{first_line(exc)}") from exc
    # The head reads the last non-pad token, so the model must know the pad id.
    model.config.pad_token_id = pad_token_id
    return model
