"""One run of a recipe, top to bottom: setup -> train -> save -> summary.

The config has been validated before this is called; everything that can fail on the user's
input without loading a model (reward names, preference files, the run folder) is checked before
the model loads. What differs between algorithms (GRPO, PPO, DPO, reward-model training) is three steps
of an ``Algorithm``, one module each under rl_lora/algorithms/; the trainer it builds is used through
``TrainerHandle`` only (rl_lora/algorithms/contract.py).
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from rl_lora.adapters.targets import target_label
from rl_lora.algorithms import dpo, grpo, reward_model
from rl_lora.algorithms.contract import Algorithm, TrainerHandle
from rl_lora.algorithms.ppo import trainer as ppo
from rl_lora.config.algorithms import algorithm_info
from rl_lora.config.schema import RecipeConfig
from rl_lora.estimate.advisor import check_adapter_fits
from rl_lora.estimate.lr_rule import ResolvedLR, resolve_lr
from rl_lora.models.loading import check_policy
from rl_lora.tasks.base import Metric
from rl_lora.training import checkpoint
from rl_lora.training.distributed import (
    RUN_DIR_ENV,
    bound_extension_builds,
    collective_failed,
    init_process_group,
    is_main,
    rank_report,
    skip_inference_comm_build,
    stalled_message,
    world_size,
)
from rl_lora.training.guard import OverOptimizationGuard
from rl_lora.training.memory import peak_memory
from rl_lora.training.resume import check_compatible, config_hash, find_run_dir, latest_checkpoint, truncate_metrics
from rl_lora.training.run_dir import create_run_dir, merge_disjoint, write_config, write_json_atomic
from rl_lora.training.sealing import SealCheckpoints
from rl_lora.training.tracking import RunTracker, WandbSink, held_out_label
from rl_lora.utils.errors import CheckpointError, ConfigError, DistributedError
from rl_lora.utils.library_warnings import route_library_warnings

FINAL_REWARD_WINDOW = 10  # final reward = mean over the last 10 logged steps (one step is noisy)
# A run whose headline metric ends this far below its best evaluation says so (points of a metric declared a
# rate; for a metric with units, this fraction of how far training moved it: Metric.margin_in_units).
FELL_BACK_MARGIN = 0.05

ALGORITHMS: dict[str, Algorithm[Any]] = {a.name: a for a in (grpo.ALGORITHM, ppo.ALGORITHM, dpo.ALGORITHM,
                                                               reward_model.ALGORITHM)}


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]


def _versions() -> dict[str, str]:
    return {name: version(name) for name in ("torch", "transformers", "trl", "peft", "rl-lora")}


def _say(message: str) -> None:
    if is_main():  # one line per run, not one per process
        print(message, file=sys.stderr, flush=True)


def check_saved_adapter(folder: Path) -> int:
    """Number of adapter tensors saved; raises if the file is missing or holds an empty tensor."""
    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"adapter was not written: '{path}' is missing")
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        empty = [k for k in keys if f.get_slice(k).get_shape() in ([], [0]) or 0 in f.get_slice(k).get_shape()]
    if not keys or empty:
        raise CheckpointError(f"adapter '{path}' is empty or holds zero-sized tensors: {empty[:3]}")
    return len(keys)


def _quiet_libraries() -> None:
    """Keep the console to our own progress bar and summary."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars per load/save
    hf_logging.set_verbosity_error()
    from datasets.utils import logging as datasets_logging

    datasets_logging.disable_progress_bar()  # "Tokenizing train dataset" bars of DPO / reward trainers
    # TRL 1.16 still passes transformers' deprecated gradient_checkpointing names; not the user's concern.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\..*")


@dataclass
class PreparedRun:
    """Everything set up and ready to train: nothing has been trained yet."""

    config: RecipeConfig
    run_dir: Path
    trainer: TrainerHandle
    tracker: RunTracker
    tokenizer: Any
    sink: WandbSink | None
    method: str
    lr: ResolvedLR
    source: str
    started: float
    algorithm: Algorithm[Any]
    info: dict[str, Any]
    metric: Metric
    guard: OverOptimizationGuard
    resume_from: Path | None = None  # the sealed checkpoint this run continues from
    resumed_step: int | None = None


def algorithm_for(config: RecipeConfig) -> Algorithm[Any]:
    if config.algorithm not in ALGORITHMS:
        raise ConfigError(f"algorithm '{config.algorithm}' is not wired into the runner yet "
                          f"(runnable: {', '.join(sorted(ALGORITHMS))})")
    return ALGORITHMS[config.algorithm]


def _advise(config: RecipeConfig) -> list[str]:
    """Print the capacity estimate and apply the guardrails (warnings, or a ConfigError when strict)."""
    from rl_lora.estimate.advisor import check_recipe, enforce, policy_shapes, recipe_capacity
    from rl_lora.utils.errors import RlLoraError

    try:
        policy = policy_shapes(config)  # one config read and one meta-model build for the whole advice
        _say(f"rl-lora: capacity: {recipe_capacity(config, policy).verdict}")
        advice = check_recipe(config, policy)
    except RlLoraError as exc:  # e.g. a hub model whose config cannot be read offline: advice is optional
        _say(f"rl-lora: capacity estimate unavailable ({exc})")
        return []
    enforce(advice, config.advisor.strict, stacklevel=3)
    return [str(a) for a in advice]


def _open_run_dir(config: RecipeConfig, resume: str | None, resuming: bool) -> tuple[Path, Path | None]:
    """A fresh run folder, or the interrupted run's folder and its newest sealed checkpoint.

    Under a launcher the folder already exists (made once, by the launcher) and every process uses it.
    """
    launched = os.environ.get(RUN_DIR_ENV)
    if launched and not resuming:
        return Path(launched), None
    if not resuming:
        return create_run_dir(config), None
    run_dir = find_run_dir(config, resume)
    found = latest_checkpoint(run_dir)
    check_compatible(run_dir, config)
    return run_dir, found


def prepare_run(config: RecipeConfig, resume: str | None = None, resuming: bool = False) -> PreparedRun:
    """Setup: check the user's inputs and the output folder, load the model and data, build the trainer.

    ``resuming``: continue the run in folder ``resume`` (or the newest run of this recipe) from its
    newest sealed checkpoint.
    """
    started = time.perf_counter()
    _quiet_libraries()
    algorithm = algorithm_for(config)
    checked = algorithm.check(config)  # rewards, preference files, trl options: fail before any model loads
    check_policy(config.model)  # a GGUF policy's missing package or reader, likewise
    check_adapter_fits(config)  # an adapter type PEFT cannot put on this policy (MoE experts), likewise
    advice = _advise(config)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    run_dir, resume_from = _open_run_dir(config, resume, resuming)
    route_library_warnings(run_dir)  # deprecations and notices of the libraries: <run>/warnings.log
    method = config.lora.method  # full, lora-r1, vera-r256, ...
    lr = resolve_lr(config.train.lr, config.lora, config.train.steps)
    _say(f"rl-lora: {config.name} | {config.algorithm} | {method} | lr {lr.lr:g} ({lr.reason})")
    _say(f"rl-lora: run folder {run_dir}")
    if resume_from is not None:
        _say(f"rl-lora: resuming from {resume_from}")

    loaded = algorithm.load(config, checked, config.logging.progress)
    resolved = config.to_dict()
    resolved["resolved"] = {
        "method": method,
        "lr": lr.lr,
        "lr_multiplier": lr.multiplier,
        "lr_reason": lr.reason,
        "headline_metric": loaded.metric.as_dict(),
        "policy_path": loaded.source,
        "versions": _versions(),
        "advice": advice,
        **loaded.info,
    }
    if is_main():
        write_config(run_dir, resolved)

    sink = None
    if config.logging.wandb and is_main():
        tags = [method, config.algorithm, "full" if config.lora.is_full else config.lora.adapter]
        sink = WandbSink(
            run_dir, config.logging.wandb_project, run_dir.name, config.logging.wandb_group,
            {**resolved, "rank": str(config.lora.rank), "method": method, "lr": lr.lr, "seed": config.train.seed,
             "lora_targets": target_label(config.lora.targets), "batch_size": config.train.batch_size},
            tags, job_type=method,
        )
    resumed_step = checkpoint.verify(resume_from)["step"] if resume_from is not None else None
    if resumed_step is not None and resumed_step > config.train.steps:
        raise CheckpointError(f"run '{run_dir}' is past train.steps ({config.train.steps}): its newest sealed "
                              f"checkpoint '{resume_from}' is step {resumed_step}; set train.steps to at least "
                              f"{resumed_step} to finish or extend it")
    if resumed_step == config.train.steps and world_size() > 1:
        raise CheckpointError(f"run '{run_dir}' ended its training (checkpoint '{resume_from}' is the final step) "
                              "but not its save: finishing it from that checkpoint runs in one process; rerun "
                              "the --resume without --nproc")

    # Several processes: the process group starts here (where the trainer's arguments would start it), with
    # distributed.timeout, so a stalled process fails the run instead of hanging it.
    init_process_group(config.distributed.timeout)
    if config.distributed.zero_stage is not None:  # DeepSpeed: skip the op it would compile for inference only, and
        skip_inference_comm_build()               # bound the wait on a stale lock of any other build
        bound_extension_builds(config.distributed.timeout)
    trainer = algorithm.build(config, loaded, lr.lr, run_dir / "trainer")
    # Read before training: under ZeRO-3 the counts would be of each process's partition afterwards.
    figures = trainer.figures()
    tracker = RunTracker(run_dir / "metrics.jsonl", loaded.evaluate, config.train.eval_every, figures, sink,
                         progress=config.logging.progress, main=is_main(), metric=loaded.metric)
    if resumed_step is not None:
        tracker.load_previous(truncate_metrics(run_dir / "metrics.jsonl", resumed_step, rewrite=is_main()))
    guard = OverOptimizationGuard(config.guard, loaded.metric, algorithm_info(config.algorithm).proxy, tracker.records,
                                  kl_budget=algorithm.kl_budget(config),
                                  save_best=lambda folder: _save_plain(trainer, loaded.tokenizer, folder),
                                  best_dir=run_dir / "best", main=is_main())
    callbacks: list[Any] = [tracker, guard]
    if config.train.save_every:
        meta = {"config_hash": config_hash(config), "versions": _versions()}
        callbacks.append(SealCheckpoints(run_dir / "checkpoints", meta, config.train.keep_last))
    trainer.attach(callbacks)
    trainable, total = figures["trainable_params"], figures["total_params"]
    _say(f"rl-lora: trainable params {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    return PreparedRun(config, run_dir, trainer, tracker, loaded.tokenizer, sink, method, lr, loaded.source, started,
                       algorithm, loaded.info, loaded.metric, guard, resume_from, resumed_step)


def save_policy(run: PreparedRun) -> Path:
    """The adapter (PEFT format) or the full model, as safetensors, with the tokenizer beside it.

    Under DeepSpeed every process takes part (ZeRO-3 gathers the partitioned weights) and only the
    main process writes.
    """
    out = run.run_dir / ("model" if run.config.lora.is_full else "adapter")
    run.trainer.save_policy(out)
    if not is_main():
        return out
    run.tokenizer.save_pretrained(str(out))
    if not run.config.lora.is_full:
        check_saved_adapter(out)
    return out


def _save_plain(trainer: TrainerHandle, tokenizer: Any, folder: Path) -> None:
    """The policy as it is now (one process, no DeepSpeed), replacing what ``folder`` held."""
    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    trainer.model.save_pretrained(str(staging))
    tokenizer.save_pretrained(str(staging))
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)


def _write_rank_report(run: PreparedRun) -> None:
    """Under several processes, each leaves ranks/rank<N>.json: its step count and trainable-weights hash."""
    if world_size() == 1:
        return
    report = rank_report(run.trainer.model, run.trainer.global_step)
    folder = run.run_dir / "ranks"
    folder.mkdir(exist_ok=True)
    (folder / f"rank{report['rank']}.json").write_text(json.dumps(report))


def finish_run(run: PreparedRun, train_seconds: float) -> RunResult | None:
    """Save, close W&B, write summary.json and print the closing lines (main process; others return None)."""
    _write_rank_report(run)
    out = save_policy(run)
    if not is_main():
        return None
    shutil.rmtree(run.run_dir / "trainer", ignore_errors=True)  # TRL's scratch folder; we save ourselves
    c = run.config
    summary = merge_disjoint({
        "recipe": {
            "recipe": c.name, "algorithm": c.algorithm, "method": run.method, "rank": c.lora.rank, "seed": c.train.seed,
            "lora_targets": "all" if c.lora.is_full else target_label(c.lora.targets),
            "adapter": "full" if c.lora.is_full else c.lora.adapter,
            "batch_size": c.train.batch_size, "steps": c.train.steps, "lr": run.lr.lr, "lr_reason": run.lr.reason,
        },
        "headline metric": {"held_out_metric": run.metric.description, "headline_metric": run.metric.name,
                            "higher_is_better": run.metric.higher_is_better, "headline_unit": run.metric.unit,
                            "headline_resolution": run.metric.resolution},
        "first evaluation": {f"start_{k}": v for k, v in run.tracker.start_eval.items()},
        "last evaluation": {f"final_{k}": v for k, v in run.tracker.last_eval.items()},
        "last steps' means": _final_means(run.tracker.records, run.algorithm.final_metrics),
        "loaded data": run.info,
        "trainer figures": run.tracker.static,
        "tracker": run.tracker.summary(),
        "guard": run.guard.summary(),
        "run": {
            "trained_steps": run.trainer.global_step,
            "resumed_from_step": run.resumed_step,
            "nonfinite_skipped": _total(run.tracker.records, "nonfinite_skipped"),
            "train_seconds": round(train_seconds, 2),
            "wall_seconds": round(time.perf_counter() - run.started, 2),
            "saved": str(out),
            "base_model": run.source,
        },
        "memory": peak_memory(),
    })
    summary["fell_back"] = fell_back(summary, run.metric)
    # summary.json marks the run finished (a resumed sweep skips it), so W&B closes its record first: a kill in
    # between leaves a run to be run again, not a finished one whose offline W&B file was cut short.
    try:
        sync = run.sink.finish(summary) if run.sink is not None else None
    finally:
        write_json_atomic(run.run_dir / "summary.json", summary)
    _print_summary(summary, run.run_dir, list(run.tracker.last_eval), list(run.algorithm.final_metrics), sync,
                   run.metric)
    if summary["fell_back"]:
        m = run.metric.name
        print(f"note: held-out {m.replace('_', ' ')} ended at {summary[f'final_{m}']:.3f}, below its best "
              f"{summary[f'best_{m}']:.3f} at step {summary[f'best_{m}_step']}: the last steps made it worse "
              "(docs/quickstart.md#when-a-run-ends-below-its-best)", flush=True)
    return RunResult(run.run_dir, summary)


def fell_back(summary: dict[str, Any], metric: Metric) -> bool:
    """Whether the headline metric's last evaluation is worse than its best by more than FELL_BACK_MARGIN, in
    the metric's declared unit (absolute for a rate; for units, a fraction of how far training moved it)."""
    final, best = summary.get(f"final_{metric.name}"), summary.get(f"best_{metric.name}")
    if final is None or best is None or not math.isfinite(final) or not math.isfinite(best):
        return False
    margin = metric.margin_in_units(FELL_BACK_MARGIN, best, summary.get(f"start_{metric.name}"))
    loss = best - final if metric.higher_is_better else final - best
    return loss > margin


def _final_means(records: list[dict[str, Any]], keys: Mapping[str, str]) -> dict[str, float | None]:
    """summary key -> mean of the logged key over the last FINAL_REWARD_WINDOW records that have it."""
    out = {}
    for summary_key, logged in keys.items():
        window = [r[logged] for r in records if r.get(logged) is not None][-FINAL_REWARD_WINDOW:]
        out[summary_key] = sum(window) / len(window) if window else None
    return out


def _total(records: list[dict[str, Any]], key: str) -> int | None:
    """Sum of a per-record count over the whole run (a resumed run's records include the first part's);
    None when no record has it (e.g. DeepSpeed, where the non-finite guard is off)."""
    values = [r[key] for r in records if r.get(key) is not None]
    return sum(values) if values else None


def finish_from_checkpoint(run: PreparedRun) -> RunResult | None:
    """A run killed after its final checkpoint but before (or while) saving: the checkpoint holds the final
    weights and metrics.jsonl every record, so load the weights and write what the run would have written.

    (transformers would train one step past max_steps from a final checkpoint, so nothing is trained.)
    """
    _say(f"rl-lora: {run.resume_from} is the final step ({run.resumed_step}): saving the policy and the summary "
         "from it, nothing to train")
    assert run.resume_from is not None and run.resumed_step is not None  # called when resuming from the last step
    run.trainer.restore(run.resume_from, run.resumed_step)
    out = run.run_dir / ("model" if run.config.lora.is_full else "adapter")
    shutil.rmtree(out, ignore_errors=True)  # whatever a killed save left there
    return finish_run(run, 0.0)


def run_recipe(config: RecipeConfig, resume: str | None = None, resuming: bool = False) -> RunResult | None:
    """Setup -> train -> save -> summary (from the newest checkpoint when resuming).

    Under several processes a collective that waits past ``distributed.timeout`` (or loses a process) fails the
    run with one line naming the step (DistributedError), instead of hanging it.
    """
    run: PreparedRun | None = None
    try:
        run = prepare_run(config, resume, resuming)
        return _train_and_finish(run)
    except RuntimeError as exc:
        if not collective_failed(exc):
            raise
        where = "while setting up the run" if run is None else (
            f"step {run.trainer.global_step + 1} of {config.train.steps}"
            if run.trainer.global_step < config.train.steps else "while saving the policy")
        raise DistributedError(stalled_message(where, config.distributed.timeout, exc)) from None


def _train_and_finish(run: PreparedRun) -> RunResult | None:
    config = run.config
    try:
        if run.resumed_step is not None and run.resumed_step >= config.train.steps:
            return finish_from_checkpoint(run)
        train_started = time.perf_counter()
        run.trainer.train(resume_from_checkpoint=str(run.resume_from) if run.resume_from else None)
        return finish_run(run, time.perf_counter() - train_started)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        raise CheckpointError(_disk_full_message(run.run_dir, exc)) from exc


def _disk_full_message(run_dir: Path, exc: OSError) -> str:
    """What a full disk cost: nothing sealed is lost, and how to go on."""
    where = f" while writing '{exc.filename}'" if exc.filename else ""
    try:
        newest = latest_checkpoint(run_dir)
    except CheckpointError:
        newest = None
    kept = (f"the newest sealed checkpoint '{newest}' is intact; free some space and rerun with --resume {run_dir}"
            if newest is not None else "no checkpoint had been sealed (train.save_every); free some space and rerun")
    return f"no space left on the device{where}: {kept}"


def _print_summary(
    s: dict[str, Any], run_dir: Path, eval_keys: list[str], final_keys: list[str], sync: str | None,
    metric: Metric,
) -> None:
    lines = []
    for key in eval_keys:
        start, final = s[f"start_{key}"], s[f"final_{key}"]
        # the declared unit, never a guess from the values: points for a rate headline, raw units otherwise
        change = metric.format_change(final - start) if key == metric.name else f"{final - start:+.4g}"
        headline = " (headline)" if key == s["headline_metric"] and len(eval_keys) > 1 else ""
        lines.append(f"{held_out_label(key)}{headline}: {start:.3f} -> {final:.3f} ({change})")
    for key in final_keys:
        value = s.get(key)
        lines.append(f"{key.replace('_', ' ')} (mean of last {FINAL_REWARD_WINDOW} steps): "
                     + (f"{value:.3f}" if value is not None else "n/a"))
    lines += [
        f"trainable params: {s['trainable_params']:,} of {s['total_params']:,}",
        f"time: {s['wall_seconds']:.1f} s in all, {s['train_seconds']:.1f} s training; "
        f"peak RSS {s['peak_rss_bytes'] / 2**30:.2f} GiB",
        f"saved: {s['saved']}",
        f"summary: {run_dir / 'summary.json'}",
    ]
    if sync:
        lines.append(f"W&B (offline): {sync}")
    print("\n".join(lines), flush=True)
