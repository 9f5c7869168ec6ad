"""The option names of the library config classes a recipe passes options to: TRL's trainer configs
(``trl:``) and PEFT's adapter configs (``lora.adapter_options``).

A recipe's options are checked before the heavy libraries load (importing TRL or PEFT loads torch: seconds
on 2 cores), so the names come from a snapshot, ``option_names.json`` beside this file, taken with
``dataclasses.fields`` on the real classes under the versions it records (TRL is pinned exactly; the
snapshot also records transformers, whose ``TrainingArguments`` TRL's configs extend, and PEFT). Where the
installed versions differ from the snapshot's, the answer is None and the check waits for the real import
in the trainer, which refuses an unknown option itself. ``tests/test_config.py`` checks the snapshot against
the installed classes.

    python -m rl_lora.config.option_snapshot            # rewrite option_names.json from the installed classes
    python -m rl_lora.config.option_snapshot --check    # exit 1 if it differs
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

SNAPSHOT = Path(__file__).with_name("option_names.json")
# library -> (the distributions whose versions its classes depend on, module, class names)
CLASSES: dict[str, tuple[tuple[str, ...], str, tuple[str, ...]]] = {
    "trl": (("trl", "transformers"), "trl", ("GRPOConfig", "DPOConfig", "RewardConfig")),
    "peft": (("peft",), "peft", ("LoraConfig", "VeraConfig", "TinyLoraConfig", "MissConfig")),
}


def _installed(distribution: str) -> str | None:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


@functools.cache
def _snapshot() -> dict[str, Any]:
    return json.loads(SNAPSHOT.read_text(encoding="utf-8"))


def option_names(library: str, class_name: str) -> frozenset[str] | None:
    """The options of ``class_name`` (a class of ``library``, "trl" or "peft") as the snapshot records them,
    or None where the installed versions are not the snapshot's or the class is not in it."""
    snapshot = _snapshot()
    distributions, _, _ = CLASSES[library]
    if any(snapshot["versions"].get(d) != _installed(d) for d in distributions):
        return None
    names = snapshot[library].get(class_name)
    return frozenset(names) if names is not None else None


def take() -> dict[str, Any]:
    """The snapshot of the installed classes: TRL's configs with every field (their bases' included, since
    ``trl:`` may set any), PEFT's with the fields each class declares itself (the adapter's own options)."""
    import dataclasses
    import importlib

    out: dict[str, Any] = {"versions": {}}
    for library, (distributions, module_name, class_names) in CLASSES.items():
        module = importlib.import_module(module_name)
        out["versions"].update({d: _installed(d) for d in distributions})
        out[library] = {}
        for name in class_names:
            cls = getattr(module, name)
            if library == "trl":
                fields = {f.name for f in dataclasses.fields(cls)}
            else:
                fields = set(vars(cls).get("__annotations__", {})) & {f.name for f in dataclasses.fields(cls)}
            out[library][name] = sorted(f for f in fields if not f.startswith("_"))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rl_lora.config.option_snapshot",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="exit 1 if option_names.json differs; write nothing")
    args = parser.parse_args(argv)
    text = json.dumps(take(), indent=1, sort_keys=True) + "\n"
    if args.check:
        same = SNAPSHOT.is_file() and SNAPSHOT.read_text(encoding="utf-8") == text
        print("option_names.json is current" if same else "option_names.json differs from the installed classes")
        return 0 if same else 1
    SNAPSHOT.write_text(text, encoding="utf-8")
    print(f"wrote {SNAPSHOT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
