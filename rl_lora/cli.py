"""The ``rl-lora`` command.

    rl-lora run RECIPE [key.path=value ...] [--debug]
    rl-lora validate RECIPE [key.path=value ...]

Errors the user can fix print as one line and exit with status 2; ``--debug`` shows the traceback.
Heavy libraries (torch, TRL) are imported only after the recipe validates.
"""

from __future__ import annotations

import argparse
import os
import sys

import yaml

from rl_lora.config import load_recipe
from rl_lora.errors import RlLoraError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rl-lora", description="RLHF and DPO with very-low-rank LoRA.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("run", "run a recipe (train, evaluate, save)"),
        ("validate", "validate a recipe and print the resolved config; loads no model"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("recipe", help="path to a recipe YAML file")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. lora.rank=4 train.steps=50")
        # SUPPRESS: a --debug given before the subcommand must survive the subparser's defaults.
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")
    return parser


def _validate(args: argparse.Namespace) -> int:
    from rl_lora.lr_rule import resolve_lr

    config = load_recipe(args.recipe, args.overrides)
    lr = resolve_lr(config.train.lr, config.lora, config.train.steps)
    print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
    print(f"# resolved lr: {lr.lr:g} ({lr.reason})")
    return 0


def _run(args: argparse.Namespace) -> int:
    config = load_recipe(args.recipe, args.overrides)
    if not os.path.exists("/dev/nvidiactl"):
        # DeepSpeed (imported by TRL/accelerate) otherwise warns on every CPU run that it fell back to CPU.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from rl_lora.runner import run_recipe  # heavy imports only once the recipe is known to be good

    run_recipe(config)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"run": _run, "validate": _validate}[args.command](args)
    except RlLoraError as exc:
        if args.debug:
            raise
        print(f"rl-lora: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rl-lora: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
