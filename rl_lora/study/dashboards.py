"""W&B dashboards for a sweep: a saved workspace view and a report, built with W&B's own UI library.

    rl-lora report SWEEP_DIR --wandb [--entity ENTITY] [--project PROJECT]

After the local report is written, this module reads the same runs (``summary.json``, ``metrics.jsonl``) and
describes two W&B pages in one specification, ``wandb_dashboards.json`` in the sweep folder:

- a **workspace view** filtered to the sweep's W&B group (the sweep folder's name), grouped by method (and
  by any axis that took several values within one method: LR, LoRA targets, batch size), each group drawn as
  its mean over seeds with a min-max band; panels for the held-out headline metric, the training curve, KL
  and entropy, step time, peak memory, optimizer bytes and TFLOP/s (only those some run logged), a
  parallel-coordinates panel over the axes the sweep varied, and a runs table;
- a **report** carrying what ``rl-lora report`` concluded (its findings, table and verdicts, read from
  ``report.md``) above the same panels.

Logged in (``rl_lora.training.tracking.wandb_mode``), the pages are published with ``wandb-workspaces`` (the
``dashboards`` extra); offline, the specification is all that is written, and the commands that sync the
runs and publish the pages are printed. The specification is plain JSON so that it can be read, diffed and
tested without the library or a server; ``build_workspace`` and ``build_report`` turn it into the library's
objects.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any

import yaml

from rl_lora.study.report import REWARD_SMOOTHING, TRAINING_CURVES, Run, headline_metric, load_runs
from rl_lora.utils.errors import DashboardError, first_line

SPEC_FILE = "wandb_dashboards.json"
EXTRA_HINT = "pip install wandb-workspaces==0.4.13 (the 'dashboards' extra)"

# summary.json key -> the W&B key a dashboard groups by and shows ("section.name"). Method, LR and seed are in
# every run's W&B config; the layer set and batch size are read from the W&B summary, which WandbSink fills
# from summary.json, so they mean there exactly what the local report reads.
AXES = {
    "method": "config.method",
    "rank": "config.rank",
    "lr": "config.lr",
    "seed": "config.seed",
    "lora_targets": "summary.lora_targets",
    "batch_size": "summary.batch_size",
}
# Axes that can split one method's runs into several lines (seeds never do: they make the band).
SPLIT_AXES = ("lr", "lora_targets", "batch_size")


# -- the specification -------------------------------------------------------------------------


def varied_axes(runs: list[Run]) -> dict[str, list[Any]]:
    """Every axis that takes more than one value across the runs, with its values."""
    out = {}
    for axis in AXES:
        values = {json.dumps(r.summary.get(axis)): r.summary.get(axis) for r in runs}
        if len(values) > 1:
            out[axis] = sorted(values.values(), key=lambda v: (v is None, str(v)))
    return out


def group_axes(runs: list[Run]) -> list[str]:
    """Method, then each axis with several values inside one method. A plain rank sweep's LR varies across
    the sweep but not within a method (the LR rule sets it per rank), so it does not split a method's line."""
    axes = ["method"]
    for axis in SPLIT_AXES:
        per_method: dict[Any, set[str]] = {}
        for r in runs:
            per_method.setdefault(r.summary.get("method"), set()).add(json.dumps(r.summary.get(axis)))
        if any(len(v) > 1 for v in per_method.values()):
            axes.append(axis)
    return axes


def _line(title: str, key: str, smoothing: int | None = None) -> dict[str, Any]:
    return {"type": "line", "title": title, "y": key, "smoothing": smoothing}


def panel_sections(metric: str, logged: set[str], varied: dict[str, list[Any]]) -> tuple[list[dict], list[str]]:
    """The panels, in sections, for the keys some run logged; also the standard keys no run logged."""
    missing: list[str] = []

    def keep(*panels: dict[str, Any]) -> list[dict[str, Any]]:
        missing.extend(p["y"] for p in panels if p["y"] not in logged)
        return [p for p in panels if p["y"] in logged]

    training = next((k for k in TRAINING_CURVES if k in logged), None)
    memory = "cuda_max_allocated_bytes" if "cuda_max_allocated_bytes" in logged else "peak_rss_bytes"
    curves = keep(_line(f"held-out {metric.replace('_', ' ')}", f"eval/{metric}"))
    if training is not None:
        # Running average over REWARD_SMOOTHING points: the local report's smoothing of the same curve.
        curves += keep(
            _line(f"training {training} (running average of {REWARD_SMOOTHING})", training, REWARD_SMOOTHING)
        )
    sections = [
        {"name": f"held-out {metric.replace('_', ' ')} and training curve", "panels": curves},
        {"name": "KL and entropy", "panels": keep(_line("KL to the reference", "kl"), _line("entropy", "entropy"))},
        {
            "name": "cost",
            "panels": keep(
                _line("step time (s)", "step_time"),
                _line("peak memory (bytes)", memory),
                _line("optimizer state (bytes)", "optimizer_bytes"),
                _line("training TFLOP/s", "train_tflops_per_s"),
            ),
        },
    ]
    # Method stands for rank (lora-r4, full); seeds are the spread, not a setting.
    axes = [a for a in varied if a not in ("rank", "seed")] or ["method"]
    sections.append(
        {
            "name": "what the sweep varied",
            "panels": [
                {
                    "type": "parallel_coordinates",
                    "title": f"{', '.join(axes)} against final {metric}",
                    "columns": [*(AXES[a] for a in axes), f"summary.final_{metric}"],
                }
            ],
        }
    )
    return [s for s in sections if s["panels"]], missing


def runs_table(metric: str, axes: list[str]) -> list[dict[str, str]]:
    """The runs table's columns: method, LR, seed, final and best metric, trainable parameters, other axes."""
    columns = [
        ("method", AXES["method"]),
        ("LR", AXES["lr"]),
        ("seed", AXES["seed"]),
        (f"final {metric}", f"summary.final_{metric}"),
        (f"best {metric}", f"summary.best_{metric}"),
        ("trainable params", "summary.trainable_params"),
    ]
    columns += [(axis, AXES[axis]) for axis in axes if AXES[axis] not in {key for _, key in columns}]
    return [{"label": label, "key": key} for label, key in columns]


def _wandb_project(sweep_dir: Path, runs: list[Run]) -> str:
    """The W&B project the runs logged to (their config.yaml's logging.wandb_project)."""
    from rl_lora.config.schema import LoggingSpec

    projects, logged = set(), False
    for run in runs:
        path = sweep_dir / "runs" / run.name / "config.yaml"
        section = (yaml.safe_load(path.read_text()) or {}).get("logging", {}) if path.is_file() else {}
        projects.add(section.get("wandb_project", LoggingSpec().wandb_project))
        logged = logged or section.get("wandb", True)
    if not logged:
        raise DashboardError(
            f"sweep '{sweep_dir}': its runs did not log to W&B (logging.wandb: false), so a "
            "W&B dashboard would have nothing to show"
        )
    if len(projects) > 1:
        raise DashboardError(
            f"sweep '{sweep_dir}': its runs logged to several W&B projects "
            f"({', '.join(sorted(projects))}): pass --project"
        )
    return projects.pop()


def _report_text(sweep_dir: Path) -> tuple[str, str]:
    """report.md as (its opening paragraph, the rest without the plot sections, which become W&B panels)."""
    path = sweep_dir / "report.md"
    if not path.is_file():
        raise DashboardError(f"sweep '{sweep_dir}' has no report.md: run rl-lora report {sweep_dir} first")
    intro: list[str] = []
    sections: list[list[str]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            sections.append([line])
        elif sections:
            sections[-1].append(line)
        elif not line.startswith("# "):
            intro.append(line)
    kept = [s for s in sections if not any(x.startswith("![") for x in s)]
    return " ".join(x for x in intro if x.strip()), "\n".join("\n".join(s).strip() + "\n" for s in kept)


def build_spec(sweep_dir: Path, entity: str | None = None, project: str | None = None) -> dict[str, Any]:
    """The workspace and report for a sweep folder (with its report.md written), as plain data."""
    runs = load_runs(sweep_dir)
    metric = headline_metric(runs)
    manifest = sweep_dir / "sweep.json"
    group = json.loads(manifest.read_text()).get("group", sweep_dir.name) if manifest.is_file() else sweep_dir.name
    logged = {key for run in runs for record in run.records for key in record}
    varied = varied_axes(runs)
    axes = group_axes(runs)
    sections, missing = panel_sections(metric.name, logged, varied)
    intro, markdown = _report_text(sweep_dir)
    return {
        "format": 1,
        "entity": entity or os.environ.get("WANDB_ENTITY") or None,  # None: the login's default entity
        "project": project or _wandb_project(sweep_dir, runs),
        "group": group,
        "runs": len(runs),
        "headline_metric": metric.name,
        "higher_is_better": metric.higher_is_better,
        "varied": varied,
        "filters": {"group": group},
        "group_axes": axes,
        "groupby": [AXES[a] for a in axes],
        "aggregate": "mean",
        "band": "minmax",
        "sections": sections,
        "not_logged": missing,
        "runs_table": runs_table(metric.name, axes),
        "workspace": {"name": f"rl-lora sweep {group}"},
        "report": {"title": f"rl-lora sweep {group}"[:128], "description": intro, "markdown": markdown},
    }


# -- the library's objects ---------------------------------------------------------------------


def _library() -> tuple[Any, Any]:
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ImportError:
        raise DashboardError(f"publishing W&B dashboards needs wandb-workspaces: {EXTRA_HINT}") from None
    return ws, wr


def _split(key: str) -> tuple[str, str]:
    section, name = key.split(".", 1)
    return section, name


def _column(key: str) -> str:
    """A runs-table column as W&B addresses it: config keys carry '.value'."""
    section, name = _split(key)
    return f"config:{name}.value" if section == "config" else f"{section}:{name}"


def _panels(spec: dict[str, Any], section: dict[str, Any]) -> list[Any]:
    _, wr = _library()
    metric = {"config": wr.Config, "summary": wr.SummaryMetric}
    panels = []
    for p in section["panels"]:
        if p["type"] == "line":
            smoothing = {"smoothing_type": "average", "smoothing_factor": p["smoothing"]} if p["smoothing"] else {}
            panels.append(
                wr.LinePlot(
                    title=p["title"],
                    x="Step",
                    y=[p["y"]],
                    groupby_aggfunc=spec["aggregate"],
                    groupby_rangefunc=spec["band"],
                    **smoothing,
                )
            )
        else:
            columns = [
                wr.ParallelCoordinatesPlotColumn(metric=metric[part](name)) for part, name in map(_split, p["columns"])
            ]
            panels.append(wr.ParallelCoordinatesPlot(title=p["title"], columns=columns))
    return panels


def _group_filter(spec: dict[str, Any]) -> Any:
    ws, _ = _library()
    return ws.And(ws.Metric("Group") == spec["filters"]["group"])


def build_workspace(spec: dict[str, Any], entity: str) -> Any:
    """The saved workspace view: the sweep's group only, grouped by method (and split axes), the runs table."""
    ws, _ = _library()
    by = {"config": ws.Config, "summary": ws.Summary}
    return ws.Workspace(
        entity=entity,
        project=spec["project"],
        name=spec["workspace"]["name"],
        sections=[ws.Section(name=s["name"], panels=_panels(spec, s), is_open=True) for s in spec["sections"]],
        settings=ws.WorkspaceSettings(x_axis="Step", max_runs=max(10, spec["runs"])),
        runset_settings=ws.RunsetSettings(
            filters=_group_filter(spec),
            groupby=[by[section](name) for section, name in map(_split, spec["groupby"])],
            pinned_columns=[_column(c["key"]) for c in spec["runs_table"]],
        ),
    )


def build_report(spec: dict[str, Any], entity: str) -> Any:
    """The report: the local report's findings, table and verdicts, then every panel over the sweep's runs."""
    _, wr = _library()
    blocks: list[Any] = [wr.MarkdownBlock(text=spec["report"]["markdown"])]
    for section in spec["sections"]:
        runset = wr.Runset(
            entity=entity,
            project=spec["project"],
            name=spec["group"],
            filters=_group_filter(spec),
            groupby=list(spec["groupby"]),
            pinned_columns=[_column(c["key"]) for c in spec["runs_table"]],
        )
        blocks += [wr.H2(text=section["name"]), wr.PanelGrid(runsets=[runset], panels=_panels(spec, section))]
    return wr.Report(
        entity=entity,
        project=spec["project"],
        title=spec["report"]["title"],
        description=spec["report"]["description"],
        width="fluid",
        blocks=blocks,
    )


# -- publishing --------------------------------------------------------------------------------



def sync_command(sweep_dir: Path, entity: str | None = None, project: str | None = None) -> str | None:
    """`wandb sync` over the sweep's offline run folders (into ENTITY/PROJECT when given); None when there are
    none."""
    if not any(sweep_dir.glob("runs/*/wandb/offline-run-*")):
        return None
    where = (f" -e {shlex.quote(entity)}" if entity else "") + (f" -p {shlex.quote(project)}" if project else "")
    return f"wandb sync{where} {shlex.quote(str(sweep_dir))}/runs/*/wandb/offline-run-*"


def publish(spec: dict[str, Any], sweep_dir: Path, api: Any = None) -> list[str]:
    """Save the workspace view and the report to W&B; returns the lines to print (their addresses)."""
    _library()
    import wandb

    hint = sync_command(sweep_dir, spec["entity"])
    sync = f"sync them first: {hint}" if hint else "check --entity and --project"
    try:
        api = api or wandb.Api()
        api.viewer  # noqa: B018 -- fails here, with the server's reason, when the key is missing or refused
    except Exception as exc:
        raise DashboardError(f"W&B: not logged in ({first_line(exc)}): run `wandb login`") from None
    entity = spec["entity"] or api.default_entity
    path = f"{entity}/{spec['project']}"
    try:
        api.project(spec["project"], entity).id  # noqa: B018 -- raises when the entity or project does not exist
        found = len(api.runs(path, filters={"group": spec["group"]}, per_page=1))
    except Exception as exc:
        raise DashboardError(
            f"W&B: no project '{path}' (no such entity or project, or no access: {first_line(exc)}); {sync}"
        ) from None
    if not found:
        raise DashboardError(f"W&B project '{path}' has no runs of group '{spec['group']}': {sync}")
    try:
        workspace = build_workspace(spec, entity).save()
        report = build_report(spec, entity).save()
        return [f"W&B workspace: {workspace.url}", f"W&B report: {report.url}"]
    except Exception as exc:
        raise DashboardError(f"W&B refused the dashboards for '{path}': {first_line(exc)}") from None


def dashboards(sweep_dir: Path, entity: str | None = None, project: str | None = None) -> list[str]:
    """``rl-lora report SWEEP_DIR --wandb``: write the specification; publish it when logged in.

    Returns the lines to print. Offline (or not logged in), they say where the specification went and the
    commands that sync the runs and publish the pages.
    """
    from rl_lora.training.tracking import wandb_host, wandb_mode

    spec = build_spec(sweep_dir, entity, project)
    path = sweep_dir / SPEC_FILE
    path.write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
    panels = sum(len(s["panels"]) for s in spec["sections"])
    wrote = (
        f"W&B dashboards: {path} (a workspace and a report for group '{spec['group']}' in project "
        f"'{spec['project']}': {panels} panels, grouped by {', '.join(spec['group_axes'])}, seeds as min-max "
        "bands)"
    )
    mode = wandb_mode()
    if mode == "online":
        return [wrote, *publish(spec, sweep_dir)]
    reason = f"WANDB_MODE={mode}" if os.environ.get("WANDB_MODE") else f"not logged in to {wandb_host()}"
    command = f"rl-lora report {shlex.quote(str(sweep_dir))} --wandb"
    command += f" --entity {shlex.quote(entity)}" if entity else ""
    command += f" --project {shlex.quote(project)}" if project else ""
    steps = ["unset WANDB_MODE"] if os.environ.get("WANDB_MODE") else []
    try:
        _library()
    except DashboardError:
        steps.append(EXTRA_HINT.split(" (")[0])
    steps.append("wandb login")  # says so and returns when a login is already there
    hint = sync_command(sweep_dir, entity, project)
    steps += [hint, command] if hint else [command]
    return [wrote, f"W&B: not published ({reason}); to publish, run:", *(f"  {s}" for s in steps)]
