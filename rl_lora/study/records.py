"""A sweep's records: every manifest it was run with, and every run's score in one CSV.

**Manifests.** Each ``rl-lora sweep`` into a folder registers its manifest (the protocol: arms, seeds, LR
grids, selection rule, margin) before its first run, as ``manifests/sweep-<UTC time>-<n>.json`` with the command,
the git commit (where the package sits in a git checkout), the library versions and the UTC time. Nothing is
overwritten: the folder's first manifest is also kept as ``sweep.json`` (where it is read by older tools), and
a second sweep into the same folder adds its own file beside the first. A later sweep may add arms, LRs or
confirmation seeds, but not change how LRs are chosen or the margin (the selection seeds, the selection rule,
the registered margin): those are registered before the runs, and a sweep that would change them is refused.

**LR choices.** Each sweep's LR choice is kept beside its manifest (``manifests/selection-<same stamp>.json``);
``selection.json`` holds the newest choice per arm over every sweep into the folder, so a second sweep with
other arms adds to it instead of replacing the first's.

**Runs.** ``runs.csv`` beside the report lists every run the sweep planned or finished, selection and
confirmation: run name, arm, method, rank, layer set, batch size, LR, seed, phase, steps, status (finished,
failed, not finished), the selection score (the headline metric averaged over the run's last evaluations, as
the verdict reads it) and the final value. A failed run carries its exit code from ``failures.jsonl``.

Nothing here imports torch (rl_lora/study/ is the light layer).
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from rl_lora.study.comparison import selection_score
from rl_lora.training.run_dir import write_json_atomic
from rl_lora.utils.errors import ConfigError

MANIFESTS = "manifests"
RUNS_CSV = "runs.csv"
# What a later sweep into the same folder may not change: they decide which LR each method gets and the verdict.
FIXED_KEYS = ("selection_seeds", "selection_rule", "margin")
LIBRARIES = ("rl-lora", "torch", "transformers", "trl", "peft", "datasets", "accelerate")
CSV_COLUMNS = ("run", "arm", "method", "rank", "layers", "batch_size", "lr", "seed", "phase", "steps",
               "trained_steps", "status", "metric", "score", "final", "start", "exit_code")


def git_commit(where: Path | None = None) -> dict[str, Any] | None:
    """{"commit", "dirty"} of the checkout holding ``where`` (default: this package), None outside git."""
    folder = where or Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}


def library_versions() -> dict[str, str | None]:
    """Python's and the libraries' versions, from their installed metadata (nothing is imported)."""
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def read_manifests(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every manifest the folder's sweeps registered, oldest first (a folder from before manifests/ existed:
    its sweep.json alone)."""
    folder = sweep_dir / MANIFESTS
    found = sorted(folder.glob("sweep-*.json")) if folder.is_dir() else []
    if found:
        return [json.loads(p.read_text()) for p in found]
    legacy = sweep_dir / "sweep.json"
    return [json.loads(legacy.read_text())] if legacy.is_file() else []


def record_selection(sweep_dir: Path, manifest: Path, chosen: dict[str, Any]) -> None:
    """Keep one sweep's LR choice beside its ``manifest`` and merge it into ``selection.json`` (arm by arm: an arm
    chosen again takes the new record; arms only an earlier sweep chose keep theirs)."""
    write_json_atomic(manifest.with_name(manifest.name.replace("sweep-", "selection-", 1)), chosen)
    merged = sweep_dir / "selection.json"
    earlier = json.loads(merged.read_text()) if merged.is_file() else {}
    write_json_atomic(merged, {**earlier, **chosen})


def register_manifest(sweep_dir: Path, manifest: dict[str, Any], command: list[str] | None = None) -> Path:
    """Keep ``manifest`` as a new file under ``manifests/`` (and as ``sweep.json`` if the folder has none);
    refuse one that changes what an earlier sweep into this folder registered (FIXED_KEYS). Returns its path."""
    earlier = read_manifests(sweep_dir)
    if earlier:
        first = earlier[0]
        changed = [f"{key}: {first.get(key)!r} -> {manifest.get(key)!r}" for key in FIXED_KEYS
                   if key in first and first.get(key) != manifest.get(key)]
        if changed:
            raise ConfigError(
                f"sweep folder '{sweep_dir}' was registered with another protocol ({'; '.join(changed)}): the "
                "selection seeds, selection rule and margin are fixed before the runs; give this sweep another "
                "--name or --output-dir")
    now = time.gmtime()
    record = {**manifest, "command": list(command if command is not None else sys.argv),
              "git": git_commit(), "versions": library_versions(),
              "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", now)}
    folder = sweep_dir / MANIFESTS
    folder.mkdir(parents=True, exist_ok=True)
    legacy = sweep_dir / "sweep.json"
    if legacy.is_file() and not any(folder.iterdir()):
        # a folder swept before manifests/ existed: its manifest becomes the first one, sweep.json untouched
        write_json_atomic(folder / "sweep-00000000T000000Z-01.json", json.loads(legacy.read_text()))
    stamp = time.strftime("%Y%m%dT%H%M%SZ", now)
    n = 1
    while (folder / f"sweep-{stamp}-{n:02d}.json").exists():  # two sweeps in the same second
        n += 1
    path = folder / f"sweep-{stamp}-{n:02d}.json"
    write_json_atomic(path, record)
    if not legacy.is_file():
        write_json_atomic(legacy, record)
    return path


def run_curve(run_dir: Path, metric: str) -> list[tuple[int, float]]:
    """(step, value) of every evaluation of ``eval/<metric>`` in a run's metrics.jsonl; [] without the file."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(int(r["step"]), float(r[f"eval/{metric}"])) for r in rows if r.get(f"eval/{metric}") is not None]


def _failures(sweep_dir: Path) -> dict[str, int | None]:
    """run name -> exit code of its last failure in failures.jsonl."""
    path = sweep_dir / "failures.jsonl"
    if not path.is_file():
        return {}
    out: dict[str, int | None] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            out[row["run"]] = row.get("exit_code")
    return out


def run_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per run the sweep planned (runs/*.point.json) or finished (runs/*/summary.json); see CSV_COLUMNS."""
    runs_dir = sweep_dir / "runs"
    manifests = read_manifests(sweep_dir)
    selection_seeds = {s for m in manifests for s in (m.get("selection_seeds") or [])}
    last = int(((manifests[-1].get("selection_rule") or {}) if manifests else {}).get("last", 1))
    failures = _failures(sweep_dir)
    points = {p.name.removesuffix(".point.json"): json.loads(p.read_text())
              for p in runs_dir.glob("*.point.json")} if runs_dir.is_dir() else {}
    finished = {p.name for p in runs_dir.iterdir() if (p / "summary.json").is_file()} if runs_dir.is_dir() else set()
    rows = []
    for name in sorted(set(points) | finished | set(failures)):
        point = points.get(name, {}).get("point") or {}
        arm = point.get("arm") or {}
        summary = json.loads((runs_dir / name / "summary.json").read_text()) if name in finished else {}
        seed = summary.get("seed", point.get("seed"))
        metric = summary.get("headline_metric")
        value = selection_score(run_curve(runs_dir / name, metric), last) if metric else None
        phase = point.get("phase") or ("selection" if seed in selection_seeds else "confirmation")
        rows.append({
            "run": name, "arm": points.get(name, {}).get("name", name).rsplit("-lr", 1)[0],
            "method": summary.get("method", f"lora-r{arm['rank']}" if arm.get("rank") not in (None, "full")
                                  else arm.get("rank")),
            "rank": summary.get("rank", arm.get("rank")),
            "layers": summary.get("lora_targets", arm.get("targets_label")),
            "batch_size": summary.get("batch_size", arm.get("batch_label")),
            "lr": summary.get("lr", point.get("resolved_lr")), "seed": seed, "phase": phase,
            "steps": summary.get("steps", arm.get("steps")), "trained_steps": summary.get("trained_steps"),
            "status": "finished" if name in finished else ("failed" if name in failures else "not finished"),
            "metric": metric, "score": value, "final": summary.get(f"final_{metric}") if metric else None,
            "start": summary.get(f"start_{metric}") if metric else None,
            "exit_code": failures.get(name) if name not in finished else None,
        })
    return rows


def write_runs_csv(sweep_dir: Path) -> Path | None:
    """Write ``runs.csv`` (every run's score, selection and confirmation) into the sweep folder; None when the
    folder holds no run at all."""
    rows = run_rows(sweep_dir)
    if not rows:
        return None
    path = sweep_dir / RUNS_CSV
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row[k] is None else row[k]) for k in CSV_COLUMNS})
    return path
