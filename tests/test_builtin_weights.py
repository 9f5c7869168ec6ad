"""The built-in model's shipped weights: what the default recipes start from on every machine."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import LlamaForCausalLM

from rl_lora.config.schema import DataSpec, load_recipe
from rl_lora.tasks.arithmetic import model as builtin
from rl_lora.utils.errors import ModelError
from rl_lora.utils.files import sha256_file

REPO = Path(__file__).resolve().parent.parent
SHIPPED = builtin.SHIPPED_ROOT / "arithmetic-tiny"
STEPS = builtin.shipped_build("arithmetic-tiny")["warmup_steps"]


def test_shipped_build_is_complete_and_matches_its_sha256() -> None:
    info = json.loads((SHIPPED / "build.json").read_text())
    assert sha256_file(SHIPPED / builtin.WEIGHTS) == info["sha256"]
    assert info["key"] == builtin.build_key("arithmetic-tiny", info["warmup_steps"], DataSpec(**info["data"]))
    model = LlamaForCausalLM.from_pretrained(SHIPPED)
    assert sum(p.numel() for p in model.parameters()) == info["parameters"]
    assert model.config.to_dict()["hidden_size"] == builtin.builtin_config().hidden_size


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "recipes").glob("*_arithmetic.yaml")))
def test_every_builtin_recipe_starts_from_the_shipped_build(recipe: str) -> None:
    """A recipe whose warm-up or data range drifted from the shipped build would silently build locally."""
    config = load_recipe(REPO / "recipes" / recipe)
    if not config.model.policy.startswith(builtin.BUILTIN_PREFIX):
        pytest.skip(f"{recipe} does not start from the built-in model")
    key = builtin.build_key("arithmetic-tiny", config.model.warmup_steps, config.data)
    assert key == builtin.shipped_build("arithmetic-tiny")["key"], recipe


def test_default_build_is_the_shipped_copy(capsys: pytest.CaptureFixture[str]) -> None:
    folder = builtin.builtin_path("arithmetic-tiny", STEPS, DataSpec())
    assert folder.parent == builtin.cache_root() / "builtin" and folder.name.startswith("arithmetic-tiny-shipped-")
    assert sha256_file(folder / builtin.WEIGHTS) == sha256_file(SHIPPED / builtin.WEIGHTS)
    assert "locally" not in capsys.readouterr().err
    (folder / builtin.WEIGHTS).write_bytes(b"damaged")  # a damaged cached copy is replaced, never loaded
    assert sha256_file(builtin.builtin_path("arithmetic-tiny", STEPS, DataSpec()) / builtin.WEIGHTS) == sha256_file(
        SHIPPED / builtin.WEIGHTS
    )


def test_tampered_shipped_weights_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(SHIPPED, tmp_path / "arithmetic-tiny")
    weights = tmp_path / "arithmetic-tiny" / builtin.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    monkeypatch.setattr(builtin, "SHIPPED_ROOT", tmp_path)
    with pytest.raises(ModelError, match="do not match the sha256"):
        builtin.builtin_path("arithmetic-tiny", STEPS, DataSpec())


def test_other_builds_are_local_and_say_so(capsys: pytest.CaptureFixture[str]) -> None:
    folder = builtin.builtin_path("arithmetic-tiny", 2, DataSpec(max_operand=20, eval_size=50), progress=False)
    assert folder.name.startswith("arithmetic-tiny-w2-")
    assert json.loads((folder / "build.json").read_text())["built_with"]["cpu_capability"]
    (note,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rl-lora: built")]
    assert "locally built weights depend on this CPU's floating-point kernels" in note
    builtin.builtin_path("arithmetic-tiny", 2, DataSpec(max_operand=20, eval_size=50), progress=False)
    assert "rl-lora: built" not in capsys.readouterr().err  # reused from the cache, built once


_BUILD_ONE = """
import sys
from rl_lora.config.schema import DataSpec
from rl_lora.tasks.arithmetic.model import builtin_path
print(builtin_path("arithmetic-tiny", 3, DataSpec(min_operand=0, max_operand=19, eval_size=50), progress=False))
"""


def test_processes_building_one_model_on_a_cold_cache_build_it_once(tmp_path: Path) -> None:
    """The ranks of a multi-process run (or a sweep's jobs) asking for the same local build at once: one builds,
    the others wait for it and use its folder; none fails on the other's staging files."""
    import subprocess
    import sys

    from tests_support import subprocess_env

    env = {**subprocess_env(), "RL_LORA_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", _BUILD_ONE], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in outputs]
    folders = {out.strip() for out, _ in outputs}
    assert len(folders) == 1
    assert sum("built builtin:arithmetic-tiny locally" in err for _, err in outputs) == 1
    built = Path(folders.pop())
    assert (built / "build.json").is_file()
    assert [p.name for p in built.parent.iterdir() if ".tmp-" in p.name] == []
