"""Reward plug-ins: the built-in shaping rewards, and naming a plug-in by file, import path or entry point.

The two GRPO runs at the end check that rewards named by a file path and by an import path are found,
called with the dataset's columns and logged under their own names inside a real (2-step) run.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from reward_models.shaping import answer_format, length_penalty
from rl_lora.config.schema import validate
from rl_lora.launch.runner import finish_run, prepare_run
from rl_lora.tasks.rewards import ENTRY_POINT_GROUP, check_reward, resolve_reward
from rl_lora.utils.errors import ConfigError, RewardError
from tests_support import tiny_raw


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()  # the runs below set train.threads: 1, process-wide
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("completion", "score"),
    [
        ("47", 1.0),
        ("-3", 1.0),  # a leading minus sign is allowed
        (" 47 \nmore", 1.0),  # first line, surrounding spaces stripped (as exact_answer reads it)
        ("4 7", 0.0),
        ("+3", 0.0),
        ("1.5", 0.0),
        ("47a", 0.0),
        ("-", 0.0),
        ("", 0.0),
    ],
)
def test_format_reward(completion: str, score: float) -> None:
    assert answer_format(["1+2="], [completion]) == [score]


def test_length_penalty() -> None:
    assert length_penalty(["p"] * 3, ["", "ab", "abcd"], max_chars=4) == [0.0, -0.5, -1.0]
    assert length_penalty(["p"], ["x" * 8], max_chars=4) == [-2.0]  # not clipped past the limit
    with pytest.raises(ValueError, match="max_chars"):
        length_penalty(["p"], ["x"], max_chars=0)


def test_builtins_resolve_by_name() -> None:
    assert resolve_reward("format") is answer_format
    assert resolve_reward("length_penalty") is length_penalty


def _write(path: Path, source: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    return path


def test_reward_from_a_file_path(tmp_path: Path) -> None:
    f = _write(tmp_path / "rewards" / "my_reward.py", """
        def score(prompts, completions, **_):
            return [float(len(c)) for c in completions]
    """)
    fn = resolve_reward(f"{f}:score")
    assert fn(["a", "b"], ["xy", ""]) == [2.0, 0.0]
    assert resolve_reward(f"{f}:score") is fn  # the file is executed once, not once per lookup


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(RewardError, match=r"file '.*missing\.py' does not exist"):
        resolve_reward(f"{tmp_path / 'missing.py'}:score")
    f = _write(tmp_path / "r.py", "def other(prompts, completions):\n    return []\n")
    with pytest.raises(RewardError, match=r"file '.*r\.py' has no callable 'score'"):
        resolve_reward(f"{f}:score")
    bad = _write(tmp_path / "bad.py", "raise ImportError('needs the scoring package')\n")
    with pytest.raises(RewardError, match=r"bad\.py' raised while loading: ImportError: needs the scoring package"):
        resolve_reward(f"{bad}:score")


def _install_entry_point(root: Path, name: str, target: str) -> None:
    """A distribution as pip leaves it in site-packages, without pip: a dist-info folder with METADATA
    and entry_points.txt, found by importlib.metadata on any sys.path entry."""
    info = root / "acme_rewards-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-rewards\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{name} = {target}\n")


def test_entry_point_registers_a_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path / "acme_scores.py", """
        def politeness(prompts, completions, **_):
            return [1.0 if "please" in c else 0.0 for c in completions]
    """)
    _install_entry_point(tmp_path, "acme_polite", "acme_scores:politeness")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = resolve_reward("acme_polite")
    assert fn(["p", "p"], ["please", "no"]) == [1.0, 0.0]
    with pytest.raises(RewardError, match=r"unknown reward 'acme_polit'.*'rl_lora.reward_models' \(.*acme_polite"):
        resolve_reward("acme_polit")


def test_broken_entry_point_names_its_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _install_entry_point(tmp_path, "acme_broken", "acme_not_there:score")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RewardError, match=r"entry point 'acme_not_there:score' \(from acme-rewards\) cannot be"):
        resolve_reward("acme_broken")


def test_kwargs_are_checked_before_the_run() -> None:
    check_reward("length_penalty", {"max_chars": 10})
    with pytest.raises(RewardError, match="reward 'length_penalty' takes no keyword 'max_char'"):
        check_reward("length_penalty", {"max_char": 10})
    check_reward("reward_helpers:digit_ones", {})


def test_learned_reward_names_are_validated_in_the_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must be followed by a model or adapter folder"):
        validate({"reward": {"functions": [{"name": "learned:"}]}})
    with pytest.raises(ConfigError, match=r"unknown kwargs \['batch'\]"):
        validate({"reward": {"functions": [{"name": "learned:x", "kwargs": {"batch": 4}}]}})
    with pytest.raises(RewardError, match="does not exist"):
        resolve_reward(f"learned:{tmp_path / 'nope'}")
    with pytest.raises(RewardError, match="neither a model"):
        resolve_reward(f"learned:{tmp_path}")


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_file_and_import_path_rewards_inside_a_grpo_run(tmp_path: Path) -> None:
    f = _write(tmp_path / "plugins" / "answer_len.py", """
        def score(prompts, completions, answer, **_):
            # uses the dataset's 'answer' column: closer lengths score higher
            return [-abs(len(c) - len(a)) for c, a in zip(completions, answer)]
    """)
    functions = [
        {"name": "reward_helpers:digit_ones", "weight": 1.0},
        {"name": f"{f}:score", "weight": 0.5},
        {"name": "format", "weight": 0.1},
    ]
    config = validate(tiny_raw(tmp_path / "runs", reward={"functions": functions}, train={"steps": 2, "threads": 1}))
    run = prepare_run(config)
    run.trainer.train()
    result = finish_run(run, train_seconds=0.0)
    steps = [r for r in _records(result.run_dir) if r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2]
    for name in ("reward_helpers.digit_ones", f"{f}.score".replace("/", "."), "format"):
        assert all(f"rewards/{name}/mean" in r for r in steps), name


def test_a_failing_file_reward_stops_the_run_naming_it(tmp_path: Path) -> None:
    f = _write(tmp_path / "short.py", """
        def score(prompts, completions, **_):
            return [0.0] * (len(completions) - 1)
    """)
    config = validate(tiny_raw(tmp_path / "runs", reward={"functions": [{"name": f"{f}:score"}]},
                               train={"steps": 1, "threads": 1}))
    run = prepare_run(config)
    with pytest.raises(RewardError, match=r"reward '.*short\.py:score' at step 0 returned 15 scores for 16"):
        run.trainer.train()
