"""The command line: bad input ends with one clear line and exit code 2, before any model loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests_support import tiny_raw

REPO = Path(__file__).resolve().parent.parent


def _cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rl_lora.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("rl-lora: error: ")
    return lines[0]


def test_missing_recipe(tmp_path: Path) -> None:
    line = _one_line_error(_cli("run", str(tmp_path / "missing.yaml")))
    assert "missing.yaml' does not exist" in line


def test_malformed_yaml(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora: {rank: 1\n")
    assert "malformed YAML" in _one_line_error(_cli("run", str(bad)))


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("lora.rnak=2", "unknown key 'lora.rnak'; did you mean 'lora.rank'?"),
        ("train.steps=abc", "'train.steps'"),
        ("lora.rank", "is not of the form key.path=value"),
    ],
)
def test_bad_overrides_fail_before_any_output(tmp_path: Path, override: str, expected: str) -> None:
    out = tmp_path / "runs"
    line = _one_line_error(_cli("run", "recipes/grpo_arithmetic.yaml", override, f"logging.output_dir={out}"))
    assert expected in line
    assert not out.exists(), "a bad recipe must not create a run folder"


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    proc = _cli("--debug", "run", str(tmp_path / "missing.yaml"))
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_bad_reward_name_fails_before_the_model_loads(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    raw = tiny_raw(tmp_path / "runs", reward={"functions": [{"name": "no_such_pkg_q:score"}]})
    recipe.write_text(yaml.safe_dump(raw))
    line = _one_line_error(_cli("run", str(recipe)))
    assert "reward 'no_such_pkg_q:score': cannot import module" in line
    assert not (tmp_path / "runs").exists()


def test_reward_that_raises_is_named_with_its_step(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    raw = tiny_raw(tmp_path / "runs", reward={"functions": [{"name": "reward_helpers:raises"}]})
    recipe.write_text(yaml.safe_dump(raw))
    proc = subprocess.run(
        [sys.executable, "-m", "rl_lora.cli", "run", str(recipe)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "PYTHONPATH": str(REPO / "tests")},
    )
    assert proc.returncode == 2
    assert "reward 'reward_helpers:raises' raised at step 0" in proc.stderr
    assert "scoring server unreachable" in proc.stderr and "Traceback" not in proc.stderr


def test_validate_prints_resolved_lr() -> None:
    proc = _cli("validate", "recipes/grpo_arithmetic.yaml", "lora.rank=4")
    assert proc.returncode == 0, proc.stderr
    assert "rank: 4" in proc.stdout and "# resolved lr: 0.001 (10 x train.lr 0.0001" in proc.stdout


def test_run_end_to_end_through_the_console_command(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_raw(tmp_path / "runs", train={"steps": 2})))
    exe = Path(sys.executable).parent / "rl-lora"
    proc = subprocess.run(
        [str(exe), "run", str(recipe), "logging.run_name=cli"], cwd=REPO, capture_output=True, text=True,
        timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(REPO / "tests")},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "held-out accuracy:" in proc.stdout
    summary = json.loads((tmp_path / "runs" / "cli" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["method"] == "lora-r1"


def test_library_warnings_go_to_the_run_folder_and_ours_to_the_console(tmp_path) -> None:
    import warnings

    from rl_lora.utils.library_warnings import LOG_NAME, route_library_warnings

    original = warnings.showwarning
    try:
        with warnings.catch_warnings(record=True) as shown:  # what reaches the console is recorded here
            warnings.simplefilter("always")
            route_library_warnings(tmp_path)
            warnings.warn_explicit("old API", FutureWarning, "/x/lib/python3.11/site-packages/trl/a.py", 3)
            warnings.warn_explicit("pad = eos", UserWarning, "/work/rl_lora/models/loading.py", 9)
            warnings.warn_explicit("my plug-in", UserWarning, "/home/me/rewards.py", 1)
    finally:
        warnings.showwarning = original
    assert [str(w.message) for w in shown] == ["pad = eos", "my plug-in"]
    assert "site-packages/trl/a.py:3: FutureWarning: old API" in (tmp_path / LOG_NAME).read_text()


def test_a_self_hosted_wandb_login_counts_as_online(tmp_path, monkeypatch) -> None:
    from rl_lora.training.tracking import wandb_host, wandb_mode

    for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    (tmp_path / ".netrc").write_text("machine wandb.example.org\n  login user\n  password secret\n")
    (tmp_path / ".netrc").chmod(0o600)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    assert wandb_host() == "api.wandb.ai" and wandb_mode() == "offline"  # logged in elsewhere only
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org:8443")
    assert wandb_host() == "wandb.example.org" and wandb_mode() == "online"


def test_validate_runs_the_precheck_run_runs(tmp_path: Path) -> None:
    """A misspelled `trl:` key is refused by `validate` with the line `run` gives, and nothing is written."""
    recipe = tmp_path / "r.yaml"
    raw = tiny_raw(tmp_path / "runs")
    raw = {k: v for k, v in raw.items() if k not in ("grpo", "reward")} | {"algorithm": "dpo"}
    recipe.write_text(yaml.safe_dump(raw))
    lines = [_one_line_error(_cli(command, str(recipe), "trl.loss_typ=sigmoid")) for command in ("validate", "run")]
    assert lines[0] == lines[1] and "did you mean 'trl.loss_type'?" in lines[0]
    assert not (tmp_path / "runs").exists()
