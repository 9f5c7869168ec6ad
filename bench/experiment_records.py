"""runs.csv for the sweeps published under docs/experiments/, from the files committed there.

The sweeps' run folders (``runs/``) were not published (git-ignored), so this rebuilds what the committed
files hold: every planned run (from the manifests, ``sweep*.json``) and, for selection runs, the score each
one had (``selection*.json`` lists each LR's scores in the order of the selection seeds; a run that did not
finish is listed under ``missing_runs`` and there were none). Confirmation runs are listed with status
``score not published``: their reports give each arm's mean ± sd, not each run's score. New sweeps write the
whole file themselves (rl_lora/study/records.py).

    python bench/experiment_records.py        # writes docs/experiments/*/runs.csv
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from rl_lora.study.records import CSV_COLUMNS, RUNS_CSV

EXPERIMENTS = Path(__file__).resolve().parents[1] / "docs" / "experiments"
DEFAULT_STEPS = 300  # recipes/grpo_arithmetic.yaml


def _steps(manifest: dict[str, Any], arm: dict[str, Any]) -> int:
    if arm.get("steps"):
        return int(arm["steps"])
    given = [o.split("=", 1)[1] for o in manifest.get("overrides", []) if o.startswith("train.steps=")]
    return int(given[-1]) if given else DEFAULT_STEPS


def _row(manifest: dict[str, Any], arm: dict[str, Any], lr: float, seed: int, phase: str, status: str,
         score: float | None) -> dict[str, Any]:
    rank = arm["rank"]
    return {"run": f"{arm['name']}-lr{lr:g}-s{seed}", "arm": arm["name"],
            "method": "full" if rank == "full" else f"lora-r{rank}", "rank": rank,
            "layers": "all" if rank == "full" else arm.get("targets_label", "all"),
            "batch_size": arm.get("batch_label"), "lr": f"{lr:g}", "seed": seed, "phase": phase,
            "steps": _steps(manifest, arm), "trained_steps": None, "status": status, "metric": "accuracy",
            "score": score, "final": None, "exit_code": None}


def _rebuilt(like: dict[str, Any], chosen: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The manifest of a sweep that only its selection file records: its arms and grids from that file, its
    seeds and overrides from the folder's other sweep (the same protocol but for its arms and grids)."""
    arms = []
    for name, record in chosen.items():
        parts = name.split("-")  # r1-all-b64; full-b64 (full names no layer set)
        rank = "full" if parts[0] == "full" else int(parts[0].removeprefix("r"))
        layers, batch = ("all", parts[1]) if rank == "full" else (parts[1], parts[2])
        arms.append({"name": name, "rank": rank, "targets_label": layers, "batch_label": int(batch.removeprefix("b")),
                     "steps": None, "rule_lr": record["best_lr"]})
    grids = {name: sorted(float(lr) for lr in record["scores"]) for name, record in chosen.items()}
    return {**like, "arms": arms, "lr_grids": grids}


def experiment_rows(folder: Path) -> list[dict[str, Any]]:
    manifests = [json.loads(p.read_text()) for p in sorted(folder.glob("sweep*.json"))]
    selections = {}
    for path in sorted(folder.glob("selection*.json")):
        selections.update(json.loads(path.read_text()))
    covered = {arm["name"] for m in manifests for arm in m["arms"]}
    orphans = [name for name in selections if name not in covered]
    if orphans and manifests:  # a sweep whose manifest was overwritten by a later one (study_best_lr's ranks)
        manifests.insert(0, _rebuilt(manifests[0], {name: selections[name] for name in orphans}))
    rows: dict[str, dict[str, Any]] = {}
    for manifest in manifests:
        seeds, picking = manifest["seeds"], manifest.get("selection_seeds") or []
        for arm in manifest["arms"]:
            chosen = selections.get(arm["name"])
            grid = (manifest.get("lr_grids") or {}).get(arm["name"]) or []
            for lr in grid:
                scores = (chosen or {}).get("scores", {}).get(f"{lr:g}")
                for i, seed in enumerate(picking):
                    assert chosen is None or not chosen["missing_runs"], "seed order needs every run finished"
                    score = scores[i] if scores is not None else None
                    row = _row(manifest, arm, lr, seed, "selection",
                               "finished" if score is not None else "score not published", score)
                    rows.setdefault(row["run"], row)
            best = chosen["best_lr"] if chosen else (grid[0] if len(grid) == 1 else arm["rule_lr"])
            for seed in seeds:
                row = _row(manifest, arm, best, seed, "confirmation", "score not published", None)
                rows.setdefault(row["run"], row)
    return list(rows.values())


def main() -> None:
    for folder in sorted(p for p in EXPERIMENTS.iterdir() if p.is_dir()):
        rows = experiment_rows(folder)
        with (folder / RUNS_CSV).open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: "" if row[k] is None else row[k] for k in CSV_COLUMNS})
        scored = sum(r["score"] is not None for r in rows)
        print(f"{folder.name}: {len(rows)} runs, {scored} with their score ({folder / RUNS_CSV})")


if __name__ == "__main__":
    main()
