"""docs/recipes.md's key table is the schema's: generated from rl_lora/config/schema.py by rl_lora/config/docs.py."""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import BaseModel, Field

from rl_lora.config import docs as config_docs
from rl_lora.config.schema import RecipeConfig


def test_the_docs_table_is_the_one_the_schema_generates() -> None:
    doc = config_docs.DOC.read_text(encoding="utf-8")
    assert config_docs.with_table(doc) == doc, "docs/recipes.md's key table is stale: run python -m rl_lora.config.docs"


def test_the_check_fails_when_a_description_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    doc = config_docs.DOC.read_text(encoding="utf-8")
    field = RecipeConfig.model_fields["lora"].annotation.model_fields["rank"]
    monkeypatch.setattr(field, "description", "something else")
    assert config_docs.with_table(doc) != doc
    assert config_docs.main(["--check"]) == 1


def test_every_key_of_every_algorithms_recipe_is_a_row_once() -> None:
    keys = [row[0] for row in config_docs.recipe_rows()]
    assert len(keys) == len(set(keys))
    assert {"`lora.rank`", "`reward.functions`", "`trl`", "`guard.kl_patience`", "`ppo.gamma`", "`dpo.beta`",
            "`reward_model.max_length`", "`data.preferences`", "`data.eval_preferences`"} <= set(keys)
    assert "`lora`" not in keys  # a section is opened into its keys, not a row of its own


def test_rows_read_types_bounds_and_defaults() -> None:
    class Inner(BaseModel):
        a: int = 1
        b: str = "x"

    class Section(BaseModel):
        rate: float = Field(default=1e-4, gt=0, description="r")
        share: float = Field(default=0.5, ge=0, lt=1, description="s")
        stage: Literal[0, 2, 3] | None = Field(default=None, description="z")
        rank: int | Literal["full"] = Field(default=1, description="k")
        items: list[Inner] = Field(default_factory=lambda: [Inner(b="y")], description="i | j")

    class Recipe(BaseModel):
        part: Section = Field(default_factory=Section)

    assert config_docs.key_rows(Recipe) == [
        ("`part.rate`", "float > 0", "`0.0001`", "r"),
        ("`part.share`", "float in [0, 1)", "`0.5`", "s"),
        ("`part.stage`", "`0` / `2` / `3` or null", "`null`", "z"),
        ("`part.rank`", "int or `full`", "`1`", "k"),
        ("`part.items`", "list of `{a, b}`", "`[{b: y}]`", "i | j"),
    ]


def test_a_key_without_a_description_is_refused() -> None:
    class Recipe(BaseModel):
        steps: int = 3

    with pytest.raises(ValueError, match="recipe key 'steps' has no description"):
        config_docs.key_rows(Recipe)
