"""The run folder's files: summary.json is assembled from parts that may not share a key."""

from __future__ import annotations

import pytest

from rl_lora.training.run_dir import merge_disjoint


def test_summary_parts_merge_and_a_shared_key_names_both_parts() -> None:
    assert merge_disjoint({"recipe": {"seed": 1}, "tracker": {"mean_step_time": 0.5}, "empty": {}}) == {
        "seed": 1, "mean_step_time": 0.5}
    with pytest.raises(ValueError, match="key 'seed' comes from both 'recipe' and 'loaded data'"):
        merge_disjoint({"recipe": {"seed": 1}, "tracker": {}, "loaded data": {"seed": 2}})
