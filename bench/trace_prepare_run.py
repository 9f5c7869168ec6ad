"""Where a recipe's config goes while a run is prepared: the library modules whose functions receive it.

    python bench/trace_prepare_run.py [RECIPE]        # default: recipes/grpo_arithmetic.yaml

Runs ``prepare_run`` (the runner's setup: advice, run folder, model, adapter, trainer) on the recipe with
Python's profiler hook and records every call of an rl_lora function that receives the recipe's config
object, or one of its sections (``config.model``, ``config.lora``, ...), as an argument. It prints those
modules in order of first entry, the number of stays (a stay
ends when the next such call is in another module), and how many moves between stays climb from a lower
layer back to a higher one (docs/architecture.md's order; flat modules before the layers count as none).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

LAYERS = ("utils", "config", "models", "adapters", "data", "tasks", "training", "algorithms", "estimate", "launch",
          "study")


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 2 and parts[1] in LAYERS else None


def main() -> None:
    recipe = sys.argv[1] if len(sys.argv) > 1 else "recipes/grpo_arithmetic.yaml"
    import rl_lora

    try:
        from rl_lora.launch.runner import prepare_run
    except ImportError:  # the flat layout before the layers
        from rl_lora.runner import prepare_run  # type: ignore[no-redef]
    out = tempfile.mkdtemp(prefix="trace-")
    config = rl_lora.load_recipe(recipe, [f"logging.output_dir={out}", "logging.wandb=false"]) if hasattr(
        rl_lora, "load_recipe") else __import__("rl_lora.config", fromlist=["load_recipe"]).load_recipe(
        recipe, [f"logging.output_dir={out}", "logging.wandb=false"])
    stays: list[str] = []
    carried = {id(config)} | {id(getattr(config, f)) for f in type(config).model_fields
                              if hasattr(type(getattr(config, f)), "model_fields")}

    def hook(frame, event, arg):  # noqa: ANN001, ANN202
        if event != "call":
            return
        name = frame.f_globals.get("__name__", "")
        if not name.startswith("rl_lora") or not any(id(v) in carried for v in frame.f_locals.values()):
            return
        if not stays or stays[-1] != name:
            stays.append(name)

    sys.setprofile(hook)
    try:
        prepare_run(config)
    finally:
        sys.setprofile(None)
    modules = list(dict.fromkeys(stays))
    climbs = sum(1 for a, b in zip(stays, stays[1:], strict=False)
                 if _layer(a) is not None and _layer(b) is not None and _layer(b) > _layer(a))
    print(f"modules entered: {len(modules)}; stays: {len(stays)}; moves to a higher layer: {climbs}")
    for name in modules:
        print(f"  {name} ({stays.count(name)})")
    print(f"run folder under {Path(out)}")


if __name__ == "__main__":
    main()
