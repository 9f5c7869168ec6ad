"""Recipe validation: unknown keys, wrong types, overrides, files, and every shipped recipe."""

from __future__ import annotations

from pathlib import Path

import pytest

from rl_lora.config.schema import RecipeConfig, apply_overrides, load_recipe, parse_override, validate
from rl_lora.utils.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def test_defaults_validate() -> None:
    config = validate({})
    assert config.lora.rank == 1 and config.lora.alpha == 32 and config.lora.targets == "all-linear"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path: Path) -> None:
    config = load_recipe(path)
    assert isinstance(config, RecipeConfig)
    assert path.read_text().lstrip().startswith("#"), "recipe header must show how to run it"
    assert "rl-lora run" in path.read_text().split("\n\n")[0]


def test_there_is_a_default_recipe() -> None:
    assert (REPO / "recipes" / "grpo_arithmetic.yaml") in RECIPES


def test_unknown_key_names_key_and_nearest() -> None:
    with pytest.raises(ConfigError) as err:
        validate({"lora": {"rnak": 2}})
    assert "unknown key 'lora.rnak'" in str(err.value)
    assert "did you mean 'lora.rank'" in str(err.value)


def test_unknown_section_suggests_nearest() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'trian'.*did you mean 'train'"):
        validate({"trian": {"steps": 3}})


def test_wrong_type_names_field_and_expectation() -> None:
    with pytest.raises(ConfigError) as err:
        validate({"train": {"steps": "many"}})
    assert "'train.steps'" in str(err.value) and "integer" in str(err.value)


def test_rank_full_or_positive_int() -> None:
    assert validate({"lora": {"rank": "full"}}).lora.is_full
    with pytest.raises(ConfigError, match="lora.rank"):
        validate({"lora": {"rank": 0}})
    with pytest.raises(ConfigError, match="lora.rank"):
        validate({"lora": {"rank": "half"}})


def test_batch_must_hold_whole_groups() -> None:
    with pytest.raises(ConfigError, match=r"train.batch_size \(60\).*grpo.num_generations \(8\)"):
        validate({"train": {"batch_size": 60}, "grpo": {"num_generations": 8}})


def test_override_parsing() -> None:
    assert parse_override("lora.rank=4") == (["lora", "rank"], 4)
    assert parse_override("lora.rank=full") == (["lora", "rank"], "full")
    assert parse_override("train.lr=2e-4") == (["train", "lr"], 2e-4)  # YAML 1.1 would read a string
    assert parse_override("logging.wandb=false") == (["logging", "wandb"], False)


@pytest.mark.parametrize("bad", ["lora.rank", "=4", "lora..rank=1", "lora.rank=[1"])
def test_bad_override_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError, match="override"):
        parse_override(bad)


def test_override_applies_and_then_validates() -> None:
    raw = apply_overrides({"lora": {"rank": 1}}, ["lora.rank=8", "train.steps=50"])
    config = validate(raw)
    assert config.lora.rank == 8 and config.train.steps == 50
    with pytest.raises(ConfigError, match="unknown key 'lora.ranks'"):
        validate(apply_overrides({}, ["lora.ranks=8"]))


def test_override_through_a_scalar_is_refused() -> None:
    with pytest.raises(ConfigError, match="'name' is not a section"):
        apply_overrides({"name": "x"}, ["name.inner=1"])


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora:\n  rank: 1\n train: [\n")
    with pytest.raises(ConfigError, match=r"bad.yaml' line \d+.*malformed YAML"):
        load_recipe(bad)


def test_empty_and_non_mapping_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        load_recipe(empty)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_recipe(listed)


def test_float_strings_in_files_are_floats(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  lr: 2e-4\n")
    assert load_recipe(recipe).train.lr == pytest.approx(2e-4)


def test_config_round_trips_through_dict() -> None:
    config = validate({"lora": {"rank": "full"}, "train": {"lr": 3e-5}})
    assert validate(config.to_dict()) == config


# The default recipe's values that are the toy task's, not defaults for real data (TRL's own defaults are).
# lr_scheduler: cosine is what keeps the default's end near its best (docs/reproducibility.md).
TOY_TASK_KEYS = {"grpo.max_completion_length", "train.lr_scheduler"}


def _flat(node: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in node.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_defaults_match_the_default_recipe_but_for_the_toy_tasks_values() -> None:
    shipped = _flat(load_recipe(REPO / "recipes" / "grpo_arithmetic.yaml").model_dump(exclude={"logging"}))
    defaults = _flat(validate({"name": shipped["name"]}).model_dump(exclude={"logging"}))
    differ = {k for k in shipped if shipped[k] != defaults[k]}
    assert differ <= TOY_TASK_KEYS, differ - TOY_TASK_KEYS
    assert validate({}).grpo.max_completion_length == 256  # TRL's default, for real data


def test_trl_options_reach_the_trainer_config(tmp_path: Path) -> None:
    from rl_lora.algorithms.grpo import grpo_args

    config = validate({"trl": {"gradient_checkpointing": True, "logging_first_step": True}})
    args = grpo_args(config, 1e-3, tmp_path)
    assert args.gradient_checkpointing is True and args.logging_first_step is True
    with pytest.raises(ConfigError, match="PPO is rl-lora's own trainer"):
        validate({"algorithm": "ppo", "trl": {"optim": "sgd"}})


def test_trl_cannot_override_what_the_builders_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The TRL options the three builders set are exactly RECIPE_OWNED's keys and TRL_DEFAULTS (so the table
    the light precheck reads cannot fall behind the builders), and a ``trl:`` key rl-lora sets (bf16,
    disable_tqdm, dataloader_num_workers among them) is refused by the precheck and by the builder."""
    import rl_lora.algorithms.common as common
    from rl_lora.algorithms.dpo import dpo_args
    from rl_lora.algorithms.grpo import grpo_args
    from rl_lora.algorithms.reward_model import reward_args
    from rl_lora.config.trl_options import RECIPE_OWNED, TRL_DEFAULTS, check_builder_options, precheck_trl

    seen: dict[str, set[str]] = {}
    check = common.check_builder_options

    def record(ours: dict, builder: str) -> None:
        seen[builder] = set(ours)
        check(ours, builder)

    monkeypatch.setattr(common, "check_builder_options", record)
    builders = {"grpo": grpo_args, "dpo": dpo_args, "reward": reward_args}
    for algorithm, build in builders.items():
        build(validate({"algorithm": algorithm, "train": {"save_every": 2}}), 1e-3, tmp_path)
    assert set(seen) == {"GRPOConfig's builder", "DPOConfig's builder", "RewardConfig's builder"}
    assert set().union(*seen.values()) == set(RECIPE_OWNED) | TRL_DEFAULTS
    with pytest.raises(RuntimeError, match=r"sets TRL options \['new_option'\] that .* RECIPE_OWNED"):
        check_builder_options(["learning_rate", "new_option"], "a builder")
    for algorithm, build in builders.items():
        for key, value in (("bf16", True), ("disable_tqdm", False), ("dataloader_num_workers", 2)):
            config = validate({"algorithm": algorithm, "trl": {key: value}})
            with pytest.raises(ConfigError, match=f"trl.{key}: rl-lora sets it from the recipe's"):
                precheck_trl(config)
            with pytest.raises(ConfigError, match=f"trl.{key}: rl-lora sets it"):
                build(config, 1e-3, tmp_path)


def test_unquoted_exponent_floats_are_floats_and_quoted_strings_stay_strings(tmp_path: Path) -> None:
    """YAML 1.1 reads an unquoted 2e-4 as a string; recipes read it as a float, in the file and in overrides.
    A quoted value is a string the user meant, e.g. inside ``trl:`` or a reward's keywords, and stays one."""
    from rl_lora.config.schema import apply_overrides, read_recipe_file

    recipe = tmp_path / "r.yaml"
    recipe.write_text('train:\n  lr: 2e-4\ntrl:\n  run_name: "1e5"\n')
    raw = read_recipe_file(recipe)
    assert raw["train"]["lr"] == 2e-4 and raw["trl"]["run_name"] == "1e5"
    raw = apply_overrides(raw, ["train.lr=3E-5", 'trl.hub_model_id="5e3"'])
    assert raw["train"]["lr"] == 3e-5 and raw["trl"]["hub_model_id"] == "5e3"
