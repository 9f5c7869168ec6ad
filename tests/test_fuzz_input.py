"""Fuzzed bad input (issue #28): mutated recipes and data rows either validate or are refused with one line.

Hypothesis mutates a valid recipe (keys deleted, added or misspelled; values of other types, out of range,
huge, unicode, nested one level deeper; sections replaced by scalars; command-line overrides) and the rows of the
files a recipe reads (DPO / reward-model preference pairs and the dataset task's prompts: fields missing, of other
types, empty, huge, unicode, lone surrogates, malformed JSON, bytes that are not UTF-8, empty files). Every case
runs ``rl-lora validate`` in this process through ``rl_lora.cli.main`` (the precheck ``rl-lora run`` runs first)
and must end with exit code 0, or exit code 2 and exactly one ``rl-lora: error:`` line: never a traceback (an
exception out of ``main``), and never a file or folder left behind (validate writes nothing). Data cases whose
recipe validates also run the run's own checks before any model loads (the algorithm's ``check``, which reads
the rows again with the policy's tokenizer), which must pass or raise one of the user errors.

CI runs a bounded number of examples (``RL_LORA_FUZZ_EXAMPLES``, default 60 recipes and 60 data cases);
docs/reliability.md gives the counts of the larger run and what it found.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rl_lora.cli import main
from rl_lora.utils.errors import USER_ERRORS
from rl_lora.utils.text import lone_surrogate

EXAMPLES = int(os.environ.get("RL_LORA_FUZZ_EXAMPLES", "60"))
OUTCOMES: Counter[str] = Counter()  # cases tried per outcome, shrinking included; RL_LORA_FUZZ_REPORT: appended to


def _report(name: str) -> None:
    path = os.environ.get("RL_LORA_FUZZ_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{name}: {dict(OUTCOMES)}\n")
    OUTCOMES.clear()
FUZZ = settings(max_examples=EXAMPLES, deadline=timedelta(seconds=5), derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- the inputs ------------------------------------------------------------------------------------------------
def _base_recipes(out: Path, prefs: Path, prompts: Path) -> dict[str, dict[str, Any]]:
    """Valid recipes of each algorithm on the built-in model, each reading the fuzzed files where it reads any."""
    common = {
        "model": {"policy": "builtin:arithmetic-tiny", "warmup_steps": 0},
        "lora": {"rank": 1},
        "train": {"steps": 2, "batch_size": 4, "lr": 1e-3},
        "logging": {"output_dir": str(out), "wandb": False, "progress": False},
    }
    return {
        "grpo": {**common, "algorithm": "grpo", "grpo": {"num_generations": 4, "max_completion_length": 4},
                 "reward": {"functions": [{"name": "exact_answer"}]}},
        "grpo-dataset": {**common, "algorithm": "grpo", "grpo": {"num_generations": 4, "max_completion_length": 4},
                         "reward": {"functions": [{"name": "exact_answer"}]},
                         "data": {"task": "dataset", "source": str(prompts)}},
        "ppo": {**common, "algorithm": "ppo", "ppo": {"samples_per_prompt": 2, "minibatch_size": 4},
                "reward": {"functions": [{"name": "exact_answer"}]}},
        "dpo": {**common, "algorithm": "dpo", "data": {"preferences": str(prefs)}, "dpo": {"beta": 0.5}},
        "reward": {**common, "algorithm": "reward", "data": {"preferences": str(prefs)}},
    }


PREFERENCE_ROWS = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)}
                   for a in range(10, 13) for b in range(10, 13)]
PROMPT_ROWS = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(10, 13) for b in range(10, 13)]

_text = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["", " ", "\n", "é", "数学", "🙂", "\u200b", "\x00", "a" * 5000, "=", ".", "[", "{", "~", "null",
                     "yes", "1e999", "-1", "nan", "builtin:", "learned:", "../../etc/passwd", "\ud800", "a\rb"]),
)
_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(), st.sampled_from([0, -1, 1, 2**63, -(2**70), 10**100]),
    st.floats(allow_nan=True, allow_infinity=True), _text,
)
_value = st.recursive(_scalar, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(_text, inner, max_size=3)), max_leaves=6)


def _paths(tree: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path of a nested mapping/list (list items by index)."""
    out = [prefix] if prefix else []
    if isinstance(tree, dict):
        for k, v in tree.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out += _paths(v, (*prefix, i))
    return out


def _parent(tree: Any, path: tuple) -> Any:
    for key in path[:-1]:
        tree = tree[key]
    return tree


@st.composite
def mutated_recipes(draw: st.DrawFn, bases: dict[str, dict[str, Any]]) -> tuple[str | dict, list[str]]:
    """(a recipe mapping, or the raw text of a recipe file) and command-line overrides."""
    recipe = json.loads(json.dumps(bases[draw(st.sampled_from(sorted(bases)))]))
    for _ in range(draw(st.integers(1, 4))):
        paths = _paths(recipe)
        kind = draw(st.sampled_from(["delete", "set", "add", "retype", "nest", "section"]))
        path = draw(st.sampled_from(paths)) if paths else ()
        if not path:
            kind = "add"
        if kind == "delete":
            parent = _parent(recipe, path)
            del parent[path[-1]]
        elif kind == "set":
            _parent(recipe, path)[path[-1]] = draw(_value)
        elif kind == "retype":  # the same value as another type: "4" for 4, [4] for 4, 4 for "4"
            parent = _parent(recipe, path)
            old = parent[path[-1]]
            parent[path[-1]] = draw(st.sampled_from([str(old), [old], {"value": old}, None, len(str(old))]))
        elif kind == "nest":
            parent = _parent(recipe, path)
            parent[path[-1]] = {draw(_text): parent[path[-1]]}
        elif kind == "section":
            section = draw(st.sampled_from(["model", "lora", "data", "train", "logging", "guard", "distributed",
                                            "advisor", "trl", "dpo", "grpo", "ppo", "reward", "reward_model"]))
            recipe[section] = draw(_value)
        else:  # a key nobody reads, at the top or in a section; sometimes a near miss of a real one
            where = draw(st.sampled_from([(), *[p for p in paths if isinstance(_get(recipe, p), dict)]]))
            key = draw(st.one_of(_text, st.sampled_from(["lora_rank", "rnak", "algoritm", "loss_typ", "stepps"])))
            _get(recipe, where)[key] = draw(_value)
    raw: str | dict = recipe
    form = draw(st.sampled_from(["mapping"] * 6 + ["truncated", "text", "tabs", "list"]))
    if form == "truncated":
        text = yaml.safe_dump(recipe, allow_unicode=True)
        raw = text[: draw(st.integers(0, len(text)))]
    elif form == "text":
        raw = draw(st.text(max_size=200))
    elif form == "tabs":
        raw = "\t" + yaml.safe_dump(recipe).replace("  ", "\t")
    elif form == "list":
        raw = yaml.safe_dump([recipe])
    overrides = draw(st.lists(st.one_of(
        st.builds(lambda k, v: f"{k}={v}", st.sampled_from(["lora.rank", "train.steps", "data.task", "trl.bf16",
                                                             "model.policy", "guard.action", "x.y", "lora", "a..b",
                                                             "train.lr", "reward.functions"]), _text),
        _text.filter(lambda t: "=" in t and not t.startswith("-")),
    ), max_size=2))
    return raw, overrides


def _get(tree: Any, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _json_line(row: Any, ascii_only: bool) -> str:
    return json.dumps(row, ensure_ascii=ascii_only, allow_nan=True)


@st.composite
def mutated_rows(draw: st.DrawFn, base: list[dict[str, Any]]) -> bytes:
    """The bytes of a JSONL (or JSON) file of ``base``'s rows, mutated."""
    rows: list[Any] = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(0, 4))):
        if not rows:
            break
        i = draw(st.integers(0, len(rows) - 1))
        kind = draw(st.sampled_from(["drop", "missing", "type", "empty", "huge", "unicode", "extra", "whole",
                                     "surrogate", "chat"]))
        row = rows[i]
        field = draw(st.sampled_from(sorted(row))) if isinstance(row, dict) and row else None
        if kind == "drop":
            del rows[i]
        elif kind == "whole":
            rows[i] = draw(_value)
        elif field is None:
            continue
        elif kind == "missing":
            del row[field]
        elif kind == "type":
            row[field] = draw(_value)
        elif kind == "empty":
            row[field] = draw(st.sampled_from(["", " ", [], {}, None]))
        elif kind == "huge":
            row[field] = "1" * draw(st.sampled_from([10_000, 200_000]))
        elif kind == "unicode":
            row[field] = draw(st.text(min_size=1, max_size=30))
        elif kind == "surrogate":
            row[field] = "\ud800" + str(row[field])  # survives ensure_ascii JSON as an escape, not as UTF-8
        elif kind == "chat":
            row[field] = draw(st.sampled_from([[{"role": "user", "content": "hi"}], [{"role": "user"}],
                                               [{"content": 3}], ["hi"], [{"role": "x", "content": "y"}]]))
        else:
            row[draw(_text)] = draw(_value)
    form = draw(st.sampled_from(["jsonl"] * 5 + ["json", "garbage-line", "truncated", "bytes", "empty", "bom"]))
    ascii_only = draw(st.booleans())
    lines = [_json_line(r, ascii_only) for r in rows]
    if form == "json":
        return json.dumps(rows, ensure_ascii=ascii_only, allow_nan=True).encode("utf-8", "surrogatepass")
    if form == "garbage-line" and lines:
        lines.insert(draw(st.integers(0, len(lines))), draw(st.sampled_from(["{", "}", "[1,", "nul", "{'a': 1}",
                                                                            "\"str\"", "1", "[]", ""])))
    text = "\n".join(lines) + "\n"
    if form == "truncated":
        text = text[: draw(st.integers(0, len(text)))]
    data = text.encode("utf-8", "surrogatepass")
    if form == "bytes":
        data = data[: len(data) // 2] + b"\xff\xfe\xc3(" + data[len(data) // 2:]
    elif form == "empty":
        data = draw(st.sampled_from([b"", b"\n", b"\n\n  \n"]))
    elif form == "bom":
        data = b"\xef\xbb\xbf" + data
    return data


# -- the check -------------------------------------------------------------------------------------------------
def _validate(argv: list[str]) -> tuple[int, str, str]:
    """``rl-lora validate`` in this process: (exit code, stdout, stderr); an exception out of main is a bug."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["validate", *argv])
    return code, out.getvalue(), err.getvalue()


def _check_outcome(code: int, out: str, err: str, case: str) -> None:
    assert code in (0, 2), f"{case}: exit code {code}\n{err}"
    OUTCOMES["validates" if code == 0 else "refused in one line"] += 1
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("rl-lora: error: "), f"{case}: not one line:\n{err}"
    assert "Traceback" not in err, f"{case}:\n{err}"


def _nothing_written(work: Path, before: set[Path], case: str) -> None:
    after = set(work.rglob("*"))
    assert after == before, f"{case}: validate wrote {sorted(map(str, after - before))[:5]}"


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder for the fuzzed files, made the working folder while the fuzz runs (relative paths land there)."""
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "in").mkdir()
    (folder / "runs").mkdir()
    return folder


@contextlib.contextmanager
def _inside(folder: Path):  # type: ignore[no-untyped-def]
    here = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(here)


def test_fuzzed_recipes_validate_or_are_refused_in_one_line(work: Path) -> None:
    prefs, prompts = work / "in" / "prefs.jsonl", work / "in" / "prompts.jsonl"
    prefs.write_text("".join(json.dumps(r) + "\n" for r in PREFERENCE_ROWS))
    prompts.write_text("".join(json.dumps(r) + "\n" for r in PROMPT_ROWS))
    bases = _base_recipes(work / "runs", prefs, prompts)
    recipe = work / "in" / "recipe.yaml"
    for name, base in bases.items():  # the unmutated recipes validate
        recipe.write_text(yaml.safe_dump(base))
        with _inside(work):
            code, _, err = _validate([str(recipe)])
        assert code == 0, f"{name}: {err}"
    before = set(work.rglob("*"))

    @FUZZ
    @given(mutated_recipes(bases))
    def one(case: tuple[str | dict, list[str]]) -> None:
        raw, overrides = case
        text = raw if isinstance(raw, str) else yaml.safe_dump(raw, allow_unicode=True)
        if not isinstance(raw, str) and lone_surrogate(raw) is not None:
            text = yaml.safe_dump(raw)  # lone surrogates as YAML's \ud800 escapes, as a user would write them
        recipe.write_bytes(text.encode("utf-8", "surrogatepass"))  # else as bytes that are not UTF-8
        with _inside(work):
            code, out, err = _validate([str(recipe), *overrides])
        _check_outcome(code, out, err, f"recipe {ascii(text[:300])} overrides {ascii(overrides)}")
        _nothing_written(work, before, f"recipe {ascii(text[:300])}")

    OUTCOMES.clear()
    one()
    _report("recipes")


@pytest.mark.parametrize("kind", ["dpo", "reward", "grpo-dataset"])
def test_fuzzed_data_rows_validate_or_are_refused_in_one_line(work: Path, kind: str) -> None:
    data = work / "in" / f"rows-{kind}.jsonl"
    base_rows = PROMPT_ROWS if kind == "grpo-dataset" else PREFERENCE_ROWS
    data.write_text("".join(json.dumps(r) + "\n" for r in base_rows))
    base = _base_recipes(work / "runs", data, data)[kind]
    recipe = work / "in" / f"recipe-{kind}.yaml"
    recipe.write_text(yaml.safe_dump(base))
    with _inside(work):
        assert _validate([str(recipe)])[0] == 0
    from rl_lora.config.schema import load_recipe

    config = load_recipe(str(recipe), [])
    before = set(work.rglob("*"))
    checker = _run_checks(kind)

    @settings(FUZZ, max_examples=max(1, EXAMPLES // 3))
    @given(mutated_rows(base_rows))
    def one(content: bytes) -> None:
        data.write_bytes(content)
        with _inside(work):
            code, out, err = _validate([str(recipe)])
            _check_outcome(code, out, err, f"rows {content[:300]!r}")
            if code == 0 and checker is not None:  # what `rl-lora run` checks next, still before any folder
                try:
                    checker(config)
                except USER_ERRORS as exc:
                    assert "\n" not in str(exc).strip(), f"rows {content[:300]!r}: {exc}"
        _nothing_written(work, before, f"rows {content[:300]!r}")

    OUTCOMES.clear()
    one()
    _report(f"rows {kind}")


def _run_checks(kind: str) -> Any:
    """The algorithm's ``check`` (rl_lora/algorithms/contract.py): the run's checks before any model loads."""
    if kind == "grpo-dataset":
        return None  # the dataset task's rows are read by the precheck's task check, the same code
    from rl_lora.launch.runner import algorithm_for

    return lambda config: algorithm_for(config).check(config)
