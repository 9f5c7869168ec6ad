"""The sweep report: ranks against the full-parameter baseline, with seed bands, from logged figures.

``rl-lora report SWEEP_DIR`` reads each finished run's ``summary.json`` and ``metrics.jsonl`` and
writes ``report.md``, a self-contained ``report.html`` (plots embedded) and the PNG plots. Nothing
in the report is typed in by hand: every number comes from what the runs logged.

The headline metric is the task's (summary.json ``headline_metric``: ``accuracy`` for the arithmetic
task, ``pairwise_accuracy`` for a reward model, a user's metric for a dataset task); every column and
plot that judges a method reads it, and "better" follows its direction.

The verdict (rl_lora/study/verdicts.py, statistics in rl_lora/study/comparison.py) compares each method at its
best LR, chosen on selection seeds, over confirmation seeds only: the gap to full with a Welch t interval
and an equivalence verdict against a stated margin. The cost table and the curves over steps read the
same confirmation runs, and so does the parameter-efficiency view (rl_lora/study/efficiency.py) when the
sweep compares methods of several sizes against full.
"""

from __future__ import annotations

import base64
import html
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402

from rl_lora.study.comparison import LEVEL  # noqa: E402
from rl_lora.study.efficiency import EfficiencyPoint, efficiency_lines, efficiency_plot, shown  # noqa: E402
from rl_lora.study.records import MANIFESTS, read_manifests, write_runs_csv  # noqa: E402
from rl_lora.study.verdicts import (  # noqa: E402
    arm_key,
    arm_label,
    collect,
    lr_lines,
    lr_plot,
    read_protocol,
    score,
    verdict_lines,
)
from rl_lora.tasks.base import RATE, Metric  # noqa: E402
from rl_lora.utils.errors import RlLoraError  # noqa: E402

REWARD_SMOOTHING = 20  # steps in the reward curve's rolling mean (one step's reward is noisy)


@dataclass
class Run:
    name: str
    summary: dict[str, Any]
    records: list[dict[str, Any]]


@dataclass
class Group:
    label: str
    rank: int | str
    runs: list[Run] = field(default_factory=list)

    def values(self, key: str) -> list[float]:
        return [r.summary[key] for r in self.runs if r.summary.get(key) is not None]


def load_runs(sweep_dir: Path) -> list[Run]:
    runs_dir = sweep_dir / "runs"
    if not runs_dir.is_dir():
        raise RlLoraError(f"'{sweep_dir}' is not a sweep folder: it has no runs/ folder")
    runs = []
    for folder in sorted(p for p in runs_dir.iterdir() if (p / "summary.json").is_file()):
        summary = json.loads((folder / "summary.json").read_text())
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
        runs.append(Run(folder.name, summary, records))
    if not runs:
        raise RlLoraError(f"sweep '{sweep_dir}' has no finished run (no runs/*/summary.json)")
    return runs


@dataclass(frozen=True)
class Headline:
    """The metric the sweep's runs are judged by, read from their summaries, with the unit the run declared
    (summary.json ``headline_unit``: ``rate`` or the name of its units; rl_lora.tasks.base.Metric)."""

    name: str
    higher_is_better: bool = True
    unit: str | None = RATE
    resolution: float | None = None

    @property
    def is_rate(self) -> bool:
        return self.unit == RATE

    @property
    def label(self) -> str:
        return f"held-out {self.name.replace('_', ' ')}"

    @property
    def plot_file(self) -> str:
        return "".join(c if c.isalnum() or c in "-_" else "_" for c in self.name) + ".png"


def headline_metric(runs: list[Run]) -> Headline:
    """The runs' common headline metric and its declared unit (runs from before tasks were plug-ins are judged
    by ``accuracy``; runs from before units were declared: see Metric.from_summary)."""
    declared = [Metric.from_summary(r.summary) for r in runs]
    found = {(m.name, m.higher_is_better, m.unit) for m in declared}
    if len(found) > 1:
        names = ", ".join(sorted({f"'{n}' ({u or 'no unit'})" for n, _, u in found}))
        raise RlLoraError(f"the sweep's runs are judged by different metrics ({names}): one report needs one")
    name, higher, unit = found.pop()
    resolutions = [m.resolution for m in declared if m.resolution]
    return Headline(name, higher, unit, max(resolutions) if resolutions else None)


def group_runs(runs: list[Run]) -> list[Group]:
    """One group per (arm, LR). Labels name the layer set and batch size where the sweep varied them, and the
    LR where an arm was run at several."""
    by_key: dict[tuple[tuple[str, str, int], float], Group] = {}
    for run in runs:
        key = (arm_key(run.summary), float(run.summary["lr"]))
        if key not in by_key:
            by_key[key] = Group(arm_label(key[0], runs), run.summary["rank"])
        by_key[key].runs.append(run)
    lrs_per_arm: dict[tuple[str, str, int], int] = {}
    for arm, _ in by_key:
        lrs_per_arm[arm] = lrs_per_arm.get(arm, 0) + 1
    for (arm, lr), group in by_key.items():
        if lrs_per_arm[arm] > 1:
            group.label = f"{group.label} lr={lr:g}"

    def order(g: Group) -> tuple[int, float, str]:
        return (1, 0.0, g.label) if g.rank == "full" else (0, float(g.rank), g.label)

    return sorted(by_key.values(), key=order)


def _mean_sd(values: list[float]) -> tuple[float, float | None]:
    if not values:
        return math.nan, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _curve(run: Run, key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in run.records if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def area_under_curve(steps: list[int], values: list[float]) -> float | None:
    """Mean of a held-out metric over training (trapezoid area / steps): rewards learning early."""
    if len(steps) < 2 or steps[-1] == steps[0]:
        return None
    area = sum((steps[i + 1] - steps[i]) * (values[i] + values[i + 1]) / 2 for i in range(len(steps) - 1))
    return area / (steps[-1] - steps[0])


def steps_to(steps: list[int], values: list[float], threshold: float, higher_is_better: bool = True) -> int | None:
    """The first step whose value reaches ``threshold`` (at or above it; at or below for lower-is-better)."""
    return next((s for s, v in zip(steps, values, strict=True) if (v >= threshold if higher_is_better
                                                                   else v <= threshold)), None)


def _peak_memory(summary: dict[str, Any]) -> float | None:
    return summary.get("cuda_max_allocated_bytes") or summary.get("peak_rss_bytes")


def _state_bytes(run: Run) -> float | None:
    """Parameters + gradients + optimizer state, from the last record that logged them."""
    last = next((r for r in reversed(run.records) if "param_bytes" in r), None)
    if last is None:
        return None
    return last["param_bytes"] + last["grad_bytes"] + last["optimizer_bytes"]


@dataclass
class Row:
    group: Group
    final: tuple[float, float | None]
    auc: float | None
    to_threshold: float | None
    memory: float | None
    state: float | None
    step_time: float | None
    optim_ratio: float | None


def build_rows(groups: list[Group], threshold: float | None, metric: Headline | None = None) -> list[Row]:
    metric = metric or Headline("accuracy")
    final_key = f"final_{metric.name}"
    rows = []
    for g in groups:
        mean, sd = _mean_sd(g.values(final_key))
        curves = [_curve(r, f"eval/{metric.name}") for r in g.runs]
        aucs = [a for a in (area_under_curve(s, v) for s, v in curves) if a is not None]
        reach = [steps_to(s, v, threshold, metric.higher_is_better) for s, v in curves] if threshold is not None else []
        reached = [x for x in reach if x is not None]
        states = [s for s in (_state_bytes(r) for r in g.runs) if s is not None]
        memories = [m for m in (_peak_memory(r.summary) for r in g.runs) if m]
        lasts = [next((x for x in reversed(r.records) if x.get("optimizer_bytes")), None) for r in g.runs]
        ratios = [x["optimizer_bytes"] / x["trainable_param_bytes"] for x in lasts
                  if x and x.get("trainable_param_bytes")]
        step_times = [statistics.fmean(t) for t in ([x["step_time"] for x in r.records if x.get("step_time")]
                                                    for r in g.runs) if t]
        rows.append(Row(
            group=g, final=(mean, sd),
            auc=statistics.fmean(aucs) if aucs else None,
            to_threshold=statistics.fmean(reached) if reach and len(reached) == len(reach) else None,
            memory=statistics.fmean(memories) if memories else None,
            state=statistics.fmean(states) if states else None,
            step_time=statistics.fmean(step_times) if step_times else None,
            optim_ratio=statistics.fmean(ratios) if ratios else None,
        ))
    return rows


def _band_plot(groups: list[Group], key: str, ylabel: str, path: Path, smooth: int = 1) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for g in groups:
        curves = [_curve(r, key) for r in g.runs]
        curves = [(s, _smooth(v, smooth)) for s, v in curves if s]
        if not curves:
            continue
        length = min(len(s) for s, _ in curves)
        steps = curves[0][0][:length]
        stacked = list(zip(*(v[:length] for _, v in curves), strict=True))
        mean = [statistics.fmean(col) for col in stacked]
        (line,) = ax.plot(steps, mean, label=f"{g.label} ({len(curves)} seeds)", lw=2 if g.rank == "full" else 1.5,
                          ls="--" if g.rank == "full" else "-")
        if len(curves) > 1:
            ax.fill_between(steps, [min(c) for c in stacked], [max(c) for c in stacked], color=line.get_color(),
                            alpha=0.18, lw=0)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{ylabel}: mean over seeds, band = min..max")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def proxy_plot(run_dir: Path, path: Path) -> Path | None:
    """One run's training proxy (smoothed) and held-out headline metric over steps, on twin axes: the picture
    of reward over-optimization (the proxy climbing while the metric falls). None when either is missing."""
    from rl_lora.config.algorithms import ALGORITHMS

    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    known = ALGORITHMS.get(summary.get("algorithm", ""))
    proxy, metric = known.proxy if known else "reward", summary.get("headline_metric", "accuracy")
    run = Run(run_dir.name, summary, records)
    p_steps, p_values = _curve(run, proxy)
    m_steps, m_values = _curve(run, f"eval/{metric}")
    if not p_steps or not m_steps:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(p_steps, _smooth(p_values, REWARD_SMOOTHING), color="#c60", label=f"training {proxy} (proxy)")
    ax.set_xlabel("step")
    ax.set_ylabel(f"training {proxy}", color="#c60")
    other = ax.twinx()
    other.plot(m_steps, m_values, color="#06c", marker="o", label=f"held-out {metric}")
    other.set_ylabel(f"held-out {metric.replace('_', ' ')}", color="#06c")
    for event in summary.get("overoptimization") or []:
        ax.axvline(event["step"], color="k", ls=":", lw=1)
    ax.set_title(f"{run_dir.name}: proxy vs held-out (dotted: over-optimization reported)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _cost_plot(rows: list[Row], path: Path) -> None:
    full = next((r for r in rows if r.group.rank == "full"), None)
    labels = [r.group.label for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6))
    for ax, attr, title in zip(
        axes, ("state", "memory", "step_time"),
        ("param + grad + optimizer bytes", "peak memory (process / CUDA)", "step time"), strict=True,
    ):
        base = getattr(full, attr) if full else None
        values = [(getattr(r, attr) / base) if base and getattr(r, attr) else math.nan for r in rows]
        ax.bar(labels, values, color=["#888" if r.group.rank == "full" else "#3a7" for r in rows])
        ax.axhline(1.0, color="k", lw=0.8, ls=":")
        ax.set_title(f"{title}\nrelative to full", fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def efficiency_points(rows: list[Row], metric: Headline, last: int) -> list[EfficiencyPoint]:
    """The parameter-efficiency view's points: each group's trainable parameters, per-seed verdict scores (the
    mean of each run's last ``last`` evaluations) and costs."""
    points = []
    for r in rows:
        params = r.group.values("trainable_params")
        scores = [x for x in (score(run, metric.name, last) for run in r.group.runs) if x is not None]
        if params and scores:
            points.append(EfficiencyPoint(r.group.label, int(params[0]), scores, r.group.rank == "full", r.memory,
                                          r.step_time))
    return points


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _table(rows: list[Row], threshold: float | None, metric: Headline) -> list[str]:
    full = next((r for r in rows if r.group.rank == "full"), None)

    def rel(row: Row, attr: str) -> str:
        base = getattr(full, attr) if full else None
        value = getattr(row, attr)
        return f"{value / base:.2f}x" if base and value else "n/a"

    reach = f" steps to {threshold:g} |" if threshold is not None else ""
    head = (f"| method | seeds | trainable params | final {metric.label} | "
            f"mean over training |{reach} param+grad+optim | vs full | peak memory | vs full | "
            f"step time | vs full | optimizer bytes / trainable param bytes |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        mean, sd = r.final
        params = r.group.values("trainable_params")
        lines.append(
            f"| {r.group.label} | {len(r.group.runs)} | {int(params[0]):,} | {_fmt(mean)}"
            f"{' ± ' + _fmt(sd) if sd is not None else ''} | {_fmt(r.auc)} | "
            + (f"{_fmt(r.to_threshold, '.0f')} | " if threshold is not None else "")
            + f"{_fmt(r.state / 2**20 if r.state else None, '.2f')} MiB | "
            f"{rel(r, 'state')} | {_fmt(r.memory / 2**30 if r.memory else None, '.2f')} GiB | {rel(r, 'memory')} | "
            f"{_fmt(r.step_time)} s | {rel(r, 'step_time')} | {_fmt(r.optim_ratio, '.2f')} |"
        )
    return lines


def write_report(sweep_dir: Path, threshold: float | None = None) -> Path:
    """Write report.md, report.html and the plots into ``sweep_dir``; returns report.md's path.

    ``threshold``: a value of the headline metric; the table then says how many steps each method took to
    reach it.
    """
    runs = load_runs(sweep_dir)
    metric = headline_metric(runs)
    protocol = read_protocol(sweep_dir)
    arms = collect(runs, protocol, metric.name, metric.higher_is_better, arm_label)
    confirmed = [r for a in arms for r in a.confirmed()[1]]
    groups = group_runs(confirmed or runs)
    rows = build_rows(groups, threshold, metric)
    plots = {
        "lr.png": f"{metric.label.capitalize()} against learning rate (selection runs)",
        metric.plot_file: f"{metric.label.capitalize()} over training at each method's "
                          f"{'best' if protocol.has_grid else 'one'} LR",
        "reward.png": f"Reward (rolling mean over {REWARD_SMOOTHING} steps)",
        "cost.png": "Memory and speed relative to the full-parameter run",
    }
    if not lr_plot(arms, protocol, metric, sweep_dir / "lr.png"):
        del plots["lr.png"]
    _band_plot(groups, f"eval/{metric.name}", metric.label, sweep_dir / metric.plot_file)
    reward_key = _training_curve_key(groups)
    if reward_key is None:
        del plots["reward.png"]
    else:
        _band_plot(groups, reward_key, reward_key, sweep_dir / "reward.png", smooth=REWARD_SMOOTHING)
        plots["reward.png"] = f"Training {reward_key} (rolling mean over {REWARD_SMOOTHING} steps)"
    _cost_plot(rows, sweep_dir / "cost.png")
    efficiency = efficiency_points(rows, metric, protocol.select_last)
    if shown(efficiency):
        efficiency_plot(efficiency, metric.label, sweep_dir / "efficiency.png")
        plots["efficiency.png"] = f"{metric.label.capitalize()} against trainable parameters"
    failures = sweep_dir / "failures.jsonl"
    failed = [json.loads(x)["run"] for x in failures.read_text().splitlines() if x.strip()] if failures.exists() else []
    finished = {r.name for r in runs}
    unfinished = list(dict.fromkeys(name for name in failed if name not in finished))  # a rerun may have finished it
    any_run = runs[0].summary
    retried = len(set(failed) - set(unfinished))
    failed_note = (f", failed and not finished: {', '.join(unfinished)}" if unfinished else "") + (
        f", {retried} run{'s' if retried != 1 else ''} finished on a later attempt" if retried else "")
    walls = [r.summary.get("wall_seconds") or 0 for r in runs]
    csv_path = write_runs_csv(sweep_dir)
    manifests = read_manifests(sweep_dir)
    unit = "a rate, in points" if metric.is_rate else f"in {metric.unit or 'its own units (none declared)'}"
    md = [
        f"# Sweep report: {sweep_dir.name}",
        "",
        f"Recipe `{any_run.get('recipe')}`, algorithm {any_run.get('algorithm')}; {len(runs)} finished runs"
        f"{failed_note}, {sum(walls) / 60:.0f} min of run time in all. Judged by {metric.label} "
        f"({'higher' if metric.higher_is_better else 'lower'} is better; {unit}). Gaps to full carry "
        f"{int(LEVEL * 100)}% two-sided Welch t intervals: an equivalence verdict is TOST at "
        f"{(1 - LEVEL) / 2:.0%} each side, a difference verdict a two-sided test at {1 - LEVEL:.0%}.",
        "",
        *([f"Records: every run's score in [{csv_path.name}]({csv_path.name}); "
           f"{len(manifests)} sweep manifest{'s' if len(manifests) != 1 else ''} "
           f"({'`manifests/`' if (sweep_dir / MANIFESTS).is_dir() else '`sweep.json`'}).", ""]
          if csv_path is not None else []),
        f"## Verdict: each method at its {'best' if protocol.has_grid else 'recipe'} LR",
        "",
        *verdict_lines(arms, protocol, metric),
        "",
    ]
    selection = lr_lines(arms, protocol, metric)
    if selection:
        md += ["## Learning-rate selection", "", *selection]
    md += [
        "## Cost",
        "",
        *_table(rows, threshold, metric),
        "",
        "Memory on CPU is the process's peak RSS, which includes the Python and torch runtime; the "
        "param+grad+optim column is the training state itself. For AdamW the last column is 2.00 "
        "(two fp32 moments per trainable parameter).",
        "",
    ]
    if shown(efficiency):
        md += ["## Parameter efficiency", "",
               f"Each method at the LR its verdict reads, smallest first: {metric.label} against trainable "
               "parameters, with peak memory and step time relative to full (plot below).", "",
               *efficiency_lines(efficiency, metric.label), ""]
    for name, title in plots.items():
        md += [f"## {title}", "", f"![{title}]({name})", ""]
    (sweep_dir / "report.md").write_text("\n".join(md), encoding="utf-8")
    (sweep_dir / "report.html").write_text(_html(md, sweep_dir), encoding="utf-8")
    return sweep_dir / "report.md"


# What each algorithm logs per training step, in order of preference, for the training-curve plot.
TRAINING_CURVES = ("reward", "rewards/margins", "accuracy", "loss")


def _training_curve_key(groups: list[Group]) -> str | None:
    """The first training figure every run logged: GRPO/PPO's reward, DPO's margin, a reward model's accuracy."""
    for key in TRAINING_CURVES:
        if all(any(r.get(key) is not None for r in run.records) for g in groups for run in g.runs):
            return key
    return None


def _html(md_lines: list[str], sweep_dir: Path) -> str:
    """A self-contained page: the markdown's table and text, images embedded as base64."""
    body: list[str] = []
    table: list[str] = []

    def flush_table() -> None:
        if not table:
            return
        cells = [[c.strip() for c in row.strip("|").split("|")] for row in table if not set(row) <= set("|-")]
        body.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cells[0]) + "</tr>"
                    + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in cells[1:])
                    + "</table>")
        table.clear()

    for line in md_lines:
        if line.startswith("|"):
            table.append(line)
            continue
        flush_table()
        if line.startswith("!["):
            name = line[line.rindex("](") + 2 : -1]
            data = base64.b64encode((sweep_dir / name).read_bytes()).decode()
            body.append(f'<img alt="{html.escape(name)}" src="data:image/png;base64,{data}">')
        elif line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.strip():
            text = html.escape(line.lstrip("- ")).replace("**", "")
            body.append(f"<p>{text}</p>")
    flush_table()
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:4px 6px}"
             "th{background:#f3f3f3}img{max-width:100%}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>rl-lora report</title><style>{style}</style>" \
           f"</head><body>{''.join(body)}</body></html>"
