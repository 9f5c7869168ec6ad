"""The bad-input corpus: every way a user's input can be wrong, through the command line.

Each case runs ``rl-lora run`` (the CLI's ``main``, in this process: the same code path as the console
command, without a new interpreter per case) and must end with exit code 2, exactly one
``rl-lora: error:`` line naming the offending key, file, row or function, no traceback, and an earlier
run folder in the same ``logging.output_dir`` byte for byte as it was. Cases marked ``early`` must
fail before any model loads and before a run folder exists. Other test files check some of these
cases at the function level; this table is the user's view of all of them in one place
(docs/reliability.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from rl_lora.cli import main
from rl_lora.training import checkpoint
from tests_support import save_tiny_moe, tiny_raw

REPO = Path(__file__).resolve().parent.parent

ROOT = os.geteuid() == 0  # root reads and writes whatever the permission bits say


@dataclass
class Case:
    """``setup(tmp)`` writes what the case needs and returns (recipe mapping, overrides)."""

    id: str
    setup: Callable[[Path], tuple[dict, list[str]]]
    expect: list[str]  # substrings of the error line ("{tmp}" is replaced by the case's folder)
    early: bool = True  # fails before any model loads
    marks: list = field(default_factory=list)


def grpo(tmp: Path, **sections: dict) -> dict:
    raw = tiny_raw(tmp / "runs", train={"steps": 2, "threads": 1})
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def preference(tmp: Path, algorithm: str, rows: list | bytes | None, name: str = "prefs.jsonl",
               **sections: dict) -> dict:
    """A DPO / reward recipe reading ``name`` (written from ``rows`` unless None: then it is missing)."""
    raw = tiny_raw(tmp / "runs", data={"max_operand": 30, "eval_size": 20},
                   train={"steps": 2, "batch_size": 4, "threads": 1})
    raw = {k: v for k, v in raw.items() if k not in ("grpo", "reward")} | {"algorithm": algorithm}
    path = tmp / name
    if isinstance(rows, bytes):
        path.write_bytes(rows)
    elif rows is not None:
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    raw["data"]["preferences"] = str(path)
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


GOOD = [{"prompt": f"{a}+{a}=", "chosen": str(2 * a), "rejected": str(2 * a + 1)} for a in range(10, 20)]


def reward_file(tmp: Path, body: str) -> str:
    """A reward plug-in file ``rewards.py`` whose function ``score`` returns ``body``."""
    (tmp / "rewards.py").write_text(f"def score(prompts, completions, **kw):\n    return {body}\n")
    return f"{tmp / 'rewards.py'}:score"


def unreadable(tmp: Path) -> tuple[dict, list[str]]:
    raw = preference(tmp, "dpo", GOOD)
    (tmp / "prefs.jsonl").chmod(0)
    return raw, []


def read_only_output(tmp: Path) -> tuple[dict, list[str]]:
    (tmp / "locked").mkdir()
    (tmp / "locked").chmod(0o555)
    return grpo(tmp), [f"logging.output_dir={tmp / 'locked' / 'runs'}"]


def file_in_the_way(tmp: Path) -> tuple[dict, list[str]]:
    (tmp / "not-a-folder").write_text("x")
    return grpo(tmp), [f"logging.output_dir={tmp / 'not-a-folder' / 'runs'}"]


LONG_PROMPT = "1+" * 40 + "1="  # 82 characters: past the built-in model's 64-token context
PROMPTS = [{"prompt": f"{a}+{a}=", "answer": str(2 * a)} for a in range(10, 30)]
USER = [{"role": "user", "content": "1+1="}]
CHAT_PAIRS = [{"prompt": USER, "chosen": [{"role": "assistant", "content": "2"}],
               "rejected": [{"role": "assistant", "content": "3"}]}] * 10


def prompts(tmp: Path, rows: list | bytes, name: str = "prompts.jsonl", reward: str = "exact_answer",
            **data: object) -> dict:
    """A GRPO recipe on a dataset task reading ``name`` (written from ``rows``)."""
    path = tmp / name
    if isinstance(rows, bytes):
        path.write_bytes(rows)
    else:
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    raw = grpo(tmp, reward={"functions": [{"name": reward}]})
    raw["data"] = {"task": "dataset", "source": str(path), **data}
    return raw


def offline_hub(tmp: Path) -> tuple[dict, list[str]]:
    """A hub dataset name on a machine without the hub (made offline here so the case does not wait on retries)."""
    import datasets.config
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    raw = prompts(tmp, PROMPTS)
    raw["data"]["source"] = "openai/gsm8k"
    raw["data"]["subset"] = "main"
    return raw, []

CASES = [
    Case("unknown-key", lambda t: (grpo(t), ["lora.rnak=2"]), ["unknown key 'lora.rnak'", "did you mean 'lora.rank'"]),
    Case("unknown-key-in-file", lambda t: (grpo(t, train={"stpes": 3}), []), ["unknown key 'train.stpes'"]),
    Case("wrong-type", lambda t: (grpo(t), ["train.steps=abc"]), ["'train.steps'", "valid integer"]),
    Case("wrong-type-in-file", lambda t: (grpo(t, train={"lr": "fast"}), []), ["'train.lr'", "valid number"]),
    Case("trl-option-misspelt", lambda t: (grpo(t, trl={"gradient_checkpointin": True}), []),
         ["trl.gradient_checkpointin: not an option of TRL's GRPOConfig; did you mean 'trl.gradient_checkpointing'?"]),
    Case("trl-option-rl-lora-sets", lambda t: (grpo(t, trl={"learning_rate": 0.1}), []),
         ["trl.learning_rate: rl-lora sets it from the recipe's train.lr: set that instead"]),
    Case("unknown-reward", lambda t: (grpo(t, reward={"functions": [{"name": "no_such_pkg_q:f"}]}), []),
         ["reward 'no_such_pkg_q:f'", "cannot import module"]),
    Case("missing-dataset", lambda t: (preference(t, "dpo", None), []), ["dataset '{tmp}/prefs.jsonl' does not exist"]),
    Case("dataset-is-a-folder", lambda t: (preference(t, "dpo", None, name="folder.jsonl"), ["data.preferences={t}"]),
         ["dataset '{tmp}' is a folder, not a file"]),
    Case("unreadable-dataset", unreadable, ["dataset '{tmp}/prefs.jsonl' cannot be read (Permission denied)"],
         marks=[pytest.mark.skipif(ROOT, reason="root reads a chmod 000 file")]),
    Case("dataset-not-utf8", lambda t: (preference(t, "dpo", b"\xff\xfe{}\n"), []),
         ["dataset '{tmp}/prefs.jsonl' cannot be read: not UTF-8 text (byte 0xff at offset 0)"]),
    Case("malformed-jsonl-row", lambda t: (preference(t, "dpo", [*GOOD[:2], '{"prompt": "1+1=", "chosen"']), []),
         ["dataset '{tmp}/prefs.jsonl' row 3: not valid JSON"]),
    Case("empty-row", lambda t: (preference(t, "dpo", [GOOD[0], {}]), []),
         ["dataset '{tmp}/prefs.jsonl' row 2: field 'chosen' is missing"]),
    Case("empty-field", lambda t: (preference(t, "reward", [GOOD[0], {**GOOD[1], "rejected": "  "}]), []),
         ["dataset '{tmp}/prefs.jsonl' row 2: field 'rejected' is empty"]),
    Case("row-not-an-object", lambda t: (preference(t, "dpo", [GOOD[0], "[1, 2]"]), []),
         ["dataset '{tmp}/prefs.jsonl' row 2: expected an object"]),
    Case("empty-dataset", lambda t: (preference(t, "dpo", []), []), ["dataset '{tmp}/prefs.jsonl' has no rows"]),
    # Several bad rows: all of them in one message, in file order, a JSON syntax error among them.
    Case("several-bad-rows", lambda t: (preference(t, "dpo", [GOOD[0], {**GOOD[1], "chosen": ""}, GOOD[2],
                                                              '{"prompt": "1+1=", "chosen"', {"chosen": "2"}]), []),
         ["3 bad rows: dataset '{tmp}/prefs.jsonl' row 2: field 'chosen' is empty; dataset '{tmp}/prefs.jsonl' "
          "row 4: not valid JSON", "; dataset '{tmp}/prefs.jsonl' row 5: field 'rejected' is missing"]),
    Case("prompt-past-model-context",
         lambda t: (preference(t, "dpo", [GOOD[0], {**GOOD[1], "prompt": LONG_PROMPT}]), []),
         ["dataset '{tmp}/prefs.jsonl' row 2: field 'prompt' is",
          "not under the context of model 'builtin:arithmetic-tiny' (64)"]),
    Case("prompt-past-max-length",
         lambda t: (preference(t, "reward", [*GOOD[:3], {**GOOD[3], "prompt": "12+13+14+15="}],
                               reward_model={"max_length": 10}), []),
         ["dataset '{tmp}/prefs.jsonl' row 4: field 'prompt' is", "not under reward_model.max_length (10)"]),
    # A dataset task's prompts (data.task: dataset): refused before any model loads.
    Case("prompts-no-prompt-column", lambda t: (prompts(t, [{"question": "1+1=", "answer": "2"}]), []),
         ["dataset '{tmp}/prompts.jsonl' row 1: no 'prompt' column (columns: 'question', 'answer')",
          "data.prompt_column"]),
    Case("prompts-empty-file", lambda t: (prompts(t, []), []), ["dataset '{tmp}/prompts.jsonl' has no rows"]),
    Case("prompts-several-bad-rows", lambda t: (prompts(t, [PROMPTS[0], {"prompt": " ", "answer": "1"}, "[1]",
                                                          '{"prompt": ', PROMPTS[1]]), []),
         ["3 bad rows: dataset '{tmp}/prompts.jsonl' row 2: field 'prompt' is empty; dataset '{tmp}/prompts.jsonl' "
          "row 3: expected an object", "row 4: not valid JSON"]),
    Case("prompts-mixed-formats", lambda t: (prompts(t, [*PROMPTS[:3], {"prompt": USER, "answer": "2"}]), []),
         ["dataset '{tmp}/prompts.jsonl' row 4: field 'prompt' is a list of messages but earlier rows' are a string"]),
    Case("prompts-bad-role", lambda t: (prompts(t, [{"prompt": [{"role": "robot", "content": "hi"}], "answer": "2"}]),
                                        []),
         ["dataset '{tmp}/prompts.jsonl' row 1: field 'prompt': message 1 has role 'robot'"]),
    Case("prompts-no-content", lambda t: (prompts(t, [{"prompt": [{"role": "user"}], "answer": "2"}]), []),
         ["dataset '{tmp}/prompts.jsonl' row 1: field 'prompt': message 1 has an empty or missing 'content'"]),
    Case("prompts-chat-without-template", lambda t: (prompts(t, [{"prompt": USER, "answer": "2"}] * 10), []),
         ["dataset '{tmp}/prompts.jsonl' is conversational", "'builtin:arithmetic-tiny' has no chat template",
          "use a chat/instruct model, or give the prompts as plain strings"]),
    Case("preferences-chat-without-template", lambda t: (preference(t, "dpo", CHAT_PAIRS), []),
         ["dataset '{tmp}/prefs.jsonl' is conversational", "'builtin:arithmetic-tiny' has no chat template"]),
    Case("prompts-reward-needs-missing-column",
         lambda t: (prompts(t, [{"prompt": "1+1=", "solution": "2"}] * 10), []),
         ["reward 'exact_answer' needs column 'answer', which dataset '{tmp}/prompts.jsonl' does not have "
          "(its columns: solution)"]),
    Case("prompts-no-held-out-rows", lambda t: (prompts(t, PROMPTS, eval_fraction=0.01), []),
         ["dataset '{tmp}/prompts.jsonl': data.eval_fraction 0.01 of 20 rows leaves 0 held-out and 20 training rows"]),
    Case("prompts-no-training-rows", lambda t: (prompts(t, PROMPTS[:1], eval_fraction=0.9), []),
         ["data.eval_fraction 0.9 of 1 rows leaves 1 held-out and 0 training rows"]),
    Case("prompts-not-utf8", lambda t: (prompts(t, b"\x80abc\n"), []),
         ["dataset '{tmp}/prompts.jsonl' cannot be read: not UTF-8 text (byte 0x80 at offset 0)"]),
    Case("prompts-hub-name-offline", offline_hub,
         ["dataset 'openai/gsm8k' is not a local file or folder, and loading it from the hub failed",
          "needs the hub"]),
    Case("output-dir-read-only", read_only_output, ["logging.output_dir '{tmp}/locked/runs'", "Permission denied"],
         marks=[pytest.mark.skipif(ROOT, reason="root writes into a read-only folder")]),
    Case("output-dir-under-a-file", file_in_the_way,
         ["logging.output_dir '{tmp}/not-a-folder/runs'", "'{tmp}/not-a-folder' is a file, not a folder"]),
    # Adapter types (lora.adapter): the type and its options with the recipe, what PEFT cannot put on the model
    # before it loads (docs/adapters.md).
    Case("adapter-type-unknown", lambda t: (grpo(t), ["lora.adapter=vrea"]),
         ["'lora.adapter': not an adapter type rl-lora wires; did you mean 'vera'?"]),
    Case("adapter-option-misspelt", lambda t: (grpo(t, lora={"adapter": "tinylora",
                                                             "adapter_options": {"weight_tyng": 1.0}}), []),
         ["lora.adapter_options.weight_tyng: not an option of PEFT's TinyLoraConfig (lora.adapter: tinylora); "
          "did you mean 'lora.adapter_options.weight_tying'?"]),
    Case("adapter-option-rl-lora-sets", lambda t: (grpo(t, lora={"adapter": "vera", "adapter_options": {"r": 8}}), []),
         ["lora.adapter_options.r: rl-lora sets it from lora.rank: set that instead"]),
    Case("adapter-on-a-4-bit-base", lambda t: (grpo(t, lora={"adapter": "tinylora"},
                                                    model={"quantization": "nf4"}), []),
         ["model.quantization nf4: PEFT 0.21.2 cannot put lora.adapter tinylora on a 4-bit base"]),
    Case("adapter-on-fused-moe-experts", lambda t: (grpo(t, lora={"adapter": "vera"},
                                                         model={"policy": str(save_tiny_moe(t / "moe"))}), []),
         ["lora.adapter vera: PEFT 0.21.2 cannot put it on fused MoE experts", "lora.targets: attention"]),
    # Rewards fail during the first rollout, after the model loads: named with the function and the step.
    Case("reward-raises", lambda t: (grpo(t, reward={"functions": [{"name": reward_file(t, "1 / 0")}]}), []),
         ["reward '{tmp}/rewards.py:score' raised at step 0", "ZeroDivisionError"], early=False),
    Case("reward-wrong-length", lambda t: (grpo(t, reward={"functions": [{"name": reward_file(t, "[1.0]")}]}), []),
         ["reward '{tmp}/rewards.py:score' at step 0 returned 1 scores for 16 completions"], early=False),
    Case("reward-nan", lambda t: (grpo(t, reward={"functions": [{"name": reward_file(
        t, "[float('nan')] + [0.0] * (len(completions) - 1)")}]}), []),
         ["reward '{tmp}/rewards.py:score' at step 0 sample 0: score is nan (not finite)"], early=False),
    Case("reward-none-for-all", lambda t: (grpo(t, reward={"functions": [{"name": reward_file(
        t, "[None] * len(completions)")}]}), []),
         ["reward '{tmp}/rewards.py:score' at step 0 returned None for every one of 16 completions"], early=False),
]


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _earlier_run(runs: Path) -> Path:
    """A finished run's folder (config, metrics, summary, adapter, a sealed checkpoint) that no case may touch."""
    run = runs / "earlier"
    (run / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text("name: earlier\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    (run / "summary.json").write_text('{"steps": 1}\n')
    (run / "adapter" / "adapter_model.safetensors").write_bytes(os.urandom(256))
    staging = runs / "staging"  # sealing moves it into checkpoints/
    staging.mkdir()
    (staging / "adapter_model.safetensors").write_bytes(os.urandom(128))
    checkpoint.seal(staging, run / "checkpoints", 2, {"config_hash": "x"})
    return run


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input_fails_in_one_line_and_leaves_earlier_runs_alone(
    case: Case, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    earlier = _earlier_run(tmp_path / "runs")
    before = _hashes(earlier)
    raw, overrides = case.setup(tmp_path)
    overrides = [o.replace("{t}", str(tmp_path)) for o in overrides]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(raw))  # JSON is YAML
    threads = torch.get_num_threads()
    try:
        code = main(["run", str(recipe), *overrides])
    finally:
        torch.set_num_threads(threads)  # train.threads is process-wide
        for locked in (tmp_path / "locked", tmp_path / "prefs.jsonl"):
            if locked.exists() and not locked.is_dir():
                locked.chmod(0o644)
            elif locked.exists():
                locked.chmod(0o755)
    err = capsys.readouterr().err

    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("rl-lora: error:")]
    assert len(errors) == 1, err
    for expected in case.expect:
        assert expected.replace("{tmp}", str(tmp_path)) in errors[0], (expected, errors[0])
    if case.early:  # no run folder made, no model loaded
        assert "rl-lora: run folder" not in err and "trainable params" not in err, err
        assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["earlier"]
    assert _hashes(earlier) == before


def test_conversational_pairs_without_a_chat_template_are_refused_before_the_heavy_imports(tmp_path: Path) -> None:
    """As fast as the other refusals of bad rows (bench/bad_input_latency.py): the precheck refuses from the
    policy's tokenizer files, in a process that has imported neither torch nor transformers."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(preference(tmp_path, "dpo", CHAT_PAIRS)))
    script = ("import sys\nfrom rl_lora.cli import main\ncode = main(['run', sys.argv[1]])\n"
              "print(code, [m for m in ('torch', 'transformers', 'trl') if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", script, str(recipe)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.stdout.split("\n")[-2] == "2 []", proc.stdout + proc.stderr
    assert "'builtin:arithmetic-tiny' has no chat template" in proc.stderr


# -- a tokenizer without a pad token: handled, not refused --------------------------------------
# rl_lora/models/loading.py gives it its EOS token as pad, with a warning naming the model. What a user
# expects: most base-model tokenizers (Llama, Mistral) ship without one, and TRL pads with it only where
# a mask says which positions are real. The risk with pad = EOS is a mask computed from "id == pad",
# which would cut the EOS itself and the model would never learn to stop: checked below for GRPO.


@pytest.fixture(scope="module")
def no_pad_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init built-in-shaped model whose tokenizer has no pad token."""
    from transformers import LlamaForCausalLM

    from rl_lora.tasks.arithmetic.model import builtin_config
    from rl_lora.tasks.arithmetic.tokenizer import build_char_tokenizer

    folder = tmp_path_factory.mktemp("no-pad")
    tokenizer = build_char_tokenizer()
    tokenizer.pad_token = None
    torch.manual_seed(0)
    LlamaForCausalLM(builtin_config()).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_tokenizer_without_pad_token_trains_with_eos_as_pad_and_a_warning(
    no_pad_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(grpo(tmp_path, model={"policy": str(no_pad_model)})))
    threads = torch.get_num_threads()
    try:
        with pytest.warns(UserWarning, match=f"tokenizer of '{no_pad_model}' has no pad token; using its eos token"):
            code = main(["run", str(recipe), "logging.run_name=nopad"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "runs" / "nopad" / "summary.json").read_text())["steps"] == 2


def test_pad_equal_to_eos_keeps_the_eos_inside_the_grpo_completion_mask(no_pad_model: Path, tmp_path: Path) -> None:
    """Every completion's mask runs up to and including its first EOS; the padding after it (the same id)
    is masked out. 64 samples of 16 tokens from a random model: some stop early (checked)."""
    from rl_lora.config.schema import validate
    from rl_lora.launch.runner import prepare_run

    raw = grpo(tmp_path, model={"policy": str(no_pad_model)}, grpo={"max_completion_length": 16})
    threads = torch.get_num_threads()
    try:
        with pytest.warns(UserWarning, match="has no pad token"):
            trainer = prepare_run(validate(raw)).trainer
        eos = trainer.processing_class.eos_token_id
        assert trainer.processing_class.pad_token_id == eos
        torch.manual_seed(0)
        batch = [trainer.train_dataset[i] for i in range(16)] * 4
        out = trainer._generate_and_score_completions(batch)  # TRL's own rollout -> ids and loss mask
    finally:
        torch.set_num_threads(threads)
    ids_B_T, mask_B_T = out["completion_ids"], out["completion_mask"]
    stopped_early = 0
    for ids_T, mask_T in zip(ids_B_T.tolist(), mask_B_T.tolist(), strict=True):
        length = sum(mask_T)
        assert mask_T == [1] * length + [0] * (len(mask_T) - length)
        if eos in ids_T:
            assert length == ids_T.index(eos) + 1  # the first EOS is trained on, nothing after it
            assert all(t == eos for t in ids_T[length:])  # the padding, masked out
            stopped_early += length < len(ids_T)
        else:
            assert length == len(ids_T)  # cut by max_completion_length
    assert stopped_early > 0


def test_trl_option_names_equal_the_dataclass_fields() -> None:
    """The precheck reads TRL's config classes' options from a snapshot (no import of TRL): the same names."""
    import dataclasses

    import trl

    from rl_lora.config.trl_options import option_names

    for name in ("GRPOConfig", "DPOConfig", "RewardConfig"):
        assert option_names(name) == {f.name for f in dataclasses.fields(getattr(trl, name))}, name


def test_peft_option_names_are_the_config_classes_own_fields() -> None:
    """lora.adapter_options is checked against a snapshot of PEFT's config classes (no import of PEFT): the
    fields each class declares itself, as dataclasses.fields less those of its base PeftConfig."""
    import dataclasses

    import peft

    from rl_lora.config.adapter_options import ADAPTER_TYPES, option_names

    inherited = {f.name for f in dataclasses.fields(peft.PeftConfig)}
    for name, kind in ADAPTER_TYPES.items():
        own = {f.name for f in dataclasses.fields(getattr(peft, kind.peft_class))} - inherited
        assert option_names(name) == own, name


def test_the_option_snapshot_is_current_and_waits_on_other_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    """option_names.json is what the installed classes give; under another TRL the check waits for the import."""
    from rl_lora.config import option_snapshot

    assert option_snapshot.main(["--check"]) == 0, "run: python -m rl_lora.config.option_snapshot"
    assert option_snapshot.option_names("trl", "GRPOConfig") is not None
    monkeypatch.setattr(option_snapshot, "_installed", lambda distribution: "0.0.1")
    assert option_snapshot.option_names("trl", "GRPOConfig") is None
    assert option_snapshot.option_names("peft", "VeraConfig") is None


def test_light_token_counts_equal_the_tokenizer_s() -> None:
    from rl_lora.config.schema import ModelSpec
    from rl_lora.models.tokenizer_files import light_tokenizer_and_context
    from rl_lora.tasks.arithmetic.tokenizer import build_char_tokenizer

    counter, context = light_tokenizer_and_context(ModelSpec(policy="builtin:arithmetic-tiny"))
    tokenizer = build_char_tokenizer()
    assert context == 64
    for text in ("12+35=", LONG_PROMPT, "", "hello, world 7"):
        assert counter(text)["input_ids"] == tokenizer(text, add_special_tokens=True)["input_ids"]


@pytest.mark.parametrize("case_id", ["trl-option-misspelt", "prompt-past-model-context", "prompt-past-max-length"])
def test_checks_that_read_library_files_run_before_the_libraries_load(tmp_path: Path, case_id: str) -> None:
    """These refusals read TRL's source or a tokenizer.json instead of importing TRL's trainers or transformers'
    models: the precheck raises them in a process that has not loaded torch or those modules (finding a
    module's file runs only the packages' light, lazy __init__)."""
    case = next(c for c in CASES if c.id == case_id)
    raw, overrides = case.setup(tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(raw))
    probe = (
        "import sys\n"
        "from rl_lora.config.schema import load_recipe\n"
        "from rl_lora.utils.errors import USER_ERRORS\n"
        "from rl_lora.launch.precheck import precheck\n"
        f"config = load_recipe({str(recipe)!r}, {overrides!r})\n"
        "try:\n"
        "    precheck(config)\n"
        "except USER_ERRORS as exc:\n"
        "    print('refused:', exc)\n"
        "heavy = {'torch', 'trl.trainer.grpo_config', 'transformers.training_args', 'transformers.modeling_utils'}\n"
        "print('loaded:', sorted(heavy & set(sys.modules)))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert "refused:" in done.stdout, done.stdout + done.stderr[-2000:]
    assert "loaded: []" in done.stdout, done.stdout
