"""Fitted optimum LRs and LoRA/full ratios, with 90% bootstrap intervals, from published runs.csv files.

The sweep report gives these for a sweep folder with its runs (rl_lora/study/lr_fit.py); this reads only the
per-run CSVs in docs/experiments/, so the experiments published before the fit existed get the same figures.
A run's first evaluation (the ``start`` column; the collapse rule needs it) is taken from ``--start`` where a
CSV predates that column: on the built-in task every run starts from the same shipped warm-up and held-out
set, so every run's start is the same (0.4867 in all 192 run summaries kept on this machine).

    python bench/lr_fits.py docs/experiments/study_best_lr docs/experiments/study_short --start 0.48667
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

from rl_lora.study.lr_fit import fit_optimum, optimum_interval, ratio_interval


def read(folder: Path, start: float | None) -> tuple[dict[tuple[str, str], dict[float, list[float]]], dict]:
    """Selection scores by (arm, batch) and LR, and each arm's start score."""
    scores: dict[tuple[str, str], dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    starts: dict[tuple[str, str], float | None] = {}
    with (folder / "runs.csv").open(encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["phase"] != "selection" or row["status"] != "finished" or not row["score"]:
                continue
            key = (row["method"] if row["layers"] in ("all", "") else f"{row['method']} {row['layers']}",
                   row["batch_size"])
            scores[key][float(row["lr"])].append(float(row["score"]))
            starts[key] = float(row["start"]) if row.get("start") else start
    return scores, starts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--start", type=float, default=None, help="the first evaluation, where runs.csv has none")
    args = parser.parse_args()
    for folder in args.folders:
        scores, starts = read(folder, args.start)
        print(f"## {folder.name}")
        fits = {key: fit_optimum(s, starts[key]) for key, s in scores.items()}
        for key, fit in sorted(fits.items()):
            best = max(scores[key], key=lambda lr: sum(scores[key][lr]) / len(scores[key][lr]))
            if fit.lr is None:
                print(f"  {key[0]:<22} b{key[1]:<4} grid best {best:<9.3g} fitted: none ({fit.why})")
                continue
            interval = optimum_interval(scores[key], fit)
            span = "n/a" if interval.low is None else f"{interval.low:.3g}..{interval.high:.3g}"
            print(f"  {key[0]:<22} b{key[1]:<4} grid best {best:<9.3g} fitted {fit.lr:<9.3g} (90%: {span}; "
                  f"{len(fit.fitted)} LRs, collapsed {', '.join(f'{x:g}' for x in fit.collapsed) or 'none'})")
        for key, fit in sorted(fits.items()):
            full = fits.get(("full", key[1]))
            if key[0] == "full" or full is None or fit.lr is None or full.lr is None:
                continue
            interval = ratio_interval(scores[key], fit, scores[("full", key[1])], full)
            span = ("n/a" if interval.low is None else f"{interval.low:.3g}x..{interval.high:.3g}x")
            print(f"  ratio {key[0]:<16} b{key[1]:<4} {fit.lr / full.lr:.3g}x (90%: {span}; "
                  f"{interval.defined:.0%} of resamples with both tops)")


if __name__ == "__main__":
    main()
