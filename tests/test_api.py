"""The public API (rl_lora/__init__.py): docs/api.md's example runs and prints what the page shows, and
importing the package stays light."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", (ROOT / "docs" / "api.md").read_text(), flags=re.S)


@pytest.mark.slow
def test_the_docs_example_prints_what_the_page_shows(tmp_path: Path) -> None:
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    (code,), (shown,) = _blocks("python"), _blocks("text")
    # As a user runs it: without the suite's WANDB_MODE=offline, which makes transformers print a line of its own.
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    # Lines the run itself prints to stdout (its summary: figures after training, paths, times) are not shown.
    run_lines = ("held-out", "final reward", "trainable params", "time:", "saved:", "summary:")
    printed = [line for line in out.stdout.splitlines() if not line.startswith(run_lines)]
    assert printed == shown.splitlines()
    assert len(list((tmp_path / "runs").glob("grpo_arithmetic-r1-s1-*/adapter"))) == 1


def test_the_api_names_what_the_page_documents() -> None:
    import rl_lora

    documented = set(re.findall(r"^\| `(\w+)\(", (ROOT / "docs" / "api.md").read_text(), flags=re.M))
    assert documented | {"plan_lines"} == set(rl_lora.__all__)
    assert all(callable(getattr(rl_lora, name)) for name in rl_lora.__all__)


def test_importing_the_package_loads_no_torch() -> None:
    code = "import sys, rl_lora; print('torch' in sys.modules, 'trl' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "False False"


def test_a_bad_override_is_one_line_naming_the_key() -> None:
    import rl_lora
    from rl_lora.utils.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown key 'output_dir'"):
        rl_lora.load_recipe(ROOT / "recipes" / "grpo_arithmetic.yaml", ["output_dir=runs"])
