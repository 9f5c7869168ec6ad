"""The packages' dependencies point one way: rl_lora (the library) imports reward_models (the rewards and
their protocol), and reward_models imports nothing of rl_lora, so a reward can be written, imported and
tested without the library, and importing one never drags in the model-loading stack.

Imports are read from the source (every ``import`` and ``from ... import`` of every module, including
those inside functions), not from a running interpreter, so an import made only on some code path counts.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rl_lora", "reward_models")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path: Path) -> set[str]:
    """The absolute module names a file imports (a relative import cannot leave its top-level package)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def package_imports() -> dict[str, dict[str, list[str]]]:
    """{package: {other package: ["module -> imported module", ...]}} between the project's packages."""
    edges: dict[str, dict[str, list[str]]] = {p: defaultdict(list) for p in PACKAGES}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for name in sorted(_imported(path)):
                target = name.split(".")[0]
                if target in PACKAGES and target != package:
                    edges[package][target].append(f"{_module_name(path)} -> {name}")
    return edges


def _cycle(edges: dict[str, dict[str, list[str]]]) -> list[str] | None:
    """One cycle in the package graph as [a, b, ..., a], or None when it is acyclic."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in edges.get(node, {}):
            if state.get(nxt) == "open":
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = "done"
        return None

    for start in edges:
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_the_package_graph_has_no_cycle() -> None:
    edges = package_imports()
    cycle = _cycle(edges)
    assert cycle is None, "import cycle " + " -> ".join(cycle) + ": " + "; ".join(
        line for a, b in zip(cycle, cycle[1:], strict=False) for line in edges[a][b]
    )


def test_rewards_import_nothing_of_the_library() -> None:
    assert not package_imports()["reward_models"]["rl_lora"]


def test_the_library_uses_the_rewards() -> None:
    # The scan sees the imports it is meant to judge: without this edge the two tests above prove nothing.
    assert any("rl_lora.rewards -> reward_models" in line for line in package_imports()["rl_lora"]["reward_models"])


def test_the_scan_finds_a_cycle() -> None:
    assert _cycle({"a": {"b": ["a.x -> b"]}, "b": {"a": ["b.y -> a.z"]}}) == ["a", "b", "a"]
    assert _cycle({"a": {"b": ["a.x -> b"]}, "b": {}}) is None


def test_importing_the_rewards_loads_no_library_module() -> None:
    code = (
        "import sys, reward_models, reward_models.exact_answer, reward_models.shaping\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'rl_lora'))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
