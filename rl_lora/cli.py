"""The ``rl-lora`` command.

    rl-lora run RECIPE [key.path=value ...] [--debug]
    rl-lora run PIPELINE [--resume PIPELINE_DIR]          (a file with stages:, rl_lora/study/pipeline.py)
    rl-lora validate RECIPE [key.path=value ...]
    rl-lora sweep RECIPE --ranks 1,16,full [--lrs auto --selection-seeds 1,2] --seeds 3,4,5,6 [--jobs 2] [key=value ...]
    rl-lora sweep RECIPE ... --ray [ADDRESS] [--devices full=4,lora=1]   (every run a Ray task: docs/cluster.md)
    rl-lora report SWEEP_DIR [--wandb [--entity ENTITY] [--project PROJECT]]
    rl-lora capacity RECIPE [key.path=value ...]
    rl-lora plan RECIPE [key.path=value ...] [--devices N] [--device-memory 80GB] [--prompt-tokens N]

Errors the user can fix print as one line and exit with status 2; ``--debug`` shows the traceback.
Heavy libraries (torch, TRL) are imported only after the recipe validates.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import yaml

import rl_lora
from rl_lora.config.algorithms import algorithm_info
from rl_lora.config.schema import RecipeConfig, load_recipe, read_recipe_file
from rl_lora.utils.errors import USER_ERRORS, ConfigError, one_line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rl-lora", description="RLHF and DPO with very-low-rank LoRA.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("run", "run a recipe (train, evaluate, save)"),
        ("validate", "validate a recipe and print the resolved config; loads no model"),
        ("capacity", "estimate LoRA capacity against the data and check the guardrails; loads no weights"),
        ("plan", "memory per device and FLOPs of a recipe, full vs its rank; loads no weights"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("recipe", help="path to a recipe YAML file")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. lora.rank=4 train.steps=50")
        if name == "run":
            p.add_argument("--resume", nargs="?", const="", default=None, metavar="RUN_DIR",
                           help="continue from the newest complete checkpoint of RUN_DIR "
                                "(default: the newest run of this recipe)")
            launch = p.add_argument_group("several processes (torchrun; DeepSpeed via the recipe's distributed:)")
            launch.add_argument("--nproc", type=int, default=1, help="processes on this machine")
            launch.add_argument("--nnodes", type=int, default=1, help="machines taking part")
            launch.add_argument("--node-rank", type=int, default=0, dest="node_rank", help="this machine's rank")
            launch.add_argument("--master-addr", default="127.0.0.1", dest="master_addr",
                                help="address of the node-rank-0 machine")
            launch.add_argument("--master-port", type=int, default=29511, dest="master_port")
        if name == "plan":
            p.add_argument("--devices", type=int, default=1, help="devices the run spreads over (default 1)")
            p.add_argument("--device-memory", default="80GB", dest="device_memory", help="per device (default 80GB)")
            p.add_argument("--prompt-tokens", type=int, default=None, dest="prompt_tokens",
                           help="prompt length in tokens (default: the arithmetic task's, else 256)")
        # SUPPRESS: a --debug given before the subcommand must survive the subparser's defaults.
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")
    p = sub.add_parser("sweep", help="run a recipe at several ranks and seeds next to its full-parameter baseline")
    p.add_argument("recipe", help="path to a recipe YAML file")
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to every run")
    p.add_argument("--ranks", default="1,4,16,full", help="comma-separated ranks; 'full' = full-parameter baseline")
    p.add_argument("--adapters", default=None,
                   help="PEFT adapter types in place of --ranks, e.g. lora-r1,dora-r1,vera-r256,tinylora-tied,full "
                        "(docs/adapters.md)")
    p.add_argument("--seeds", default=None,
                   help="seeds of the runs the verdict reads (default 1,2; with an LR grid 3,4,5,6)")
    grid = p.add_argument_group("each method at its own best LR (docs/sweeps.md)")
    grid.add_argument("--lrs", default=None,
                      help="LR grids: 'auto' (log-spaced around each method's rule LR), one list for every "
                           "method, or per method: 'full=1e-4,3e-4;r1=1e-3,3e-3;lora=...'")
    grid.add_argument("--lr-multipliers", default=None,
                      help="LoRA grid as multiples of train.lr (full-parameter runs get the auto grid)")
    grid.add_argument("--lr-points", type=int, default=5, help="LRs in an auto grid")
    grid.add_argument("--lr-step", type=float, default=2.0, help="ratio between neighbouring LRs of an auto grid")
    grid.add_argument("--selection-seeds", default="1,2", help="seeds that choose each method's best LR")
    grid.add_argument("--select-last", type=int, default=2,
                      help="a selection run's score: the mean of its last N evaluations")
    p.add_argument("--margin", type=float, default=None,
                   help="equivalence margin in the headline metric's declared unit, registered before the runs "
                        "(default: 0.05, 5 points, for a rate; 5%% of how far training moved full's score otherwise)")
    axes = p.add_argument_group("more axes")
    axes.add_argument("--targets", default=None, help="layer sets to compare: all-linear, attention, mlp, ...")
    axes.add_argument("--match-params", action="store_true",
                      help="give every layer set after the first the rank closest to its trainable-parameter count")
    axes.add_argument("--batch-sizes", default=None,
                      help="batch sizes at the recipe's number of episodes (steps scale inversely)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at once (one per GPU; on CPU the cores are split between them)")
    cluster = p.add_argument_group("on a Ray cluster (docs/cluster.md; pip install 'rl-lora[ray]')")
    cluster.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                         help="every run a Ray task on the cluster at ADDRESS (HOST:PORT, or 'auto'); with no "
                              "address, a local Ray instance")
    cluster.add_argument("--devices", default=None,
                         help="devices per run by method, e.g. full=4,lora=1 (GPUs, or CPU slots on a CPU "
                              "cluster; default 1 each, or --device-memory's); a run with more than 1 is started "
                              "with --nproc")
    cluster.add_argument("--device-memory", default=None, metavar="SIZE",
                         help="memory of one device, e.g. 80GB: each method --devices leaves out gets the fewest "
                              "devices rl-lora plan says its run fits on")
    p.add_argument("--name", default=None, help="sweep name (default: the recipe's name)")
    p.add_argument("--output-dir", default="sweeps", help="where sweep folders go")
    p.add_argument("--threshold", type=float, default=None,
                   help="a value of the task's headline metric: the report adds 'steps to' it")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")
    p = sub.add_parser("report", help="write report.md/report.html and plots for a sweep folder")
    p.add_argument("sweep_dir", help="a folder made by rl-lora sweep")
    p.add_argument("--threshold", type=float, default=None,
                   help="a value of the task's headline metric: the report adds 'steps to' it")
    wb = p.add_argument_group("W&B (rl_lora/study/dashboards.py)")
    wb.add_argument("--wandb", action="store_true",
                    help="also build the sweep's W&B workspace and report: published when logged in, else written "
                         "to wandb_dashboards.json with the commands that publish them")
    wb.add_argument("--entity", default=None, help="W&B entity (default: your login's default entity)")
    wb.add_argument("--project", default=None, help="W&B project (default: the runs' logging.wandb_project)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")
    return parser


def _sweep(args: argparse.Namespace) -> int:
    targets = [t.strip() for t in args.targets.split(",") if t.strip()] if args.targets else None
    sweep_dir, outcome = rl_lora.sweep(
        args.recipe, ranks=args.ranks, seeds=args.seeds, lrs=args.lrs, lr_points=args.lr_points,
        lr_step=args.lr_step, selection_seeds=args.selection_seeds, select_last=args.select_last, margin=args.margin,
        targets=targets, match_params=args.match_params, batch_sizes=args.batch_sizes, overrides=args.overrides,
        name=args.name, output_dir=args.output_dir, jobs=args.jobs, lr_multipliers=args.lr_multipliers,
        ray=args.ray, devices=args.devices, device_memory=args.device_memory, adapters=args.adapters)
    print(f"sweep {sweep_dir}: {len(outcome.finished)} finished, {len(outcome.skipped)} already done, "
          f"{len(outcome.failed)} failed" + (f" ({', '.join(outcome.failed)})" if outcome.failed else ""))
    if outcome.finished or outcome.skipped:
        print(f"report: {rl_lora.report(sweep_dir, args.threshold)} (and report.html)")
    return 1 if outcome.failed else 0


def _report(args: argparse.Namespace) -> int:
    print(f"report: {rl_lora.report(args.sweep_dir, args.threshold)} (and report.html)", flush=True)
    if args.wandb:  # after the local report, so a W&B failure never costs it
        from pathlib import Path

        from rl_lora.study.dashboards import dashboards

        print("\n".join(dashboards(Path(args.sweep_dir), args.entity, args.project)))
    return 0


def _validate(args: argparse.Namespace) -> int:
    from rl_lora.estimate.lr_rule import resolve_lr
    from rl_lora.launch.precheck import precheck
    from rl_lora.study.pipeline import is_pipeline, load_pipeline

    if is_pipeline(read_recipe_file(args.recipe)):  # every stage validated with its overrides; nothing loads
        pipeline = load_pipeline(args.recipe, args.overrides)
        for stage in pipeline.stages:
            need = f", requires {stage.require} ({stage.on_shortfall})" if stage.require else ""
            print(f"stage '{stage.name}': {stage.recipe} with {len(stage.overrides)} overrides{need}")
        print(f"# pipeline '{pipeline.name}': {len(pipeline.stages)} stages valid")
        return 0
    config = load_recipe(args.recipe, args.overrides)
    precheck(config)  # what `rl-lora run` checks before any model loads: `trl:` options, plug-ins, data files
    lr = resolve_lr(config.train.lr, config.lora, config.train.steps)
    print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
    print(f"# resolved lr: {lr.lr:g} ({lr.reason})")
    return 0


def _capacity(args: argparse.Namespace) -> int:
    print("\n".join(rl_lora.capacity(load_recipe(args.recipe, args.overrides))))
    return 0


def _plan(args: argparse.Namespace) -> int:
    from rl_lora.estimate.plan import parse_memory

    memory = parse_memory(args.device_memory)  # a bad size fails before the recipe is read
    config = load_recipe(args.recipe, args.overrides)
    print("\n".join(rl_lora.plan_lines(rl_lora.plan(config, args.devices, memory, args.prompt_tokens))))
    return 0


def _launch(args: argparse.Namespace, config: RecipeConfig) -> int:
    """Re-run this command under torchrun; the run folder is made once, here, and shared."""
    import subprocess
    import tempfile

    from rl_lora.training.distributed import LAUNCHED_ENV, RUN_DIR_ENV, launch_command

    if algorithm_info(config.algorithm).processes_need_zero and config.distributed.zero_stage is None:
        # Checked here too (rl_lora/algorithms/ppo/trainer.py check_layout), so it fails before torchrun starts.
        raise ConfigError(f"--nproc/--nnodes: algorithm '{config.algorithm}' under several processes needs "
                          "distributed.zero_stage (0, 2 or 3)")
    env = {**os.environ, LAUNCHED_ENV: "1"}
    if args.resume is None:
        if args.node_rank == 0:
            from rl_lora.training.run_dir import create_run_dir

            env[RUN_DIR_ENV] = str(create_run_dir(config))
        else:  # other machines write only scratch files (checkpoint shards) of their own
            env[RUN_DIR_ENV] = tempfile.mkdtemp(prefix="rl-lora-node-")
    cli_args = ["run", args.recipe, *args.overrides]
    if args.resume is not None:
        cli_args += ["--resume", args.resume] if args.resume else ["--resume"]
    command = launch_command(args.nproc, args.nnodes, args.node_rank, args.master_addr, args.master_port, cli_args)
    return subprocess.run(command, env=env, check=False).returncode


def _run_pipeline(args: argparse.Namespace) -> int:
    """``rl-lora run PIPELINE``: every stage as its own run (rl_lora/study/pipeline.py)."""
    from pathlib import Path

    from rl_lora.study.pipeline import load_pipeline, run_pipeline, summary_lines

    if args.nproc > 1 or args.nnodes > 1:
        raise ConfigError(f"pipeline '{args.recipe}': --nproc/--nnodes go into each stage's 'overrides:' in the "
                          "pipeline file, not on the command line (overrides there apply to every stage)")
    if args.resume == "":
        raise ConfigError("--resume: give the pipeline folder to continue (it holds pipeline.json)")
    pipeline = load_pipeline(args.recipe, args.overrides)
    folder, records = run_pipeline(pipeline, Path(args.resume) if args.resume else None)
    print("\n".join(summary_lines(folder, records)), flush=True)
    return 0


def _run(args: argparse.Namespace) -> int:
    from rl_lora.study.pipeline import is_pipeline

    if is_pipeline(read_recipe_file(args.recipe)):
        return _run_pipeline(args)
    config = load_recipe(args.recipe, args.overrides)
    if (args.nproc > 1 or args.nnodes > 1) and "RL_LORA_LAUNCHED" not in os.environ:
        return _launch(args, config)
    rl_lora.run(config, resume=False if args.resume is None else (args.resume or True))
    return 0


def main(argv: list[str] | None = None) -> int:
    # bitsandbytes (when installed, for QLoRA) warns at import on CPUs with AVX512-BF16 that an optional
    # kernels package is missing; it falls back to its own kernel, and the warning is not the user's concern.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    parser = _parser()
    # Overrides may come after options too (`rl-lora run R --nproc 2 lora.rank=4`): argparse stops
    # collecting positionals at the first option, so the rest arrive as "unknown" and join them here.
    args, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if x.startswith("-") or "=" not in x or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        commands = {"run": _run, "validate": _validate, "sweep": _sweep, "report": _report,
                    "capacity": _capacity, "plan": _plan}
        return commands[args.command](args)
    except USER_ERRORS as exc:
        if args.debug:
            raise
        print(f"rl-lora: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rl-lora: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
