"""rl-lora: RLHF and DPO with very-low-rank LoRA, measured against full-parameter baselines.

The public Python API, for notebooks and scripts (docs/api.md); the ``rl-lora`` command is a thin layer over
it. Everything else in the package is internal and may move between releases.

    import rl_lora
    config = rl_lora.load_recipe("recipes/grpo_arithmetic.yaml", ["train.steps=20"])
    print("\\n".join(rl_lora.plan_lines(rl_lora.plan(config))))
    result = rl_lora.run(config)           # trains, evaluates, saves; result.summary is summary.json

Importing the package loads neither torch nor TRL: each function imports what it needs when called.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rl_lora.config.schema import RecipeConfig
    from rl_lora.estimate.plan import Plan
    from rl_lora.launch.runner import RunResult
    from rl_lora.study.sweep import Outcome

__all__ = ["capacity", "load_recipe", "plan", "plan_lines", "report", "run", "sweep"]


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> RecipeConfig:
    """A recipe file read, with dotted overrides (``"lora.rank=4"``) applied, and validated; loads no model.

    Raises ConfigError naming the offending key (and the nearest valid one)."""
    from rl_lora.config.schema import load_recipe as _load

    return _load(path, list(overrides))


def run(config: RecipeConfig, resume: str | Path | bool = False) -> RunResult | None:
    """Train, evaluate and save one recipe on this process; the run folder and its summary.json's contents.

    ``resume``: a run folder to continue from its newest complete checkpoint, or True for the newest run of
    this recipe. None on ranks other than 0 of a multi-process run (rank 0 writes the summary).
    """
    import os

    if not os.path.exists("/dev/nvidiactl"):
        # DeepSpeed (imported by TRL/accelerate) otherwise warns on every CPU run that it fell back to CPU.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if resume is False:  # plug-ins and data files, in a second or two; nothing loaded, nothing written
        from rl_lora.launch.precheck import precheck

        precheck(config)
    from rl_lora.launch.runner import run_recipe  # heavy imports only once the recipe is known to be good

    folder = None if isinstance(resume, bool) else str(resume)
    return run_recipe(config, resume=folder, resuming=resume is not False)


def plan(config: RecipeConfig, devices: int = 1, device_memory: str | int = "80GB",
         prompt_tokens: int | None = None) -> Plan:
    """Memory per device and FLOPs of the recipe, full-parameter against its adapter; loads no weights."""
    from rl_lora.estimate.plan import make_plan, parse_memory

    memory = parse_memory(device_memory) if isinstance(device_memory, str) else device_memory
    return make_plan(config, devices, memory, prompt_tokens)


def plan_lines(result: Plan) -> list[str]:
    """A plan as the table ``rl-lora plan`` prints."""
    from rl_lora.estimate.plan_text import plan_lines as _lines

    return _lines(result)


def capacity(config: RecipeConfig) -> list[str]:
    """The capacity estimate (adapter bits against the data's bits) and the guardrails' advice, as lines."""
    from rl_lora.estimate.advisor import capacity_lines

    return capacity_lines(config)


def sweep(recipe: str | Path, *, ranks: str = "1,4,16,full", seeds: str | None = None, lrs: str | None = None,
          lr_points: int = 5, lr_step: float = 2.0, selection_seeds: str = "1,2", select_last: int = 2,
          margin: float | None = None, targets: Sequence[str] | None = None, match_params: bool = False,
          batch_sizes: str | None = None, overrides: Sequence[str] = (), name: str | None = None,
          output_dir: str | Path = "sweeps", jobs: int = 1, lr_multipliers: str | None = None,
          ray: str | None = None, devices: str | None = None, device_memory: str | None = None,
          adapters: str | None = None) -> tuple[Path, Outcome]:
    """Run a sweep (each method at its own best LR when ``lrs`` is given) and return its folder and outcome.

    The arguments take the same text as ``rl-lora sweep``'s options (docs/sweeps.md): ``ranks="1,16,full"``,
    ``lrs="auto"``, ``seeds="3,4,5,6"``. A restarted sweep finishes only what is missing.

    ``ray``: run every run as a Ray task (docs/cluster.md): ``"auto"`` or a cluster's ``"HOST:PORT"``, or
    ``"local"`` for a local Ray instance; ``devices``: devices per run by method (``"full=4,lora=1"``);
    ``device_memory``: each device's memory (``"80GB"``), which gives every arm ``devices`` leaves out the
    fewest devices ``rl-lora plan`` says its run fits on.
    ``adapters``: PEFT adapter types in place of ``ranks`` (``"lora-r1,vera-r256,tinylora-tied,full"``,
    docs/adapters.md).
    """
    from rl_lora.study.sweep import SweepSpec, run_sweep
    from rl_lora.study.sweep_plan import (
        LrGrids,
        parse_adapters,
        parse_lr_grids,
        parse_numbers,
        parse_ranks,
        plan_arms,
    )
    from rl_lora.utils.errors import ConfigError

    config = load_recipe(recipe, overrides)
    grids = parse_lr_grids(lrs, lr_points, lr_step)
    if lr_multipliers:
        if grids is not None:
            raise ConfigError("--lrs and --lr-multipliers both set LoRA grids: give one of them")
        multipliers = parse_numbers("--lr-multipliers", lr_multipliers)
        grids = LrGrids({"lora": [m * config.train.lr for m in multipliers]}, lr_points, lr_step)
    seed_list = parse_numbers("--seeds", seeds or ("3,4,5,6" if grids else "1,2"), int, positive=False)
    arms = plan_arms(config, parse_ranks(ranks), list(targets) if targets else None,
                     parse_numbers("--batch-sizes", batch_sizes, int), match_params,
                     parse_adapters(adapters) if adapters else None)
    selection = parse_numbers("--selection-seeds", selection_seeds, int, positive=False) if grids else []
    spec = SweepSpec(seed_list, grids, selection, select_last, margin)
    sweep_dir = Path(output_dir) / (name or config.name)
    launcher = None
    if ray is not None:  # Ray is imported only here (the optional extra rl-lora[ray])
        from rl_lora.study.ray_launcher import RayLauncher

        spec.check()  # before the cluster is contacted
        launcher = RayLauncher(Path(recipe), list(overrides), sweep_dir, arms, ray, devices, jobs,
                               device_memory=device_memory)
    elif devices or device_memory:
        given = f"--devices {devices}" if devices else f"--device-memory {device_memory}"
        raise ConfigError(f"{given}: devices per run are for a sweep on Ray; add --ray [ADDRESS]")
    return sweep_dir, run_sweep(Path(recipe), arms, spec, sweep_dir, list(overrides), jobs=jobs, launcher=launcher)


def report(sweep_dir: str | Path, threshold: float | None = None) -> Path:
    """Write a sweep's report.md, report.html and plots (verdicts first); returns report.md's path."""
    from rl_lora.study.report import write_report

    return write_report(Path(sweep_dir), threshold)
