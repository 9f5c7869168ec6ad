"""The built-in tokenizer and task: decoding, special tokens, and the held-out split."""

from __future__ import annotations

import pytest

from rl_lora.config.schema import DataSpec
from rl_lora.tasks.arithmetic import problems as arithmetic
from rl_lora.tasks.arithmetic.tokenizer import build_char_tokenizer
from rl_lora.utils.errors import DataError


def test_decode_fuses_characters() -> None:
    tok = build_char_tokenizer()
    ids = tok("57", add_special_tokens=False)["input_ids"]
    assert len(ids) == 2
    assert tok.decode(ids) == "57"  # not "5 7": that would zero every exact-answer reward


def test_specials_are_distinct_and_bos_is_added() -> None:
    tok = build_char_tokenizer()
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}) == 3
    ids = tok("12+35=")["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == 7
    assert tok.decode(ids, skip_special_tokens=True) == "12+35="


def test_split_is_disjoint_fixed_and_complete() -> None:
    spec = DataSpec(eval_size=300)
    train, held = arithmetic.split(spec)
    assert len(held) == 300 and len(train) == 90 * 90 - 300
    assert not {p.prompt for p in train} & {p.prompt for p in held}
    assert arithmetic.split(spec)[1] == held  # same seed, same held-out set
    assert all(int(p.answer) == sum(map(int, p.prompt[:-1].split("+"))) for p in held)


def test_split_refuses_an_eval_set_that_leaves_nothing() -> None:
    with pytest.raises(DataError, match="data.eval_size"):
        arithmetic.split(DataSpec(min_operand=1, max_operand=2, eval_size=4))
