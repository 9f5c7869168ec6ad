"""Run a sweep: selection runs over each method's LR grid, then confirmation runs at each one's best LR.

Every run is its own ``rl-lora run`` process (a crash in one cannot take the sweep down), ``jobs`` at a
time. Runs land in ``<sweep>/runs/<arm>-lr<lr>-s<seed>``; a run whose folder holds ``summary.json`` is
finished and never redone, so rerunning the same command after a kill finishes only what is missing. A
run folder made with other settings than this sweep asks for is refused, not silently reused. A failed
run is recorded in ``<sweep>/failures.jsonl`` with its exit code and last lines, and the sweep goes on.

With an LR grid the sweep works in two phases (rl_lora/study/comparison.py): the selection seeds run every LR of
every method's grid; each method's best LR is chosen by the score fixed in ``sweep.json`` before the runs
and written to ``selection.json``; then the confirmation seeds run at that LR. Without a grid every
method trains at the LR the recipe and the LR rule give, on the confirmation seeds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

from tqdm.auto import tqdm

from rl_lora.config.schema import RecipeConfig, load_recipe
from rl_lora.study.comparison import choose_lr, selection_score
from rl_lora.study.records import record_selection, register_manifest, run_curve, write_runs_csv
from rl_lora.study.sweep_plan import Arm, LrGrids, SweepPoint, log_step, points_for, rule_lr
from rl_lora.training.run_dir import write_json_atomic
from rl_lora.utils.errors import ConfigError, RlLoraError

POLL_SECONDS = 0.2


@dataclass
class SweepSpec:
    """How a sweep compares its arms; written to sweep.json before any run starts."""

    seeds: list[int]
    grids: LrGrids | None = None
    selection_seeds: list[int] = field(default_factory=list)
    select_last: int = 2
    margin: float | None = None

    def check(self) -> None:
        if not self.seeds:
            raise ConfigError("--seeds: give at least one seed")
        if self.select_last < 1:
            raise ConfigError(f"--select-last must be at least 1 (got {self.select_last})")
        if self.grids is None:
            return
        if not self.selection_seeds:
            raise ConfigError("--selection-seeds: an LR grid needs seeds to choose each method's best LR on")
        shared = sorted(set(self.seeds) & set(self.selection_seeds))
        if shared:
            raise ConfigError(f"seed(s) {shared} are both selection and confirmation seeds: a seed that chose the "
                              "LR would judge it too; give --seeds and --selection-seeds without overlap")


@dataclass
class Outcome:
    finished: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def merge(self, other: Outcome) -> None:
        self.finished += other.finished
        self.skipped += other.skipped
        self.failed += other.failed


def _fingerprint(config: RecipeConfig, point: SweepPoint) -> dict:
    """What a run's figures depend on: the resolved recipe without logging, and the LR it trains with."""
    resolved = config.to_dict()
    resolved.pop("logging", None)
    for section, key in (("train", "lr"), ("lora", "lr"), ("lora", "lr_multiplier")):
        resolved.get(section, {}).pop(key, None)
    resolved["trained_lr"] = point.resolved_lr
    return resolved


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


class Launcher:
    """Starts ``rl-lora run`` processes for sweep points, ``jobs`` at a time, and records their outcome."""

    def __init__(self, recipe: Path, overrides: list[str], sweep_dir: Path, jobs: int = 1, progress: bool = True):
        if jobs < 1:
            raise ConfigError(f"--jobs must be at least 1 (got {jobs})")
        self.recipe, self.overrides, self.sweep_dir = recipe, overrides, sweep_dir
        self.runs_dir = sweep_dir / "runs"
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.jobs, self.progress = jobs, progress
        self.slots = self._slot_settings(jobs)

    def _slot_settings(self, jobs: int) -> list[tuple[dict[str, str], list[str]]]:
        """(environment, overrides) per concurrent slot: one GPU each, or the CPU threads split between them."""
        if jobs == 1:
            return [({}, [])]
        gpus = _gpu_count()
        if gpus:
            if jobs > gpus:
                raise ConfigError(f"--jobs {jobs}: this machine has {gpus} GPU(s); one run per GPU, so --jobs {gpus}")
            return [({"CUDA_VISIBLE_DEVICES": str(i)}, []) for i in range(jobs)]
        if any(o.startswith("train.threads=") for o in self.overrides):
            threads = int(next(o for o in self.overrides if o.startswith("train.threads=")).split("=", 1)[1])
            return [({"OMP_NUM_THREADS": str(threads)}, [])] * jobs
        threads = max(1, (os.cpu_count() or 1) // jobs)
        return [({"OMP_NUM_THREADS": str(threads)}, [f"train.threads={threads}"])] * jobs

    def check_point(self, point: SweepPoint) -> tuple[RecipeConfig, dict]:
        """Validate the point's recipe; refuse a finished run folder that was made with other settings."""
        config = load_recipe(self.recipe, [*self.overrides, *point.overrides()])
        fingerprint = _fingerprint(config, point)
        record = self.runs_dir / f"{point.name}.point.json"
        if (self.runs_dir / point.name / "summary.json").is_file() and record.is_file():
            old = json.loads(record.read_text())["fingerprint"]
            changed = _differences(old, fingerprint)
            if changed:
                raise ConfigError(
                    f"run '{self.runs_dir / point.name}' was made with other settings ({'; '.join(changed[:4])}): "
                    "give this sweep another --name or --output-dir, or delete that run folder to redo it")
        return config, fingerprint

    def split_done(self, points: list[SweepPoint]) -> tuple[Outcome, list[tuple[SweepPoint, dict]]]:
        """The finished points as skipped, and (point, fingerprint) of the rest, each checked against its run
        folder's settings first."""
        outcome, todo = Outcome(), []
        for point in points:
            _, fingerprint = self.check_point(point)
            if (self.runs_dir / point.name / "summary.json").is_file():
                outcome.skipped.append(point.name)
            else:
                todo.append((point, fingerprint))
        return outcome, todo

    def progress_bar(self, points: list[SweepPoint], outcome: Outcome, label: str) -> tqdm:
        return tqdm(total=len(points), initial=len(outcome.skipped), desc=f"sweep {self.sweep_dir.name}: {label}",
                    disable=not self.progress)

    def run(self, points: list[SweepPoint], label: str) -> Outcome:
        outcome, todo = self.split_done(points)
        bar = self.progress_bar(points, outcome, label)
        running: dict[int, tuple[subprocess.Popen, SweepPoint, float, TextIO]] = {}
        # Ctrl-C or a SIGTERM (kill, a scheduler's stop) ends the sweep at stop.check(); the finally stops its runs.
        with StopSignals() as stop:
            try:
                while todo or running:
                    while todo and len(running) < self.jobs:
                        slot = next(i for i in range(self.jobs) if i not in running)
                        point, fingerprint = todo.pop(0)
                        running[slot] = self._start(point, fingerprint, slot)
                        bar.set_postfix_str(", ".join(p.name for _, p, _, _ in running.values()))
                    for slot, (proc, point, started, log) in list(running.items()):
                        if proc.poll() is None:
                            continue
                        log.close()
                        del running[slot]
                        self._record(point, proc.returncode, time.perf_counter() - started, outcome)
                        bar.update(1)
                    if running:
                        time.sleep(POLL_SECONDS)
                    stop.check()
            finally:
                for proc, _, _, log in running.values():  # interrupted: stop the runs this sweep started
                    proc.terminate()
                    proc.wait()
                    log.close()
                bar.close()
        return outcome

    def _start(self, point: SweepPoint, fingerprint: dict,
               slot: int) -> tuple[subprocess.Popen, SweepPoint, float, TextIO]:
        shutil.rmtree(self.runs_dir / point.name, ignore_errors=True)  # a partial run from an interrupted sweep
        write_json_atomic(self.runs_dir / f"{point.name}.point.json",
                          {"point": asdict(point), "name": point.name, "fingerprint": fingerprint})
        env, slot_overrides = self.slots[slot]
        command = [
            sys.executable, "-m", "rl_lora.cli", "run", str(self.recipe), *self.overrides, *slot_overrides,
            *point.overrides(), f"logging.output_dir={self.runs_dir}", f"logging.run_name={point.name}",
            f"logging.wandb_group={self.sweep_dir.name}", "logging.progress=false",
        ]
        log = (self.runs_dir / f"{point.name}.log").open("w", encoding="utf-8")
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env})
        return proc, point, time.perf_counter(), log

    def _record(self, point: SweepPoint, code: int, seconds: float, outcome: Outcome) -> None:
        if code == 0 and (self.runs_dir / point.name / "summary.json").is_file():
            outcome.finished.append(point.name)
            return
        outcome.failed.append(point.name)
        failure = {"run": point.name, "exit_code": code, "seconds": round(seconds, 1),
                   "last_lines": _tail(self.runs_dir / f"{point.name}.log"), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
        with (self.sweep_dir / "failures.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(failure) + "\n")
        tqdm.write(f"rl-lora: sweep run {point.name} failed (exit {code}); see {self.runs_dir / point.name}.log")


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM while a launcher's runs go: recorded, and raised by ``check()`` where the
    launcher's loop calls it (KeyboardInterrupt, or SystemExit(128 + 15) for SIGTERM); its ``finally`` then stops
    the runs. Active in the main thread only.

    A handler that raised would raise wherever the main thread happens to be: between starting a run's process
    and recording it (orphaning the run), inside a finalizer (Python prints the exception and drops it), or inside
    Ray's ``ray.wait``, which turns a SystemExit into its own exit with status 1 before the ``finally`` runs and
    passes other exceptions over. A signal the process was started ignoring stays ignored."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._receive)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)  # type: ignore[arg-type]
        self._previous.clear()

    def _receive(self, signum: int, frame: object) -> None:
        self.received = self.received or signum  # the first one decides; a second one is not lost either

    def check(self) -> None:
        """Raise the signal received, if any."""
        if self.received == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received is not None:
            raise SystemExit(128 + self.received)


def _gpu_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _tail(path: Path, lines: int = 5) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def select_lrs(runs_dir: Path, points: list[SweepPoint], select_last: int) -> dict[str, dict]:
    """Each arm's best LR from its finished selection runs; {arm name: selection record}."""
    by_arm: dict[str, dict[float, list[float]]] = {}
    metric, higher = None, True
    missing: dict[str, list[str]] = {}
    for point in points:
        scores = by_arm.setdefault(point.arm.name, {}).setdefault(point.resolved_lr, [])
        summary_path = runs_dir / point.name / "summary.json"
        if not summary_path.is_file():
            missing.setdefault(point.arm.name, []).append(point.name)
            continue
        summary = json.loads(summary_path.read_text())
        metric, higher = summary.get("headline_metric", "accuracy"), summary.get("higher_is_better", True)
        score = selection_score(run_curve(runs_dir / point.name, metric), select_last)
        if score is not None:
            scores.append(score)
    chosen = {}
    for arm, lr_scores in by_arm.items():
        if not any(lr_scores.values()):
            raise RlLoraError(f"sweep arm '{arm}': no selection run finished, so no LR can be chosen "
                              f"(see {runs_dir.parent / 'failures.jsonl'})")
        choice = choose_lr(lr_scores, higher)
        chosen[arm] = {"best_lr": choice.best_lr, "at_edge": choice.at_edge, "metric": metric,
                       "higher_is_better": higher, "grid_step": log_step(sorted(lr_scores)),
                       "scores": {f"{lr:g}": values for lr, values in sorted(lr_scores.items())},
                       "missing_runs": missing.get(arm, [])}
    return chosen


def run_sweep(
    recipe: Path, arms: list[Arm], spec: SweepSpec, sweep_dir: Path, overrides: list[str] | None = None,
    jobs: int = 1, progress: bool = True, launcher: Launcher | None = None,
) -> Outcome:
    """Run the sweep's phases; returns the names of finished, skipped and failed runs."""
    overrides = overrides or []
    spec.check()
    config = load_recipe(recipe, overrides)  # validate once, before the first process starts
    # ``launcher``: another way to start runs with the same reuse rules (rl_lora/study/ray_launcher.py: on Ray)
    launcher = launcher or Launcher(recipe, overrides, sweep_dir, jobs, progress)
    selection = points_for(config, arms, spec.selection_seeds, spec.grids, phase="selection") if spec.grids else []
    manifest = {
        "recipe": str(recipe), "overrides": overrides, "group": sweep_dir.name,
        "arms": [asdict(a) | {"name": a.name, "rule_lr": rule_lr(config, a)} for a in arms],
        "seeds": spec.seeds, "selection_seeds": spec.selection_seeds if spec.grids else [],
        "lr_grids": {a.name: sorted({p.resolved_lr for p in selection if p.arm == a}) for a in arms} if spec.grids
        else None,
        "selection_rule": {"score": f"headline metric, mean of each run's last {spec.select_last} evaluations, "
                           "then mean over selection seeds", "last": spec.select_last} if spec.grids else None,
        "margin": spec.margin,
    }
    for point in selection:
        launcher.check_point(point)  # every point's recipe validates before the first run
    registered = register_manifest(sweep_dir, manifest)  # kept under manifests/; sweep.json never overwritten
    outcome = Outcome()
    best: dict[str, float] | None = None
    if selection:
        outcome.merge(launcher.run(selection, "selection"))
        chosen = select_lrs(launcher.runs_dir, selection, spec.select_last)
        record_selection(sweep_dir, registered, chosen)  # beside its manifest, and merged into selection.json
        best = {arm: record["best_lr"] for arm, record in chosen.items()}
        for arm, record in chosen.items():
            edge = " (the grid's edge: the best LR may lie outside it; extend the grid with --lrs)" \
                if record["at_edge"] else ""
            tqdm.write(f"rl-lora: {arm}: best LR {record['best_lr']:g}{edge}")
    confirmation = points_for(config, arms, spec.seeds, lrs=best)
    outcome.merge(launcher.run(confirmation, "confirmation" if selection else "runs"))
    write_runs_csv(sweep_dir)  # every run's score, beside the report
    return outcome
