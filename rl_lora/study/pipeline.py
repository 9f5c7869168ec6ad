"""Pipelines: several recipes run in order, each stage able to use what an earlier one saved.

The three-stage RLHF pipeline is the reason this exists: a supervised base (the built-in model's
warm-up), a reward model trained on preference pairs, then RL against that learned reward. A
pipeline file names its stages; each stage is an ordinary recipe plus dotted overrides, and an
override value may refer to an earlier stage's outputs as ``${<stage>.saved}`` (the folder its
adapter or model was saved to) or ``${<stage>.run_dir}``:

    name: rlhf_arithmetic
    stages:
      - name: reward_model
        recipe: ../rm_arithmetic.yaml            # relative to the pipeline file
      - name: policy
        recipe: ../grpo_arithmetic.yaml
        overrides:
          reward.functions: [{name: "learned:${reward_model.saved}"}]
          grpo.beta: 0.5

A stage may state what it must reach before later stages run, as least values of its summary.json keys
(``require: {final_pairwise_accuracy: 0.8}``); a stage that ends short stops the pipeline
(``on_shortfall: refuse``, the default) or says so and goes on (``warn``): optimising a policy against a
reward model that is wrong on many held-out pairs teaches the policy its errors.

Every stage runs as its own ``rl-lora run`` process into ``<output_dir>/<pipeline>-<time>/<stage>/``.
A stage whose folder holds ``summary.json`` is finished and never redone: ``--resume`` reruns an
interrupted pipeline from its first unfinished stage. ``pipeline.json`` in the pipeline folder lists
every stage with its held-out figures.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rl_lora.config.schema import apply_overrides, read_recipe_file, validate
from rl_lora.training.run_dir import write_json_atomic
from rl_lora.utils.errors import ConfigError

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_REFERENCE = re.compile(r"\$\{([^}]*)\}")
_OUTPUTS = ("saved", "run_dir")  # what a later stage may refer to
_TOP_KEYS = {"name", "stages", "output_dir"}
_STAGE_KEYS = {"name", "recipe", "overrides", "require", "on_shortfall"}


@dataclass(frozen=True)
class Stage:
    name: str
    recipe: Path
    overrides: dict[str, Any] = field(default_factory=dict)
    # summary.json key -> the least value the stage must end with before later stages run
    require: dict[str, float] = field(default_factory=dict)
    on_shortfall: str = "refuse"  # "refuse": stop the pipeline; "warn": say so and go on


@dataclass(frozen=True)
class Pipeline:
    name: str
    stages: list[Stage]
    output_dir: Path
    source: Path
    # ``key=value`` from the command line, applied to every stage after its own overrides (e.g. train.seed=2)
    common: tuple[str, ...] = ()


def is_pipeline(raw: dict[str, Any]) -> bool:
    return "stages" in raw


def _references(value: Any) -> list[str]:
    """Every ``${...}`` inside a (nested) override value."""
    if isinstance(value, str):
        return _REFERENCE.findall(value)
    if isinstance(value, dict):
        return [r for v in value.values() for r in _references(v)]
    if isinstance(value, list):
        return [r for v in value for r in _references(v)]
    return []


def _substitute(value: Any, outputs: dict[str, dict[str, str]]) -> Any:
    if isinstance(value, str):
        return _REFERENCE.sub(lambda m: outputs[m.group(1).split(".")[0]][m.group(1).split(".")[1]], value)
    if isinstance(value, dict):
        return {k: _substitute(v, outputs) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, outputs) for v in value]
    return value


def _checked_name(raw: dict[str, Any], keys: set[str], at: str, what: str, example: str) -> str:
    """``raw``'s name, after checking it has no key outside ``keys`` (errors say where, and what is allowed)."""
    unknown = sorted(set(raw) - keys)
    if unknown:
        raise ConfigError(f"{at}: unknown key '{unknown[0]}' ({what} has {', '.join(sorted(keys))})")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"{at}: 'name' must be a word like {example} (got {name!r})")
    return name


def _parse_stage(index: int, raw: Any, where: str, base: Path, earlier: list[str]) -> Stage:
    at = f"{where} stage {index + 1}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{at}: a stage must be a mapping with 'name' and 'recipe'")
    name = _checked_name(raw, _STAGE_KEYS, at, "a stage", "reward_model")
    if name in earlier:
        raise ConfigError(f"{at}: stage name '{name}' is used twice")
    at = f"{where} stage '{name}'"
    if not isinstance(raw.get("recipe"), str):
        raise ConfigError(f"{at}: 'recipe' (a recipe file, relative to the pipeline file) is missing")
    recipe = (base / raw["recipe"]).resolve()
    if not recipe.is_file():
        raise ConfigError(f"{at}: recipe '{raw['recipe']}' does not exist (looked for {recipe})")
    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{at}: 'overrides' must be a mapping of dotted keys to values")
    for key, value in overrides.items():
        for ref in _references(value):
            stage, _, output = ref.partition(".")
            if stage not in earlier:
                raise ConfigError(f"{at}: override '{key}' refers to '${{{ref}}}', but '{stage}' is not an "
                                  f"earlier stage (earlier: {', '.join(earlier) or 'none'})")
            if output not in _OUTPUTS:
                raise ConfigError(f"{at}: override '{key}' refers to '${{{ref}}}'; a stage's outputs are "
                                  + ", ".join(f"${{{stage}.{o}}}" for o in _OUTPUTS))
    require = raw.get("require") or {}
    if not isinstance(require, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in require.items()):
        raise ConfigError(f"{at}: 'require' must map summary.json keys to the least value each must reach "
                          "(e.g. final_pairwise_accuracy: 0.8)")
    on_shortfall = raw.get("on_shortfall", "refuse")
    if on_shortfall not in ("refuse", "warn"):
        raise ConfigError(f"{at}: 'on_shortfall' must be 'refuse' or 'warn' (got {on_shortfall!r})")
    return Stage(name, recipe, dict(overrides), {k: float(v) for k, v in require.items()}, on_shortfall)


def shortfalls(stage: Stage, summary: dict[str, Any]) -> list[str]:
    """What ``stage`` ended short of (its ``require`` against its summary.json), one phrase each."""
    out = []
    for key, least in stage.require.items():
        value = summary.get(key)
        if not isinstance(value, (int, float)):
            out.append(f"{key} is not in its summary.json")
        elif value < least:
            out.append(f"{key} {value:.3f} < {least:g}")
    return out


def _override_args(overrides: dict[str, Any]) -> list[str]:
    """Dotted ``key=value`` arguments for ``rl-lora run``; values as one-line YAML."""
    return [f"{key}={yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix('...').strip()}"
            for key, value in overrides.items()]


def _placeholder_outputs(stages: list[Stage], output_dir: Path) -> dict[str, dict[str, str]]:
    return {s.name: {"saved": str(output_dir / s.name / "adapter"), "run_dir": str(output_dir / s.name)}
            for s in stages}


def load_pipeline(path: str | Path, common: list[str] | tuple[str, ...] = ()) -> Pipeline:
    """Read a pipeline file and validate every stage's recipe with its overrides; loads no model.

    ``common`` are ``key=value`` overrides for every stage, applied after the stage's own (a seed, W&B off).
    """
    path = Path(path)
    raw = read_recipe_file(path)
    where = f"pipeline '{path}'"
    name = _checked_name(raw, _TOP_KEYS, where, "a pipeline", "rlhf_arithmetic")
    if not isinstance(raw.get("stages"), list) or not raw["stages"]:
        raise ConfigError(f"{where}: 'stages' must be a non-empty list")
    stages: list[Stage] = []
    for i, item in enumerate(raw["stages"]):
        stages.append(_parse_stage(i, item, where, path.parent, [s.name for s in stages]))
    pipeline = Pipeline(name, stages, Path(raw.get("output_dir", "runs")), path, tuple(common))
    # Validate each stage as it will run (references filled with where the outputs will be).
    outputs = _placeholder_outputs(stages, pipeline.output_dir)
    for stage in stages:
        overrides = _override_args(_substitute(stage.overrides, outputs)) + list(common)
        validate(apply_overrides(read_recipe_file(stage.recipe), overrides),
                 source=f"{where} stage '{stage.name}' (recipe '{stage.recipe.name}')")
    return pipeline


def _stage_outputs(run_dir: Path) -> dict[str, str]:
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    return {"saved": summary["saved"], "run_dir": str(run_dir)}


def _stage_record(stage: Stage, run_dir: Path) -> dict[str, Any]:
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    figures = {k: v for k, v in summary.items()
               if k.startswith(("start_", "final_", "best_")) or k in (
                   "held_out_metric", "train_seconds", "method", "overoptimization", "trained_steps")}
    return {"stage": stage.name, "recipe": str(stage.recipe), "algorithm": summary["algorithm"],
            "run_dir": str(run_dir), "saved": summary["saved"], **figures}


def _run_stage(stage: Stage, overrides: list[str], stage_dir: Path) -> int:
    command = [sys.executable, "-m", "rl_lora.cli", "run", str(stage.recipe), *overrides,
               f"logging.output_dir={stage_dir.parent}", f"logging.run_name={stage_dir.name}"]
    return subprocess.run(command, check=False).returncode


def run_pipeline(pipeline: Pipeline, resume: Path | None = None) -> tuple[Path, list[dict[str, Any]]]:
    """Run every unfinished stage in order; stops at the first failed stage (raising ConfigError).

    Returns the pipeline folder and one record per stage (its run folder and held-out figures).
    """
    from rl_lora.study.report import proxy_plot  # matplotlib: only where a pipeline draws, not in every run

    if resume is not None:
        if not (resume / "pipeline.json").is_file():
            raise ConfigError(f"--resume: '{resume}' is not a pipeline folder (no pipeline.json)")
        folder = resume
        recorded = json.loads((resume / "pipeline.json").read_text(encoding="utf-8")).get("overrides", [])
        if list(pipeline.common) != recorded:
            raise ConfigError(f"--resume: '{resume}' was started with the overrides {recorded or 'none'}, "
                              f"not {list(pipeline.common) or 'none'}; resume it with the same ones")
    else:
        folder = pipeline.output_dir / f"{pipeline.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        suffix = 1
        while folder.exists():
            suffix += 1
            folder = pipeline.output_dir / f"{pipeline.name}-{time.strftime('%Y%m%d-%H%M%S')}-{suffix}"
        folder.mkdir(parents=True)
    records: list[dict[str, Any]] = []
    outputs: dict[str, dict[str, str]] = {}
    manifest = {"pipeline": str(pipeline.source), "name": pipeline.name, "overrides": list(pipeline.common),
                "stages": records}
    write_json_atomic(folder / "pipeline.json", manifest)
    for number, stage in enumerate(pipeline.stages, start=1):
        stage_dir = folder / stage.name
        if (stage_dir / "summary.json").is_file():
            print(f"rl-lora: pipeline stage {number}/{len(pipeline.stages)} '{stage.name}': already finished",
                  file=sys.stderr, flush=True)
        else:
            shutil.rmtree(stage_dir, ignore_errors=True)  # a stage interrupted part-way starts again
            print(f"rl-lora: pipeline stage {number}/{len(pipeline.stages)} '{stage.name}': {stage.recipe.name}",
                  file=sys.stderr, flush=True)
            overrides = _override_args(_substitute(stage.overrides, outputs)) + list(pipeline.common)
            code = _run_stage(stage, overrides, stage_dir)
            if code != 0 or not (stage_dir / "summary.json").is_file():
                raise ConfigError(f"pipeline stage '{stage.name}' failed (exit {code}); earlier stages are kept "
                                  f"in {folder}; rerun with --resume {folder} once fixed")
        outputs[stage.name] = _stage_outputs(stage_dir)
        records.append(_stage_record(stage, stage_dir))
        plot = proxy_plot(stage_dir, folder / f"{stage.name}_proxy_vs_held_out.png")
        if plot is not None:
            records[-1]["proxy_plot"] = str(plot)
        write_json_atomic(folder / "pipeline.json", manifest)
        _check_requirements(stage, stage_dir, folder, is_last=number == len(pipeline.stages))
    return folder, records


def _check_requirements(stage: Stage, stage_dir: Path, folder: Path, is_last: bool) -> None:
    """Refuse (or warn about) going on from a stage that ended short of its ``require``."""
    short = shortfalls(stage, json.loads((stage_dir / "summary.json").read_text(encoding="utf-8")))
    if not short:
        return
    message = (f"pipeline stage '{stage.name}' ended short of what later stages need: {'; '.join(short)} "
               f"(its 'require' in the pipeline file)")
    if stage.on_shortfall == "refuse" and not is_last:
        raise ConfigError(f"{message}; the next stages would optimise against it. Improve the stage and rerun "
                          f"with --resume {folder} after deleting {stage_dir}, or set on_shortfall: warn")
    print(f"rl-lora: warning: {message}", file=sys.stderr, flush=True)


def summary_lines(folder: Path, records: list[dict[str, Any]]) -> list[str]:
    """One line per stage with its held-out figures, start -> final."""
    lines = [f"pipeline {folder}:"]
    for r in records:
        figures = [f"{k.removeprefix('final_').replace('_', ' ')} {r[k.replace('final_', 'start_')]:.3f} -> {r[k]:.3f}"
                   for k in r if k.startswith("final_") and isinstance(r[k], float)
                   and isinstance(r.get(k.replace("final_", "start_")), float)]
        rest = [f"{k.replace('_', ' ')} {r[k]:.3f}" for k in r
                if k.startswith("final_") and isinstance(r[k], float) and k.replace("final_", "start_") not in r]
        lines.append(f"  {r['stage']} ({r['algorithm']}, {r['method']}): " + "; ".join(figures + rest))
        for event in r.get("overoptimization") or []:
            lines.append(f"    over-optimization reported at step {event['step']} ({event['kind']})")
        if r.get("proxy_plot"):
            lines.append(f"    proxy vs held-out: {r['proxy_plot']}")
    return lines
