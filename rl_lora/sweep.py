"""Rank sweeps: one recipe at several ranks (and seeds, and LRs) next to its full-parameter baseline.

Every combination runs as its own ``rl-lora run`` process, one after another, so a sweep goes through
the same launcher as a single run and a crash in one run cannot take the sweep down. Runs land in
``<sweep>/runs/<method>-s<seed>[-lr<x>]``; a run whose folder holds ``summary.json`` is finished and is
never redone, so rerunning the same command after a kill finishes only what is missing. A failed run
is recorded in ``<sweep>/failures.jsonl`` with its exit code and the last lines it printed, and the
sweep carries on.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from rl_lora.config import load_recipe
from rl_lora.errors import ConfigError


@dataclass(frozen=True)
class SweepPoint:
    rank: int | str
    seed: int
    lr_multiplier: float | None = None
    lr: float | None = None

    @property
    def name(self) -> str:
        method = "full" if self.rank == "full" else f"r{self.rank}"
        tail = f"-m{self.lr_multiplier:g}" if self.lr_multiplier is not None else ""
        tail += f"-lr{self.lr:g}" if self.lr is not None else ""
        return f"{method}-s{self.seed}{tail}"

    def overrides(self) -> list[str]:
        out = [f"lora.rank={self.rank}", f"train.seed={self.seed}"]
        if self.rank == "full":
            if self.lr is not None:  # an LR sweep of the baseline sets the full-parameter LR itself
                out.append(f"train.lr={self.lr}")
        else:
            if self.lr_multiplier is not None:
                out.append(f"lora.lr_multiplier={self.lr_multiplier}")
            if self.lr is not None:
                out.append(f"lora.lr={self.lr}")
        return out


def parse_ranks(text: str) -> list[int | str]:
    ranks: list[int | str] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if part == "full":
            ranks.append("full")
        elif part.isdigit() and int(part) >= 1:
            ranks.append(int(part))
        else:
            raise ConfigError(f"--ranks: '{part}' is neither a positive integer nor 'full'")
    if not ranks:
        raise ConfigError("--ranks: give at least one rank, e.g. --ranks 1,4,16,full")
    return ranks


def parse_numbers(flag: str, text: str | None, kind: type = float) -> list:
    if not text:
        return []
    try:
        return [kind(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ConfigError(f"{flag}: '{text}' is not a comma-separated list of numbers") from None


def plan(ranks: list[int | str], seeds: list[int], lr_multipliers: list[float], lrs: list[float]) -> list[SweepPoint]:
    """Every combination; LR variants apply to the LoRA ranks (and ``lrs`` to full as well)."""
    points = []
    for rank in ranks:
        variants: list[tuple[float | None, float | None]] = [(None, None)]
        if rank != "full" and lr_multipliers:
            variants = [(m, None) for m in lr_multipliers]
        if lrs:
            variants = [(None, lr) for lr in lrs]
        points.extend(SweepPoint(rank, seed, m, lr) for seed in seeds for m, lr in variants)
    return points


def _run_one(recipe: Path, base_overrides: list[str], point: SweepPoint, runs_dir: Path, group: str) -> int:
    command = [
        sys.executable, "-m", "rl_lora.cli", "run", str(recipe), *base_overrides, *point.overrides(),
        f"logging.output_dir={runs_dir}", f"logging.run_name={point.name}",
        f"logging.wandb_group={group}", "logging.progress=false",
    ]
    log_path = runs_dir / f"{point.name}.log"
    with log_path.open("w", encoding="utf-8") as log:
        return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False).returncode


def _tail(path: Path, lines: int = 5) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def run_sweep(
    recipe: Path,
    points: list[SweepPoint],
    sweep_dir: Path,
    overrides: list[str] | None = None,
    progress: bool = True,
) -> dict[str, list[str]]:
    """Run every point not yet finished; returns the names of finished, skipped and failed runs."""
    overrides = overrides or []
    load_recipe(recipe, overrides)  # validate once, before the first process starts
    runs_dir = sweep_dir / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    manifest = {
        "recipe": str(recipe), "overrides": overrides, "points": [asdict(p) | {"name": p.name} for p in points],
        "group": sweep_dir.name,
    }
    (sweep_dir / "sweep.json").write_text(json.dumps(manifest, indent=2))
    outcome: dict[str, list[str]] = {"finished": [], "skipped": [], "failed": []}
    bar = tqdm(points, desc=f"sweep {sweep_dir.name}", disable=not progress)
    for point in bar:
        run_dir = runs_dir / point.name
        if (run_dir / "summary.json").is_file():
            outcome["skipped"].append(point.name)
            continue
        shutil.rmtree(run_dir, ignore_errors=True)  # a partial run from an interrupted sweep
        bar.set_postfix_str(point.name)
        started = time.perf_counter()
        code = _run_one(recipe, overrides, point, runs_dir, sweep_dir.name)
        if code == 0 and (run_dir / "summary.json").is_file():
            outcome["finished"].append(point.name)
            continue
        outcome["failed"].append(point.name)
        failure = {"run": point.name, "exit_code": code, "seconds": round(time.perf_counter() - started, 1),
                   "last_lines": _tail(runs_dir / f"{point.name}.log"), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
        with (sweep_dir / "failures.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(failure) + "\n")
        tqdm.write(f"rl-lora: sweep run {point.name} failed (exit {code}); see {runs_dir / point.name}.log")
    return outcome
