"""The tree shows the layers, and imports point one way (docs/architecture.md).

``rl_lora``'s subpackages are ordered from the bottom up (LAYERS); a module may import modules of its own
layer or of a layer below it, never one above. No two modules import each other, directly or round a
circle. ``reward_models`` (the rewards and their protocol) imports nothing of ``rl_lora``, so a reward can
be written, imported and tested without the library.

Imports are read from the source (every ``import`` and ``from ... import`` of every module, including those
inside functions), not from a running interpreter, so an import made only on some code path counts.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Bottom to top. The top two are the entry points: the command line and the public Python API.
LAYERS = ("utils", "config", "models", "adapters", "data", "tasks", "training", "algorithms", "estimate", "launch",
          "study", "__init__", "cli")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path: Path, modules: set[str]) -> set[str]:
    """The project modules a file imports: ``from a.b import c`` counts as a.b.c where c is a module."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names
                         if f"{node.module}.{alias.name}" in modules)
    return {n for n in names if n in modules}


def module_graph() -> dict[str, set[str]]:
    """{module: project modules it imports} over rl_lora and reward_models."""
    paths = {_module_name(p): p for package in ("rl_lora", "reward_models") for p in (ROOT / package).rglob("*.py")}
    graph = {name: _imported(path, set(paths)) for name, path in paths.items()}
    # Importing a.b.c runs a/__init__.py and a/b/__init__.py first; those are not edges of the design.
    return {name: {t for t in targets if not name.startswith(t + ".")} for name, targets in graph.items()}


def layer(module: str) -> str | None:
    """The layer of an rl_lora module (its subpackage, or the module itself at the top); None outside rl_lora."""
    parts = module.split(".")
    if parts[0] != "rl_lora":
        return None
    return "__init__" if len(parts) == 1 else parts[1]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for source, targets in graph.items():
        if layer(source) is None:
            continue
        for target in targets:
            if layer(target) is not None and LAYERS.index(layer(target)) > LAYERS.index(layer(source)):
                found.append(f"{source} ({layer(source)}) -> {target} ({layer(target)})")
    return sorted(found)


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle in the graph as [a, b, ..., a], or None when it is acyclic."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_every_subpackage_has_a_layer() -> None:
    subpackages = {p.name for p in (ROOT / "rl_lora").iterdir() if (p / "__init__.py").is_file()}
    modules = {p.stem for p in (ROOT / "rl_lora").glob("*.py")}
    assert subpackages | modules == set(LAYERS), "give each subpackage a place in LAYERS and docs/architecture.md"


def test_no_module_imports_a_layer_above_its_own() -> None:
    assert upward_imports(module_graph()) == []


def test_no_import_circle() -> None:
    found = cycle(module_graph())
    assert found is None, "import circle: " + " -> ".join(found or [])


def test_the_checks_can_fail() -> None:
    """The scans find what they are meant to: a planted upward import and a planted circle."""
    graph = module_graph()
    assert graph["rl_lora.launch.runner"], "the scan reads no imports"
    planted = {**graph, "rl_lora.utils.errors": {"rl_lora.study.report"}}
    assert upward_imports(planted) == ["rl_lora.utils.errors (utils) -> rl_lora.study.report (study)"]
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_rewards_import_nothing_of_the_library() -> None:
    graph = module_graph()
    offenders = [f"{s} -> {t}" for s, targets in graph.items() if s.startswith("reward_models")
                 for t in targets if t.startswith("rl_lora")]
    assert offenders == []
    assert any(t.startswith("reward_models") for t in graph["rl_lora.tasks.rewards"]), "the scan missed an edge"


def test_importing_the_rewards_loads_no_library_module() -> None:
    code = (
        "import sys, reward_models, reward_models.exact_answer, reward_models.shaping\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'rl_lora'))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         timeout=300)
    assert out.stdout.strip() == "[]"


def test_the_study_layer_and_the_light_checks_load_no_torch() -> None:
    """Sweeps, reports and dashboards read files; the policy resolver and the config run before the heavy
    libraries load. None of them may pull in torch (seconds on 2 cores, and a GPU runtime on a cluster)."""
    modules = ["rl_lora.study.sweep", "rl_lora.study.report", "rl_lora.study.dashboards", "rl_lora.study.pipeline",
               "rl_lora.config.schema", "rl_lora.models.policies", "rl_lora.models.tokenizer_files",
               "rl_lora.data.preferences"]
    code = f"import sys\nfor m in {modules!r}: __import__(m)\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         timeout=300)
    assert out.stdout.strip() == "False"


def test_a_run_loads_no_plotting_library() -> None:
    """``rl-lora run`` (the command line and the pipeline check it makes first) and every layer a run passes
    through load no matplotlib: about 0.8 CPU-s in each process of a run, its launcher and torchrun's workers
    included. Plots are drawn by the study layer, after runs."""
    code = "import sys, rl_lora.cli, rl_lora.study.pipeline\nprint('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         timeout=300)
    assert out.stdout.strip() == "False"
    run_layers = [p for p in (ROOT / "rl_lora").rglob("*.py") if p.relative_to(ROOT / "rl_lora").parts[0] != "study"]
    assert len(run_layers) > 30, "the scan found too few modules"
    plotting = [str(p.relative_to(ROOT)) for p in run_layers
                if any(line.startswith(("import matplotlib", "from matplotlib")) for line in p.read_text().split("\n"))]
    assert plotting == []


def test_layers_are_documented() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    missing = [name for name in LAYERS[:-2] if f"`{name}/`" not in text]
    assert not missing, f"docs/architecture.md does not describe {missing}"


def _algorithm_branches(path: Path) -> list[int]:
    """Lines where ``<x>.algorithm`` is compared with a literal algorithm name (== / != / in / not in)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        reads_algorithm = any(isinstance(s, ast.Attribute) and s.attr == "algorithm" for s in sides)
        literals = [c for s in sides for c in ast.walk(s) if isinstance(c, ast.Constant) and isinstance(c.value, str)]
        if reads_algorithm and literals:
            lines.append(node.lineno)
    return lines


def test_no_module_outside_the_algorithms_branches_on_an_algorithm_name() -> None:
    """What an algorithm is lives in rl_lora/config/algorithms.py (a light table) and its own module under
    rl_lora/algorithms/; everything else reads the table's facts instead of testing the name."""
    offenders = [f"{path.relative_to(ROOT)}:{line}" for path in sorted((ROOT / "rl_lora").rglob("*.py"))
                 if not path.is_relative_to(ROOT / "rl_lora" / "algorithms") and path.name != "algorithms.py"
                 for line in _algorithm_branches(path)]
    assert offenders == []
    assert _algorithm_branches_in('if config.algorithm in ("dpo", "reward"):\n    pass\n') == [1]


def _algorithm_branches_in(source: str) -> list[int]:
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(source)
    try:
        return _algorithm_branches(Path(f.name))
    finally:
        Path(f.name).unlink()


@pytest.mark.xdist_group("suite-grouping-check")
def test_the_tests_of_one_xdist_group_go_to_one_worker(request: pytest.FixtureRequest) -> None:
    """Under the README's ``-n 2 --dist loadgroup``, pytest-xdist sends a group's tests to one worker by adding
    the group to each test's node id. pytest 9.2 keeps node ids where xdist 3.8 does not write, so the groups
    were split: module fixtures (2-process runs, the Ray cluster) built once per worker, and two Ray clusters
    on the same loopback addresses at once. pyproject.toml keeps pytest below 9; this fails if that breaks."""
    if request.config.getoption("loadgroup", default=False):  # set on xdist workers only
        assert request.node.nodeid.endswith("@suite-grouping-check"), request.node.nodeid
