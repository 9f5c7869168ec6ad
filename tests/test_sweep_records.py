"""A sweep keeps its records (issue #31): every manifest of every sweep into a folder, and every run's score in
runs.csv (rl_lora/study/records.py). tests/test_sweep.py checks the same on a real sweep run twice."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from rl_lora.study.records import read_manifests, record_selection, register_manifest, write_runs_csv
from rl_lora.study.verdicts import read_protocol
from rl_lora.utils.errors import ConfigError

PROTOCOL = {"seeds": [3, 4], "selection_seeds": [1, 2], "selection_rule": {"last": 2}, "margin": None}


def test_a_second_sweep_into_the_same_folder_keeps_the_first_manifest(tmp_path: Path) -> None:
    first = register_manifest(tmp_path, {**PROTOCOL, "arms": ["r1"]}, ["rl-lora", "sweep", "a.yaml"])
    second = register_manifest(tmp_path, {**PROTOCOL, "arms": ["full"], "seeds": [5, 6]}, ["rl-lora", "sweep", "b"])
    assert first != second and first.is_file() and second.is_file()
    kept = read_manifests(tmp_path)
    assert [m["arms"] for m in kept] == [["r1"], ["full"]]
    assert json.loads((tmp_path / "sweep.json").read_text())["arms"] == ["r1"]  # the first, never overwritten
    for manifest in kept:
        assert manifest["command"][:2] == ["rl-lora", "sweep"] and manifest["utc"].endswith("Z")
        assert manifest["versions"]["python"] and "git" in manifest
    assert read_protocol(tmp_path).confirmation_seeds == frozenset({3, 4, 5, 6})  # both sweeps' seeds


def test_a_second_sweep_s_lr_choice_adds_to_the_first_s(tmp_path: Path) -> None:
    first = register_manifest(tmp_path, {**PROTOCOL, "arms": ["r1", "full"]}, [])
    record_selection(tmp_path, first, {"r1": {"best_lr": 1e-3}, "full": {"best_lr": 1e-4}})
    second = register_manifest(tmp_path, {**PROTOCOL, "arms": ["r3", "full"]}, [])
    record_selection(tmp_path, second, {"r3": {"best_lr": 2e-3}, "full": {"best_lr": 2e-4}})
    assert json.loads((tmp_path / "selection.json").read_text()) == {
        "r1": {"best_lr": 1e-3}, "full": {"best_lr": 2e-4}, "r3": {"best_lr": 2e-3}}
    kept = sorted((tmp_path / "manifests").glob("selection-*.json"))
    assert [json.loads(p.read_text())["full"]["best_lr"] for p in kept] == [1e-4, 2e-4]


def test_a_later_sweep_may_not_change_the_registered_protocol(tmp_path: Path) -> None:
    register_manifest(tmp_path, PROTOCOL, [])
    with pytest.raises(ConfigError, match=r"margin: None -> 0.02"):
        register_manifest(tmp_path, {**PROTOCOL, "margin": 0.02}, [])
    with pytest.raises(ConfigError, match=r"selection_seeds: \[1, 2\] -> \[1\]"):
        register_manifest(tmp_path, {**PROTOCOL, "selection_seeds": [1]}, [])
    assert len(read_manifests(tmp_path)) == 1


def test_a_folder_swept_before_manifests_existed_keeps_its_sweep_json_as_the_first(tmp_path: Path) -> None:
    (tmp_path / "sweep.json").write_text(json.dumps({**PROTOCOL, "arms": ["old"]}))
    register_manifest(tmp_path, {**PROTOCOL, "arms": ["new"]}, [])
    assert [m["arms"] for m in read_manifests(tmp_path)] == [["old"], ["new"]]
    assert json.loads((tmp_path / "sweep.json").read_text())["arms"] == ["old"]


def _point(runs: Path, name: str, rank: int | str, lr: float, seed: int, phase: str) -> None:
    arm = {"rank": rank, "targets": None, "batch_size": None, "steps": None, "eval_every": None,
           "targets_label": "all", "batch_label": 64}
    (runs / f"{name}.point.json").write_text(json.dumps(
        {"point": {"arm": arm, "seed": seed, "lr": lr, "resolved_lr": lr, "phase": phase}, "name": name}))


def _finish(runs: Path, name: str, method: str, rank: int | str, lr: float, seed: int, curve: list[float]) -> None:
    folder = runs / name
    folder.mkdir(parents=True)
    rows = [{"step": 10 * i, "eval/accuracy": v} for i, v in enumerate(curve)]
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (folder / "summary.json").write_text(json.dumps({
        "method": method, "rank": rank, "seed": seed, "lr": lr, "steps": 20, "trained_steps": 20,
        "lora_targets": "all", "batch_size": 64, "headline_metric": "accuracy", "final_accuracy": curve[-1],
        "start_accuracy": curve[0]}))


def test_the_csv_lists_every_run_selection_and_confirmation_finished_or_not(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    register_manifest(tmp_path, PROTOCOL, [])
    planned = [("r1-all-b64-lr0.001-s1", 1, 1e-3, 1, "selection"),
               ("full-b64-lr0.0001-s1", "full", 1e-4, 1, "selection"),
               ("r1-all-b64-lr0.001-s3", 1, 1e-3, 3, "confirmation"),
               ("full-b64-lr0.0001-s3", "full", 1e-4, 3, "confirmation")]
    for name, rank, lr, seed, phase in planned:
        _point(runs, name, rank, lr, seed, phase)
    _finish(runs, "r1-all-b64-lr0.001-s1", "lora-r1", 1, 1e-3, 1, [0.1, 0.5, 0.7])
    _finish(runs, "full-b64-lr0.0001-s1", "full", "full", 1e-4, 1, [0.1, 0.8, 0.9])
    _finish(runs, "r1-all-b64-lr0.001-s3", "lora-r1", 1, 1e-3, 3, [0.1, 0.6, 0.6])
    (tmp_path / "failures.jsonl").write_text(json.dumps({"run": "full-b64-lr0.0001-s3", "exit_code": 3}) + "\n")

    with write_runs_csv(tmp_path).open() as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert set(rows) == {name for name, *_ in planned}
    r1 = rows["r1-all-b64-lr0.001-s1"]
    assert (r1["arm"], r1["method"], r1["rank"], r1["lr"], r1["seed"], r1["phase"], r1["steps"], r1["status"]) == (
        "r1-all-b64", "lora-r1", "1", "0.001", "1", "selection", "20", "finished")
    assert float(r1["score"]) == pytest.approx(0.6)  # the mean of the last 2 evaluations, as the verdict reads it
    assert float(r1["start"]) == pytest.approx(0.1)  # the first evaluation, before any step
    failed = rows["full-b64-lr0.0001-s3"]
    assert (failed["status"], failed["exit_code"], failed["phase"], failed["score"]) == (
        "failed", "3", "confirmation", "")
