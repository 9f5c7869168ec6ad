"""Other PEFT adapter types beside LoRA (``lora.adapter``): counts from shapes, short runs, saved adapters, refusals.

Each type's count from shapes alone (rl_lora/adapters/counting.py) must equal PEFT's own count after wrapping, and
the plan's and the capacity estimate's. A few GRPO steps per type on the random-init built-in model: every trainable
tensor moves, every frozen one stays bitwise, and the saved adapter loads with plain ``PeftModel.from_pretrained``
and gives the trained policy's logits within 1e-5 (fp32, max absolute difference). DPO and PPO for VeRA and
TinyLoRA (the types least like LoRA: shared frozen projections, shared trained vectors).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from rl_lora.adapters.counting import adapter_type_parameter_count, model_linear_shapes
from rl_lora.adapters.lora import peft_config
from rl_lora.algorithms.ppo.actor_critic import VALUE_ADAPTER
from rl_lora.config.schema import validate
from rl_lora.estimate.advisor import recipe_capacity
from rl_lora.estimate.plan import model_facts, parts, plan_model_config
from rl_lora.launch.runner import prepare_run
from rl_lora.tasks.arithmetic.model import builtin_config
from rl_lora.utils.errors import ConfigError
from tests_support import tiny_raw, train_in_process

LOGIT_TOLERANCE = 1e-5  # max |trained - reloaded| logit, fp32

# (lora section, PEFT's count on the built-in model: 4 layers x 7 linears, d_out 128 x 5 and 384 x 2 each)
SPECS = {
    "lora-r1": ({"rank": 1}, 10_240),
    "dora-r1": ({"adapter": "dora", "rank": 1}, 15_872),
    "vera-r256": ({"adapter": "vera"}, 12_800),
    "tinylora": ({"adapter": "tinylora"}, 1_792),
    "tinylora-tied": ({"adapter": "tinylora", "adapter_options": {"u": 13, "weight_tying": 1.0}}, 13),
    "tinylora-half": ({"adapter": "tinylora", "adapter_options": {"u": 5, "weight_tying": 0.5}}, 70),
    "miss-r64": ({"adapter": "miss"}, 360_448),
    "miss-bat": ({"adapter": "miss", "rank": 32, "adapter_options": {"init_weights": "bat"}}, 180_224),
    "miss-mini": ({"adapter": "miss", "rank": 16, "adapter_options": {"init_weights": "mini", "mini_r": 8}}, 3_584),
    "vera-attention": ({"adapter": "vera", "rank": 16, "targets": "attention"}, 16 * (16 + 128)),
}


@pytest.mark.parametrize("spec_id", list(SPECS))
def test_count_from_shapes_equals_peft_s_the_plan_s_and_the_estimate_s(spec_id: str) -> None:
    lora, expected = SPECS[spec_id]
    config = validate({"lora": lora})
    torch.manual_seed(0)
    model = LlamaForCausalLM(builtin_config())
    shapes = model_linear_shapes(model)
    counted = adapter_type_parameter_count(shapes, config.lora.adapter, int(config.lora.rank), config.lora.targets,
                                           config.lora.adapter_options)
    peft_trainable, _ = get_peft_model(model, peft_config(config.lora, model=model)).get_nb_trainable_parameters()
    assert counted == peft_trainable == expected
    facts = model_facts(plan_model_config(config))
    planned = sum(sum(p.sizes) for p in parts(facts, config, config.lora.rank) if p.trainable)
    assert planned == counted
    assert recipe_capacity(config).lora_params == counted


def test_capacity_prints_each_type_s_count() -> None:
    import rl_lora

    lines = rl_lora.capacity(validate({"lora": {"adapter": "tinylora", "adapter_options": {"u": 13,
                                                                                          "weight_tying": 1.0}}}))
    assert any(line.startswith("tinylora parameters: 13 = 1 trained vector(s) of u=13") for line in lines), lines
    lines = rl_lora.capacity(validate({"lora": {"adapter": "vera"}}))
    assert "vera parameters: 12,800 = attention 6,144 (16 linears) + MLP 6,656 (12 linears)" in lines


# -- the recipe keys ----------------------------------------------------------------------------------------


def test_lora_stays_the_default_and_a_type_without_rank_gets_peft_s_default() -> None:
    assert validate({}).lora.adapter == "lora" and validate({}).lora.method == "lora-r1"
    assert validate({"lora": {"adapter": "vera"}}).lora.method == "vera-r256"
    assert validate({"lora": {"adapter": "tinylora"}}).lora.rank == 2
    assert validate({"lora": {"adapter": "vera", "rank": 8}}).lora.method == "vera-r8"
    assert validate({"lora": {"adapter": "vera", "rank": "full"}}).lora.method == "full"


@pytest.mark.parametrize(("lora", "message"), [
    ({"adapter": "vrea"}, "'lora.adapter': not an adapter type rl-lora wires; did you mean 'vera'?"),
    ({"adapter": "tinylora", "adapter_options": {"weight_tyng": 1.0}},
     "lora.adapter_options.weight_tyng: not an option of PEFT's TinyLoraConfig (lora.adapter: tinylora); did you "
     "mean 'lora.adapter_options.weight_tying'?"),
    ({"adapter": "vera", "adapter_options": {"r": 4}}, "lora.adapter_options.r: rl-lora sets it from lora.rank"),
    ({"adapter": "dora", "adapter_options": {"use_dora": False}}, "rl-lora sets it from lora.adapter: dora"),
    ({"adapter": "miss", "adapter_options": {"layers_to_transform": [0]}}, "select layers with lora.targets"),
    ({"adapter": "vera", "alpha": 8}, "lora.alpha 8: scales lora and dora only"),
])
def test_bad_adapter_input_is_one_line_naming_the_key(lora: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate({"lora": lora})
    assert message in str(info.value) and "\n" not in str(info.value)


def test_tinylora_on_a_4_bit_base_is_refused_with_the_recipe() -> None:
    with pytest.raises(ConfigError, match="cannot put lora.adapter tinylora on a 4-bit base"):
        validate({"lora": {"adapter": "tinylora"}, "model": {"quantization": "nf4"}})
    validate({"lora": {"adapter": "vera"}, "model": {"quantization": "nf4"}})  # PEFT has a 4-bit VeRA layer


def test_a_type_on_fused_moe_experts_is_refused_before_the_model_loads(tmp_path: Path, monkeypatch) -> None:
    import rl_lora.models.loading as loading
    from tests_support import save_tiny_moe

    folder = save_tiny_moe(tmp_path / "moe")
    monkeypatch.setattr(loading, "load_policy", lambda *a, **k: pytest.fail("the model loaded"))
    raw = tiny_raw(tmp_path / "runs", model={"policy": str(folder)}, lora={"adapter": "vera", "rank": 4})
    with pytest.raises(ConfigError, match="lora.adapter vera: PEFT 0.21.2 cannot put it on fused MoE experts"):
        prepare_run(validate(raw))
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("spec_id", ["dora-r1", "vera-r256", "tinylora", "tinylora-tied", "miss-mini"])
def test_each_type_on_an_moe_model_s_attention_is_counted_as_peft_counts_it(spec_id: str, tmp_path: Path) -> None:
    """On a (fused-expert) MoE model the other types go on the attention linears only (``lora.targets:
    attention``; the experts are refused above): the count from shapes equals PEFT's after wrapping and the
    plan's."""
    from tests_support import save_tiny_moe

    folder = save_tiny_moe(tmp_path / "moe")
    lora = {**SPECS[spec_id][0], "targets": "attention"}
    config = validate({"lora": lora, "model": {"policy": str(folder)}})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder)
    counted = adapter_type_parameter_count(model_linear_shapes(model), config.lora.adapter, int(config.lora.rank),
                                           config.lora.targets, config.lora.adapter_options)
    peft_trainable, _ = get_peft_model(model, peft_config(config.lora, model=model)).get_nb_trainable_parameters()
    assert counted == peft_trainable > 0
    facts = model_facts(plan_model_config(config))
    assert sum(sum(p.sizes) for p in parts(facts, config, config.lora.rank) if p.trainable) == counted


def test_peft_s_own_value_checks_name_the_options() -> None:
    config = validate({"lora": {"adapter": "tinylora", "adapter_options": {"weight_tying": 2.0}}})
    with pytest.raises(ConfigError, match=r"lora.adapter_options \{'weight_tying': 2.0\}: PEFT's TinyLoraConfig"):
        peft_config(config.lora)


# -- short runs ---------------------------------------------------------------------------------------------


def _raw(tmp: Path, lora: dict, **sections: dict) -> dict:
    """The tiny recipe with the whole ``lora`` section replaced (tiny_raw's rank 1 would win over a type's default)."""
    raw = tiny_raw(tmp, **sections)
    raw["lora"] = dict(lora)
    raw["data"]["eval_size"] = 8
    raw["train"].update(eval_every=3, threads=1)
    return raw


def _check_trained_and_frozen(before: dict, after: dict) -> list[str]:
    trainable = [n for n, (grad, _) in before.items() if grad]
    assert trainable
    unchanged = [n for n in trainable if torch.equal(before[n][1], after[n][1])]
    assert not unchanged, f"trainable parameters that did not train: {unchanged}"
    moved = [n for n, (grad, _) in before.items() if not grad and not torch.equal(before[n][1], after[n][1])]
    assert not moved, f"frozen parameters that changed: {moved}"
    return trainable


def _check_reloads(run, result, model: torch.nn.Module) -> None:
    base = AutoModelForCausalLM.from_pretrained(result.summary["base_model"])
    loaded = PeftModel.from_pretrained(base, str(result.run_dir / "adapter")).eval()
    batch = run.tokenizer(["12+35=", "99+99=", "10+1="], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model.eval()(**batch).logits
        with model.disable_adapter():
            untouched = model(**batch).logits
        got = loaded(**batch).logits
    assert not torch.equal(expected, untouched), "the adapter should have moved the logits"
    assert (expected - got).abs().max().item() <= LOGIT_TOLERANCE


GRPO_TYPES = ["dora-r1", "vera-r256", "tinylora-tied", "miss-r64"]


@pytest.mark.parametrize("spec_id", GRPO_TYPES)
def test_grpo_steps_train_the_adapter_only_and_the_saved_adapter_reloads(
    spec_id: str, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    lora, expected = SPECS[spec_id]
    raw = _raw(tmp_path, lora)
    run, before, after, result = train_in_process(raw)
    _check_trained_and_frozen(before, after)
    assert result.summary["trainable_params"] == expected
    assert result.summary["method"] == validate(raw).lora.method and result.summary["adapter"] == lora["adapter"]
    assert f"-{lora['adapter']}-r" in result.run_dir.name
    _check_reloads(run, result, run.trainer.model)
    said = [line for line in capfd.readouterr().err.splitlines() if "rollouts run with unmerged" in line]
    assert len(said) == 1, said


@pytest.mark.slow
@pytest.mark.parametrize("spec_id", ["vera-r256", "tinylora-tied"])
def test_dpo_steps_with_another_type(spec_id: str, tmp_path: Path) -> None:
    lora, expected = SPECS[spec_id]
    raw = _raw(tmp_path, lora, data={"max_operand": 30}, train={"batch_size": 8})
    raw = {k: v for k, v in raw.items() if k not in ("grpo", "reward")} | {"algorithm": "dpo"}
    run, before, after, result = train_in_process(raw)
    _check_trained_and_frozen(before, after)
    assert result.summary["trainable_params"] == expected
    _check_reloads(run, result, run.trainer.model)


@pytest.mark.slow
@pytest.mark.parametrize("spec_id", ["vera-r256", "tinylora-tied"])
def test_ppo_policy_and_critic_adapters_of_the_type_on_one_frozen_base(spec_id: str, tmp_path: Path) -> None:
    lora, expected = SPECS[spec_id]
    raw = _raw(tmp_path, lora, ppo={"samples_per_prompt": 4, "max_completion_length": 4, "epochs": 2,
                                    "minibatch_size": 8})
    raw["algorithm"] = "ppo"
    del raw["grpo"]
    run, before, after, result = train_in_process(raw)
    trainable = _check_trained_and_frozen(before, after)
    value = [n for n in trainable if f".{VALUE_ADAPTER}" in n]
    policy = [n for n in trainable if f".{VALUE_ADAPTER}" not in n]
    assert value and policy
    assert sum(after[n][1].numel() for n in policy) == sum(after[n][1].numel() for n in value) == expected
    _check_reloads(run, result, run.trainer.model)


# -- the sweep's adapter axis -------------------------------------------------------------------------------


def test_sweep_adapter_axis_names_each_arm_by_type_and_runs_it_with_the_type() -> None:
    from rl_lora.config.schema import apply_overrides, read_recipe_file
    from rl_lora.study.sweep_plan import parse_adapters, parse_lr_grids, parse_ranks, plan_arms, points_for

    recipe = Path(__file__).resolve().parent.parent / "recipes" / "grpo_arithmetic.yaml"
    config = validate(read_recipe_file(recipe))
    arms = plan_arms(config, [], adapters=parse_adapters("lora-r1,dora-r1,vera-r256,tinylora-tied-u13,miss,full"))
    assert [a.name for a in arms] == ["r1-all-b64", "dora-r1-all-b64", "vera-r256-all-b64",
                                      "tinylora-r2-u13-weight_tying1.0-all-b64", "miss-r64-all-b64", "full-b64"]
    # a LoRA arm keeps a rank sweep's overrides (and so its runs); the others set their type and options
    assert arms[0].overrides() == plan_arms(config, parse_ranks("1"))[0].overrides() == ["lora.rank=1"]
    for arm in arms[1:-1]:
        run = validate(apply_overrides(read_recipe_file(recipe), arm.overrides())).lora
        assert run.method == arm.method  # the summary's method: reports group the arm's runs under it
    tied = validate(apply_overrides(read_recipe_file(recipe), arms[3].overrides())).lora
    assert (tied.adapter, tied.rank, tied.adapter_options) == ("tinylora", 2, {"u": 13, "weight_tying": 1.0})
    grids = parse_lr_grids("full=1e-4;lora=1e-3;vera=1e-2;tinylora-r2-u13-weight_tying1.0=5e-2")
    lrs = {p.arm.name: p.resolved_lr for p in points_for(config, arms, [1], grids)}
    assert lrs == {"r1-all-b64": 1e-3, "dora-r1-all-b64": 1e-3, "vera-r256-all-b64": 1e-2,
                   "tinylora-r2-u13-weight_tying1.0-all-b64": 5e-2, "miss-r64-all-b64": 1e-3, "full-b64": 1e-4}


@pytest.mark.parametrize(("text", "message"), [
    ("vrea-r1", "'vrea' is not an adapter type; did you mean 'vera'?"),
    ("vera-x2", "'x2' is not r<rank>"),
    ("lora-tied", "'tied' is not r<rank>"),
])
def test_sweep_adapter_axis_refuses_bad_arms_in_one_line(text: str, message: str) -> None:
    from rl_lora.study.sweep_plan import parse_adapters

    with pytest.raises(ConfigError, match=message):
        parse_adapters(text)


@pytest.mark.slow
def test_reward_model_with_another_type_trains_the_adapter_and_the_score_head(tmp_path: Path) -> None:
    """VeRA on a reward model: the adapter and the score head's trainable copy (PEFT's modules_to_save) train,
    the base stays bitwise; the count is VeRA's on the linears plus the head."""
    raw = _raw(tmp_path, {"adapter": "vera", "rank": 16}, data={"max_operand": 30}, train={"batch_size": 8})
    raw = {k: v for k, v in raw.items() if k not in ("grpo", "reward")} | {"algorithm": "reward"}
    run, before, after, result = train_in_process(raw)
    trainable = _check_trained_and_frozen(before, after)
    assert [n for n in trainable if "vera_" not in n] == ["base_model.model.score.modules_to_save.default.weight"]
    assert result.summary["trainable_params"] == 28 * 16 + 5_632 + 128  # lambda_d, lambda_b, the one-logit head


@pytest.mark.slow
@pytest.mark.parametrize(("lora", "expected"), [({"adapter": "dora", "rank": 1}, 15_872),
                                                ({"adapter": "vera", "rank": 16}, 28 * 16 + 5_632),
                                                ({"adapter": "miss", "rank": 16}, 16 * 5_632)])
def test_types_peft_puts_on_a_4_bit_base_train_there(lora: dict, expected: int, tmp_path: Path) -> None:
    """PEFT 0.21.2 has a bitsandbytes path for DoRA, VeRA and MiSS (not TinyLoRA: refused with the recipe)."""
    pytest.importorskip("bitsandbytes")
    raw = _raw(tmp_path, lora, model={"quantization": "nf4", "warmup_steps": 20}, train={"steps": 2})
    run, before, after, result = train_in_process(raw)
    _check_trained_and_frozen(before, after)
    assert result.summary["trainable_params"] == expected


# -- resume ---------------------------------------------------------------------------------------------------

RESUMED_TYPES = ["dora-r1", "vera-r256", "tinylora", "tinylora-tied", "miss-mini"]


@pytest.mark.parametrize("spec_id", RESUMED_TYPES)
def test_a_run_of_each_type_resumed_from_a_checkpoint_ends_as_the_uninterrupted_one(spec_id: str,
                                                                                    tmp_path: Path) -> None:
    """Each type's trained values and optimizer state come back from a checkpoint: a 4-step GRPO run, cut back
    to its step-2 checkpoint (the later checkpoint, the adapter and the summary removed, as a kill leaves it)
    and resumed in this process, logs the same figures at steps 3-4 and saves the same adapter bytes. (The
    kill itself and the new process are type-independent: tests/test_resume.py kills and resumes LoRA runs.)"""
    import json
    import shutil

    import torch

    from rl_lora.launch.runner import run_recipe
    from rl_lora.training.checkpoint import step_name

    lora, _ = SPECS[spec_id]
    raw = _raw(tmp_path, lora, train={"steps": 4, "save_every": 2, "keep_last": 2, "eval_every": 2})
    raw["logging"]["run_name"] = "whole"
    threads = torch.get_num_threads()
    try:
        run_recipe(validate(raw))
        whole, cut = tmp_path / "whole", tmp_path / "cut"
        shutil.copytree(whole, cut)
        shutil.rmtree(cut / "checkpoints" / step_name(4))
        shutil.rmtree(cut / "adapter")
        (cut / "summary.json").unlink()
        raw["logging"]["run_name"] = "cut"
        result = run_recipe(validate(raw), resume=str(cut), resuming=True)
    finally:
        torch.set_num_threads(threads)
    assert result is not None and result.summary["resumed_from_step"] == 2

    def records(run: Path) -> dict[int, dict]:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: {k: r.get(k) for k in ("loss", "reward", "grad_norm", "lr", "eval/accuracy")}
                for r in rows if "loss" in r}

    assert records(whole) == records(cut) and sorted(records(cut)) == [1, 2, 3, 4]
    adapter = "adapter/adapter_model.safetensors"
    assert (whole / adapter).read_bytes() == (cut / adapter).read_bytes()
