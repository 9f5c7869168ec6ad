"""The LR rule: LoRA LR = multiplier x full-parameter LR (10x, 15x under 100 steps), overridable."""

from __future__ import annotations

import pytest

from rl_lora.config.schema import LoraSpec
from rl_lora.estimate.lr_rule import resolve_lr


def test_full_parameter_uses_the_stated_lr() -> None:
    r = resolve_lr(1e-4, LoraSpec(rank="full"), steps=400)
    assert r.lr == 1e-4 and r.multiplier == 1.0


def test_lora_long_run_is_ten_x() -> None:
    r = resolve_lr(1e-4, LoraSpec(rank=1), steps=400)
    assert r.lr == pytest.approx(1e-3) and r.multiplier == 10.0
    assert "10 x" in r.reason


def test_lora_short_run_is_fifteen_x() -> None:
    assert resolve_lr(1e-4, LoraSpec(rank=4), steps=99).lr == pytest.approx(1.5e-3)
    assert resolve_lr(1e-4, LoraSpec(rank=4), steps=100).lr == pytest.approx(1e-3)


def test_recipe_multiplier_and_explicit_lr_win() -> None:
    assert resolve_lr(1e-4, LoraSpec(rank=1, lr_multiplier=5), steps=400).lr == pytest.approx(5e-4)
    explicit = resolve_lr(1e-4, LoraSpec(rank=1, lr=3e-4, lr_multiplier=5), steps=400)
    assert explicit.lr == 3e-4 and explicit.multiplier == pytest.approx(3.0)
