"""W&B dashboards for a sweep (rl_lora/study/dashboards.py), and proof that an offline run folder holds what W&B
will sync.

Sweeps here are run folders written by hand (summary.json + metrics.jsonl, as a finished run leaves them);
nothing trains. No test reaches a W&B server: publishing is checked against a stand-in for wandb.Api.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rl_lora import cli
from rl_lora.study.dashboards import SPEC_FILE, build_report, build_spec, build_workspace, dashboards, publish
from rl_lora.utils.errors import DashboardError

STEPS = 20


def _records(final: float, seed: int, metric: str, training: str) -> list[dict[str, Any]]:
    """What a run's metrics.jsonl holds: a step-0 evaluation, then per-step figures, evaluations every 10 steps.
    No 'kl': GRPO at beta 0 logs none, so no KL panel may appear."""
    start = 0.45
    records = [{"step": 0, f"eval/{metric}": start, "peak_rss_bytes": 600_000_000}]
    for step in range(1, STEPS + 1):
        record = {
            "step": step,
            training: 0.4 + 0.02 * step + 0.01 * seed,
            "entropy": 0.4 - 0.01 * step,
            "step_time": 0.06,
            "peak_rss_bytes": 650_000_000,
            "param_bytes": 3_500_000,
            "trainable_param_bytes": 40_960,
            "grad_bytes": 40_960,
            "optimizer_bytes": 81_920,
            "train_tflops_per_s": 0.0004,
        }
        if step % 10 == 0:
            record[f"eval/{metric}"] = start + (final - start) * step / STEPS
        records.append(record)
    return records


def make_run(
    sweep: Path,
    name: str,
    method: str,
    lr: float,
    seed: int,
    final: float,
    metric: str = "accuracy",
    training: str = "reward",
    **axes: Any,
) -> None:
    folder = sweep / "runs" / name
    folder.mkdir(parents=True)
    rank = "full" if method == "full" else int(method.removeprefix("lora-r"))
    summary = {
        "recipe": "grpo_arithmetic",
        "algorithm": "grpo",
        "method": method,
        "rank": rank,
        "seed": seed,
        "steps": STEPS,
        "lr": lr,
        "headline_metric": metric,
        "higher_is_better": True,
        f"start_{metric}": 0.45,
        f"final_{metric}": final,
        f"best_{metric}": final,
        "final_reward": 0.8,
        "trainable_params": 865_920 if rank == "full" else 10_240 * rank,
        "total_params": 876_160,
        "mean_step_time": 0.06,
        "optimizer_bytes": 81_920,
        "peak_rss_bytes": 650_000_000,
        **axes,
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    lines = (json.dumps(r) for r in _records(final, seed, metric, training))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")


REPORT_MD = """# Sweep report: {name}

Recipe `grpo_arithmetic`, algorithm grpo, 20 steps per run; 4 finished runs.

## What it found

- **lora-r1**: final held-out accuracy 0.830 vs full 0.930 (-10.0 points): worse than full (beyond noise).

## Table

| method | seeds | final held-out accuracy | verdict |
|---|---|---|---|
| lora-r1 | 2 | 0.830 ± 0.010 | worse than full (beyond noise) |
| full | 2 | 0.930 ± 0.010 | baseline |

## Held-out accuracy

![Held-out accuracy](accuracy.png)
"""


def rank_sweep(root: Path, name: str = "grpo_arithmetic") -> Path:
    """A plain rank sweep as older runs left it: rank 1 and full, 2 seeds each, no lora_targets/batch_size."""
    sweep = root / name
    for seed in (1, 2):
        make_run(sweep, f"r1-s{seed}", "lora-r1", 1e-3, seed, 0.82 + 0.01 * seed)
        make_run(sweep, f"full-s{seed}", "full", 1e-4, seed, 0.92 + 0.01 * seed)
    (sweep / "report.md").write_text(REPORT_MD.format(name=name))
    return sweep


def panels(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p.get("y") or p["type"]: p for s in spec["sections"] for p in s["panels"]}


# -- the specification -------------------------------------------------------------------------


def test_spec_of_a_rank_sweep(tmp_path: Path) -> None:
    sweep = rank_sweep(tmp_path)
    spec = build_spec(sweep)

    assert spec["group"] == "grpo_arithmetic" and spec["filters"] == {"group": "grpo_arithmetic"}
    assert spec["project"] == "rl-lora" and spec["entity"] is None
    # The LR differs between methods (the LR rule), never within one: one line per method, seeds as the band.
    assert spec["groupby"] == ["config.method"] and spec["group_axes"] == ["method"]
    assert (spec["aggregate"], spec["band"]) == ("mean", "minmax")
    assert spec["varied"] == {"method": ["full", "lora-r1"], "rank": [1, "full"], "lr": [0.0001, 0.001], "seed": [1, 2]}

    found = panels(spec)
    assert set(found) == {
        "eval/accuracy",
        "reward",
        "entropy",
        "step_time",
        "peak_rss_bytes",
        "optimizer_bytes",
        "train_tflops_per_s",
        "parallel_coordinates",
    }
    assert found["reward"]["smoothing"] == 20 and found["eval/accuracy"]["smoothing"] is None
    assert spec["not_logged"] == ["kl"]  # no run logged it: no empty panel
    assert [s["name"] for s in spec["sections"]] == [
        "held-out accuracy and training curve",
        "KL and entropy",
        "cost",
        "what the sweep varied",
    ]
    assert found["parallel_coordinates"]["columns"] == ["config.method", "config.lr", "summary.final_accuracy"]
    assert [c["key"] for c in spec["runs_table"]] == [
        "config.method",
        "config.lr",
        "config.seed",
        "summary.final_accuracy",
        "summary.best_accuracy",
        "summary.trainable_params",
    ]

    report = spec["report"]
    assert report["description"].startswith("Recipe `grpo_arithmetic`")
    assert "worse than full (beyond noise)" in report["markdown"] and "| lora-r1 | 2 |" in report["markdown"]
    assert "![" not in report["markdown"] and "## Held-out accuracy" not in report["markdown"]


def test_spec_follows_what_the_sweep_varied(tmp_path: Path) -> None:
    """An LR grid within rank 1, two layer sets and two batch sizes, judged by a reward model's metric."""
    sweep = tmp_path / "rm_sweep"
    metric = {"metric": "pairwise_accuracy", "training": "accuracy"}
    for seed in (1, 2):
        for lr in (1e-3, 3e-3):
            for targets in ("attention", "mlp"):
                make_run(
                    sweep,
                    f"r1-{targets}-lr{lr:g}-s{seed}",
                    "lora-r1",
                    lr,
                    seed,
                    0.6,
                    **metric,
                    lora_targets=targets,
                    batch_size=64,
                )
        make_run(
            sweep, f"r1-bs32-s{seed}", "lora-r1", 1e-3, seed, 0.6, **metric, lora_targets="attention", batch_size=32
        )
        make_run(sweep, f"full-s{seed}", "full", 1e-4, seed, 0.7, **metric, lora_targets="all", batch_size=64)
    (sweep / "report.md").write_text(REPORT_MD.format(name="rm_sweep"))
    (sweep / "sweep.json").write_text(json.dumps({"group": "rm-group"}))
    config = "logging:\n  wandb: true\n  wandb_project: rm-project\n"
    for run in (sweep / "runs").iterdir():
        (run / "config.yaml").write_text(config)

    spec = build_spec(sweep, entity="team")

    assert spec["filters"] == {"group": "rm-group"} and (spec["entity"], spec["project"]) == ("team", "rm-project")
    assert spec["groupby"] == ["config.method", "config.lr", "summary.lora_targets", "summary.batch_size"]
    assert spec["varied"]["lora_targets"] == ["all", "attention", "mlp"] and spec["varied"]["batch_size"] == [32, 64]
    found = panels(spec)
    assert "eval/pairwise_accuracy" in found and "eval/accuracy" not in found
    assert found["accuracy"]["title"].startswith("training accuracy")  # a reward model's training curve
    assert spec["sections"][0]["name"] == "held-out pairwise accuracy and training curve"
    assert found["parallel_coordinates"]["columns"] == [
        "config.method",
        "config.lr",
        "summary.lora_targets",
        "summary.batch_size",
        "summary.final_pairwise_accuracy",
    ]
    keys = [c["key"] for c in spec["runs_table"]]
    assert keys[3:5] == ["summary.final_pairwise_accuracy", "summary.best_pairwise_accuracy"]
    assert keys[-2:] == ["summary.lora_targets", "summary.batch_size"]


def test_runs_that_did_not_log_to_wandb_are_refused(tmp_path: Path) -> None:
    sweep = rank_sweep(tmp_path)
    for run in (sweep / "runs").iterdir():
        (run / "config.yaml").write_text("logging:\n  wandb: false\n")
    with pytest.raises(DashboardError, match=r"did not log to W&B \(logging.wandb: false\)"):
        build_spec(sweep)


# -- the library's objects ---------------------------------------------------------------------


def test_workspace_view_filters_groups_and_draws_bands(tmp_path: Path) -> None:
    spec = build_spec(rank_sweep(tmp_path))
    view = build_workspace(spec, "me")._to_model().model_dump(by_alias=True, exclude_none=True)

    section = view["spec"]["section"]
    runset = section["runSets"][0]
    assert runset["filters"]["filters"] == [
        {"key": {"section": "run", "name": "group"}, "op": "=", "value": "grpo_arithmetic", "disabled": False}
    ]
    assert runset["grouping"] == [{"section": "config", "name": "method.value"}]
    assert runset["runFeed"]["columnOrder"] == [
        "run:displayName",
        "config:method.value",
        "config:lr.value",
        "config:seed.value",
        "summary:final_accuracy",
        "summary:best_accuracy",
        "summary:trainable_params",
    ]
    drawn = [p for s in section["panelBankConfig"]["sections"] for p in s["panels"]]
    lines = {p["config"]["metrics"][0]: p["config"] for p in drawn if p["viewType"] == "Run History Line Plot"}
    assert set(lines) == {
        "eval/accuracy",
        "reward",
        "entropy",
        "step_time",
        "peak_rss_bytes",
        "optimizer_bytes",
        "train_tflops_per_s",
    }
    assert all(c["groupAgg"] == "mean" and c["groupArea"] == "minmax" and c["xAxis"] == "_step" for c in lines.values())
    assert (lines["reward"]["smoothingType"], lines["reward"]["smoothingWeight"]) == ("average", 20)
    (coords,) = [p for p in drawn if p["viewType"] == "Parallel Coordinates Plot"]
    assert [c["accessor"] for c in coords["config"]["columns"]] == [
        "config:method.value",
        "config:lr.value",
        "summary:final_accuracy",
    ]


def test_report_carries_the_verdicts_and_the_same_panels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb_workspaces.reports.v2.interface as interface

    # A run set looks its project's id up on the server when serialised: answer for it.
    monkeypatch.setattr(interface, "_get_api", lambda: None)
    monkeypatch.setattr(interface, "execute_graphql", lambda *a, **k: {"project": {"internalId": "p1"}})
    spec = build_spec(rank_sweep(tmp_path))
    model = build_report(spec, "me")._to_model().model_dump(by_alias=True, exclude_none=True)

    assert model["displayName"] == "rl-lora sweep grpo_arithmetic"
    blocks = [b for b in model["spec"]["blocks"] if b["type"] != "paragraph"]
    assert blocks[0]["type"] == "markdown-block" and "worse than full (beyond noise)" in blocks[0]["content"]
    grids = [b for b in blocks if b["type"] == "panel-grid"]
    assert len(grids) == len(spec["sections"])
    for grid in grids:
        (runset,) = grid["metadata"]["runSets"]
        assert runset["filters"]["filters"][0]["value"] == "grpo_arithmetic"
        assert runset["grouping"] == [{"section": "config", "name": "method.value"}]
    drawn = [p for g in grids for p in g["metadata"]["panelBankSectionConfig"]["panels"]]
    workspace = build_workspace(spec, "me")._to_model().model_dump(by_alias=True, exclude_none=True)
    in_workspace = [p for s in workspace["spec"]["section"]["panelBankConfig"]["sections"] for p in s["panels"]]
    assert [p["config"] for p in drawn] == [p["config"] for p in in_workspace]


# -- writing and publishing --------------------------------------------------------------------


def test_offline_writes_the_spec_and_prints_how_to_publish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    sweep = rank_sweep(tmp_path)
    (sweep / "report.md").unlink()
    (sweep / "runs" / "r1-s1" / "wandb" / "offline-run-20261130_000000-abc").mkdir(parents=True)

    assert cli.main(["report", str(sweep), "--wandb", "--entity", "team"]) == 0

    out = capsys.readouterr().out.splitlines()
    assert (sweep / "report.md").is_file()  # the local report first
    spec = json.loads((sweep / SPEC_FILE).read_text())
    assert spec["entity"] == "team" and spec["group"] == "grpo_arithmetic"
    assert out[1].startswith(f"W&B dashboards: {sweep / SPEC_FILE} (a workspace and a report")
    assert out[2] == "W&B: not published (WANDB_MODE=offline); to publish, run:"
    assert out[-2:] == [
        f"  wandb sync -e team {sweep}/runs/*/wandb/offline-run-*",
        f"  rl-lora report {sweep} --wandb --entity team",
    ]


class FakeApi:
    """Stands in for wandb.Api: a login, its default entity, and the projects and groups that exist."""

    def __init__(self, logged_in: bool = True, projects: tuple[str, ...] = ("me/rl-lora",), runs: int = 4) -> None:
        self.logged_in, self.projects, self.run_count = logged_in, projects, runs
        self.default_entity = "me"

    @property
    def viewer(self) -> object:
        if not self.logged_in:
            raise ValueError("Unable to fetch user data from W&B, please verify your API key is valid.")
        return object()

    def project(self, name: str, entity: str) -> Any:
        if f"{entity}/{name}" not in self.projects:
            raise ValueError(f"Project {name} not found")
        return type("Project", (), {"id": "p1"})()

    def runs(self, path: str, filters: dict[str, str], per_page: int) -> list[int]:
        return list(range(self.run_count))


@pytest.mark.parametrize(
    ("api", "entity", "message"),
    [
        (FakeApi(logged_in=False), None, r"^W&B: not logged in \(Unable to fetch user data.*\): run `wandb login`$"),
        (
            FakeApi(),
            "nobody",
            r"^W&B: no project 'nobody/rl-lora' \(no such entity or project, or no access: "
            r"Project rl-lora not found\); sync them first: wandb sync .*/runs/\*/wandb/offline-run-\*$",
        ),
        (FakeApi(runs=0), None, r"^W&B project 'me/rl-lora' has no runs of group 'grpo_arithmetic': sync them first"),
    ],
)
def test_publish_errors_are_one_line(tmp_path: Path, api: FakeApi, entity: str | None, message: str) -> None:
    sweep = rank_sweep(tmp_path)
    (sweep / "runs" / "r1-s1" / "wandb" / "offline-run-x").mkdir(parents=True)
    with pytest.raises(DashboardError, match=message) as caught:
        publish(build_spec(sweep, entity), sweep, api)
    assert "\n" not in str(caught.value)


def test_missing_extra_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb_workspaces.workspaces", None)  # import now fails
    sweep = rank_sweep(tmp_path)
    with pytest.raises(
        DashboardError,
        match=r"^publishing W&B dashboards needs wandb-workspaces: pip install "
        r"wandb-workspaces==0\.4\.13 \(the 'dashboards' extra\)$",
    ):
        publish(build_spec(sweep), sweep, FakeApi())
    monkeypatch.setenv("WANDB_MODE", "offline")  # offline, the spec is still written; the steps name the install
    lines = dashboards(sweep)
    assert "  pip install wandb-workspaces==0.4.13" in lines and (sweep / SPEC_FILE).is_file()


def test_cli_error_keeps_the_local_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import wandb

    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setattr(wandb, "Api", lambda: FakeApi(logged_in=False))
    sweep = rank_sweep(tmp_path)
    (sweep / "report.md").unlink()

    assert cli.main(["report", str(sweep), "--wandb"]) == 2

    captured = capsys.readouterr()
    assert (sweep / "report.md").is_file() and (sweep / SPEC_FILE).is_file()
    assert captured.err.count("\n") == 1 and captured.err.startswith("rl-lora: error: W&B: not logged in")


def test_publish_saves_the_workspace_and_the_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    saved: list[Any] = []

    def save(self: Any, *args: Any) -> Any:
        saved.append(self)
        return self

    for cls in (ws.Workspace, wr.Report):
        monkeypatch.setattr(cls, "save", save)
        monkeypatch.setattr(cls, "url", property(lambda self: f"https://wandb.example/{type(self).__name__}"))
    sweep = rank_sweep(tmp_path)

    lines = publish(build_spec(sweep), sweep, FakeApi())

    assert lines == ["W&B workspace: https://wandb.example/Workspace", "W&B report: https://wandb.example/Report"]
    workspace, report = saved
    assert (workspace.entity, workspace.project, report.entity, report.project) == ("me", "rl-lora", "me", "rl-lora")
    assert workspace.name == "rl-lora sweep grpo_arithmetic"


# -- an offline run reads back -----------------------------------------------------------------


def _inspect(run_dir: Path, *flags: str) -> str:
    """W&B's own reader of a run's .wandb transaction log (wandb-core, through `wandb leet inspect`)."""
    wandb_cli = shutil.which("wandb", path=str(Path(sys.executable).parent)) or "wandb"
    result = subprocess.run(
        [wandb_cli, "leet", "inspect", str(run_dir), "--json", *flags],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0 and "No such command" in result.stderr:
        pytest.skip("this wandb has no `wandb leet inspect` (0.31 has it)")
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_offline_run_reads_back_with_wandbs_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rl_lora.training.tracking import WandbSink

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    config = {"method": "lora-r1", "rank": "1", "lr": 1e-3, "seed": 1, "train": {"batch_size": 64}}
    sink = WandbSink(
        tmp_path, "rl-lora", "r1-s1", "grpo_arithmetic", config, ["lora-r1", "grpo", "lora"], job_type="lora-r1"
    )
    records = _records(0.9, 1, "accuracy", "reward")[:12]
    for record in records:
        sink.log(record, step=record["step"])
    sink.update_config({"trainable_params": 10_240})
    sync = sink.finish(
        {
            "final_accuracy": 0.9,
            "best_accuracy": 0.9,
            "method": "lora-r1",
            "lora_targets": "all",
            "overoptimization": None,
        }
    )

    (run_dir,) = tmp_path.glob("wandb/offline-run-*")
    assert sync == f"wandb sync {run_dir}"
    read = [json.loads(line) for line in _inspect(run_dir).splitlines() if line.strip()]
    (run,) = [r["run"] for r in read if r["type"] == "run"]
    assert (run["run_group"], run["job_type"], run["project"], run["display_name"]) == (
        "grpo_arithmetic",
        "lora-r1",
        "rl-lora",
        "r1-s1",
    )
    assert run["tags"] == ["lora-r1", "grpo", "lora"]
    history = [r["history"] for r in read if r["type"] == "history"]
    assert [h["step"].get("num", 0) for h in history] == [r["step"] for r in records]
    logged = {k for r in records for k in r if k != "step"}
    assert logged <= {k for h in history for k in h["item"]}
    evals = {h["step"].get("num", 0): h["item"]["eval/accuracy"] for h in history if "eval/accuracy" in h["item"]}
    assert evals == {r["step"]: r["eval/accuracy"] for r in records if "eval/accuracy" in r}

    state = json.loads(_inspect(run_dir, "--summary"))
    assert state["state"] == "finished" and state["exit_code"] == 0
    assert {**config, "trainable_params": 10_240}.items() <= state["config"].items()
    summary = state["summary"]
    assert (summary["final_accuracy"], summary["method"], summary["lora_targets"]) == (0.9, "lora-r1", "all")
    assert "overoptimization" not in summary  # not a scalar: summary.json keeps it, W&B does not
    assert summary["reward"] == records[-1]["reward"] and summary["_step"] == records[-1]["step"]
