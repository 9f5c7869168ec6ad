"""docs/recipes.md's key table, generated from the recipe schema (rl_lora/config/schema.py), so it cannot drift.

Each row is one key: its dotted name, its type and bounds and its default as the schema declares them, and
its meaning from the field's ``description``. To change the table, change the schema, then::

    python -m rl_lora.config.docs           # rewrite the table in docs/recipes.md
    python -m rl_lora.config.docs --check   # exit 1 if the table differs (tests/test_config_docs.py checks it too)
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path
from typing import Any, Literal, TypeGuard, Union, get_args, get_origin

import annotated_types
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from rl_lora.config.schema import RECIPES, RecipeConfig

DOC = Path(__file__).resolve().parents[2] / "docs" / "recipes.md"
BEGIN = ("<!-- The key table is generated from the field descriptions in rl_lora/config/schema.py by "
         "`python -m rl_lora.config.docs`: edit those, not the table. -->")
END = "<!-- end of the generated key table -->"


def _is_section(annotation: Any) -> TypeGuard[type[BaseModel]]:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _bounds(field: FieldInfo) -> str:
    """The field's numeric bounds in words: "≥ 0", "> 0", "in [0, 1)", ..."""
    low = high = None
    for c in field.metadata:
        if isinstance(c, (annotated_types.Ge, annotated_types.Gt)):
            low = ("[", c.ge) if isinstance(c, annotated_types.Ge) else ("(", c.gt)
        elif isinstance(c, (annotated_types.Le, annotated_types.Lt)):
            high = ("]", c.le) if isinstance(c, annotated_types.Le) else (")", c.lt)
    if low and high:
        return f"in {low[0]}{low[1]:g}, {high[1]:g}{high[0]}"
    if low:
        return f"{'≥' if low[0] == '[' else '>'} {low[1]:g}"
    if high:
        return f"{'≤' if high[0] == ']' else '<'} {high[1]:g}"
    return ""


def _type_text(annotation: Any, bounds: str = "") -> str:
    """``int | None`` -> "int or null", ``Literal["a", "b"]`` -> "`a` / `b`", bounds after the number type."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " / ".join(f"`{a}`" for a in args)
    if origin in (Union, types.UnionType):
        given = [a for a in args if a is not type(None)]
        text = " or ".join(_type_text(a, bounds) for a in given)
        return f"{text} or null" if len(given) < len(args) else text
    if origin is list:
        return f"list of {_type_text(args[0])}"
    if origin is dict:
        return "mapping"
    if _is_section(annotation):
        return "`{" + ", ".join(annotation.model_fields) + "}`"
    name = annotation.__name__
    return f"{name} {bounds}" if bounds and name in ("int", "float") else name


def _default_text(field: FieldInfo) -> str:
    value = field.get_default(call_default_factory=True)
    if isinstance(value, list):
        value = [v.model_dump(exclude_defaults=True) if isinstance(v, BaseModel) else v for v in value]
    if isinstance(value, str):
        return f"`{value}`"
    text = yaml.safe_dump(value, default_flow_style=True, width=1_000).strip()
    return f"`{text.removesuffix('...').strip()}`"  # YAML ends a lone scalar's document with '...'


def key_rows(model: type[BaseModel] = RecipeConfig, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, meaning) for every key of ``model``, sections opened in place."""
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        if _is_section(field.annotation):
            rows.extend(key_rows(field.annotation, f"{key}."))
            continue
        if not field.description:
            raise ValueError(f"recipe key '{key}' has no description in rl_lora/config/schema.py: "
                             "the docs table needs one")
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        kind = str(extra.get("doc_type") or _type_text(field.annotation, _bounds(field)))
        rows.append((f"`{key}`", kind, _default_text(field), field.description))
    return rows


def recipe_rows() -> list[tuple[str, str, str, str]]:
    """The rows of every algorithm's recipe, each key once: the shared keys (``RecipeConfig``'s, whose
    ``algorithm`` lists them all), then each algorithm's own, each beside the rest of its section."""
    sections: dict[str, dict[str, tuple[str, str, str, str]]] = {}
    recipes: list[type[RecipeConfig]] = [RecipeConfig, *RECIPES.values()]
    for recipe in recipes:
        for row in key_rows(recipe):
            sections.setdefault(row[0].strip("`").split(".")[0], {}).setdefault(row[0], row)
    return [row for rows in sections.values() for row in rows.values()]


def key_table() -> str:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in recipe_rows()]
    return "\n".join(lines)


def with_table(doc: str) -> str:
    """``doc`` with the text between the markers replaced by the generated table."""
    if doc.count(BEGIN) != 1 or doc.count(END) != 1:
        raise ValueError(f"{DOC.name} needs the markers once each, around the key table:\n{BEGIN}\n{END}")
    head, rest = doc.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n\n{key_table()}\n\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rl_lora.config.docs", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the table differs; write nothing")
    args = parser.parse_args(argv)
    doc = DOC.read_text(encoding="utf-8")
    generated = with_table(doc)
    if args.check:
        if generated != doc:
            print(f"{DOC} differs from the schema: run python -m rl_lora.config.docs", file=sys.stderr)
            return 1
        return 0
    if generated != doc:
        DOC.write_text(generated, encoding="utf-8")
        print(f"wrote the key table in {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
