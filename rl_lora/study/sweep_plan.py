"""What a sweep runs: its arms (rank or adapter x layers x batch size), each arm's LR grid, and the runs' names.

An **arm** is one method of the comparison: a LoRA rank (or ``full``) on a layer set (``lora.targets``)
at a batch size. Batch sizes keep the recipe's number of episodes (completions x steps): a larger batch
takes proportionally fewer steps, and evaluations stay as many. With ``match_params`` the first layer set
keeps each rank and every other set gets the rank whose trainable-parameter count is closest to it.

Every axis is in a run's name (``r1-attention-b64-lr0.001-s3``; full runs name no layer set, since they
train every weight), so two sweeps that differ in any of them keep separate runs in one folder.

``--adapters`` (``parse_adapters``) replaces the rank axis with PEFT adapter types (docs/adapters.md):
``lora-r1,dora-r1,vera-r256,tinylora-tied,full``. An arm of another type is named by its type, rank and
options (``vera-r256-all-b64-...``, ``tinylora-r2-weight_tying1.0-all-...``); LoRA arms keep their ``r1`` names,
so runs of earlier rank sweeps are reused. Each type's LR grid is centred on the LR rule's LoRA LR (the rule
was measured for LoRA only; docs/adapters.md), and ``--lrs`` takes a grid per type (``vera=...``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from rl_lora.adapters.targets import target_label
from rl_lora.config.adapter_options import ADAPTER_TYPES
from rl_lora.config.schema import RecipeConfig
from rl_lora.estimate.lr_rule import resolve_lr
from rl_lora.utils.errors import ConfigError

Rank = int | Literal["full"]


@dataclass(frozen=True)
class Arm:
    """One method of the comparison. ``targets``/``batch_size`` None keep the recipe's."""

    rank: Rank
    targets: str | None = None
    batch_size: int | None = None
    steps: int | None = None
    eval_every: int | None = None
    # The label of the layer set and the batch size the run gets (the recipe's where the arm keeps them).
    targets_label: str = "all"
    batch_label: int = 0
    # The PEFT adapter type (lora.adapter) and its options; ``adapter_axis`` when --adapters chose a type other
    # than the recipe's (then the run sets lora.adapter itself; a LoRA arm of a LoRA recipe keeps its overrides).
    adapter: str = "lora"
    options: tuple[tuple[str, Any], ...] = ()
    adapter_axis: bool = False

    @property
    def is_full(self) -> bool:
        return self.rank == "full"

    @property
    def method(self) -> str:
        if self.is_full:
            return "full"
        if self.adapter == "lora" and not self.options:
            return f"r{self.rank}"
        return f"{self.adapter}-r{self.rank}" + "".join(f"-{k}{v}" for k, v in self.options)

    @property
    def name(self) -> str:
        layers = "" if self.is_full else f"-{self.targets_label}"
        return f"{self.method}{layers}-b{self.batch_label}"

    def overrides(self) -> list[str]:
        out = [f"lora.rank={self.rank}"]
        if not self.is_full and (self.adapter_axis or self.adapter != "lora"):
            out.append(f"lora.adapter={self.adapter}")
            out += [f"lora.adapter_options.{k}={v}" for k, v in self.options]
        if self.targets is not None and not self.is_full:
            out.append(f"lora.targets={self.targets}")
        if self.batch_size is not None:
            out += [f"train.batch_size={self.batch_size}", f"train.steps={self.steps}",
                    f"train.eval_every={self.eval_every}"]
        return out


@dataclass(frozen=True)
class SweepPoint:
    """One run: an arm at an LR and a seed. ``lr`` None trains at the LR the recipe and the rule give."""

    arm: Arm
    seed: int
    lr: float | None = None
    resolved_lr: float = 0.0  # the LR the run trains with (for the name); set by the planner
    phase: Literal["selection", "confirmation"] = "confirmation"

    @property
    def name(self) -> str:
        return f"{self.arm.name}-lr{self.resolved_lr:g}-s{self.seed}"

    def overrides(self) -> list[str]:
        out = [*self.arm.overrides(), f"train.seed={self.seed}"]
        if self.lr is not None:
            out.append(f"train.lr={self.lr!r}" if self.arm.is_full else f"lora.lr={self.lr!r}")
        return out


@dataclass(frozen=True)
class LrGrids:
    """Each method's LR grid: explicit lists by method key (full, r1, r16, lora), the rest log-spaced around
    the method's rule LR (``points`` LRs, neighbours ``step`` x apart)."""

    explicit: dict[str, list[float]] = field(default_factory=dict)
    points: int = 5
    step: float = 2.0

    def grid(self, arm: Arm, center: float) -> list[float]:
        for key in (arm.method, arm.adapter, "full" if arm.is_full else "lora", "*"):
            if key in self.explicit:
                return sorted(self.explicit[key])
        half = (self.points - 1) / 2
        return [float(f"{center * self.step ** (i - half):.3g}") for i in range(self.points)]


def parse_ranks(text: str) -> list[Rank]:
    ranks: list[Rank] = []
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


AdapterArm = tuple[str, Rank, tuple[tuple[str, Any], ...]]  # (lora.adapter, rank, adapter options)


def parse_adapters(text: str) -> list[AdapterArm]:
    """``--adapters``: comma-separated ``<type>[-r<rank>][-tied][-u<n>]`` or ``full``, e.g.
    ``lora-r1,dora-r1,vera-r256,tinylora-tied,full``. Without ``-r`` a type gets its PEFT default rank;
    ``-tied`` (TinyLoRA) shares one vector across all layers (``weight_tying: 1.0``), ``-u<n>`` sets its size."""
    import difflib

    arms: list[AdapterArm] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if part == "full":
            arms.append(("full", "full", ()))
            continue
        kind, *rest = part.split("-")
        if kind not in ADAPTER_TYPES:
            close = difflib.get_close_matches(kind, list(ADAPTER_TYPES), n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"--adapters: '{part}': '{kind}' is not an adapter type{hint} "
                              f"(one of {', '.join(ADAPTER_TYPES)}, or full)")
        rank: Rank = ADAPTER_TYPES[kind].default_rank
        options: dict[str, Any] = {}
        for token in rest:
            if token.startswith("r") and token[1:].isdigit() and int(token[1:]) >= 1:
                rank = int(token[1:])
            elif token == "tied" and kind == "tinylora":
                options["weight_tying"] = 1.0
            elif token.startswith("u") and token[1:].isdigit() and kind == "tinylora" and int(token[1:]) >= 1:
                options["u"] = int(token[1:])
            else:
                raise ConfigError(f"--adapters: '{part}': '{token}' is not r<rank>"
                                  + (", tied or u<n>" if kind == "tinylora" else "")
                                  + " (e.g. vera-r256, tinylora-tied-u13)")
        arms.append((kind, rank, tuple(sorted(options.items()))))
    if not arms:
        raise ConfigError("--adapters: give at least one, e.g. --adapters lora-r1,vera-r256,tinylora-tied,full")
    return arms


def parse_numbers(flag: str, text: str | None, kind: type = float, positive: bool = True) -> list:
    """A comma-separated list of numbers; ``positive`` refuses zero and below (LRs, batch sizes; not seeds)."""
    if not text:
        return []
    try:
        values = [kind(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ConfigError(f"{flag}: '{text}' is not a comma-separated list of numbers") from None
    if positive and any(v <= 0 for v in values):
        raise ConfigError(f"{flag}: every value must be positive (got '{text}')")
    return values


def parse_lr_grids(text: str | None, points: int = 5, step: float = 2.0) -> LrGrids | None:
    """``--lrs``: None (no grid), ``auto``, one list for every method, or ``full=...;r1=...;lora=...``."""
    if points < 1:
        raise ConfigError(f"--lr-points must be at least 1 (got {points})")
    if step <= 1:
        raise ConfigError(f"--lr-step must be above 1 (got {step:g}): it is the ratio between neighbouring LRs")
    if not text:
        return None
    if text.strip() == "auto":
        return LrGrids({}, points, step)
    if "=" not in text:
        return LrGrids({"*": parse_numbers("--lrs", text)}, points, step)
    explicit: dict[str, list[float]] = {}
    for part in filter(None, (p.strip() for p in text.replace(" ", ";").split(";"))):
        key, _, values = part.partition("=")
        key = key.strip()
        typed = key in ADAPTER_TYPES or key.split("-", 1)[0] in ADAPTER_TYPES
        if key not in ("full", "lora") and not (key.startswith("r") and key[1:].isdigit()) and not typed:
            raise ConfigError(f"--lrs: '{key}' is not a method; use full, lora (every rank), r<rank>, an adapter "
                              "type (vera, every rank of it) or an arm's method (vera-r256), "
                              "e.g. --lrs 'full=1e-4,3e-4;r1=1e-3,3e-3'")
        explicit[key] = parse_numbers(f"--lrs {key}", values)
        if not explicit[key]:
            raise ConfigError(f"--lrs: '{key}=' lists no LR")
    return LrGrids(explicit, points, step)


def rule_lr(config: RecipeConfig, arm: Arm) -> float:
    """The LR an arm trains with when the sweep sets none: train.lr for full, the LR rule's for LoRA."""
    spec = config.lora.model_copy(update={"rank": arm.rank})
    return resolve_lr(config.train.lr, spec, arm.steps or config.train.steps).lr


def batch_arms(config: RecipeConfig, batch_sizes: list[int]) -> list[tuple[int | None, int | None, int | None]]:
    """(batch size, steps, eval_every) per batch size at the recipe's number of episodes; [(None,)*3] if none."""
    if not batch_sizes:
        return [(None, None, None)]
    base_batch, base_steps = config.train.batch_size, config.train.steps
    episodes = base_batch * base_steps
    out: list[tuple[int | None, int | None, int | None]] = []
    for size in batch_sizes:
        if episodes % size:
            raise ConfigError(f"--batch-sizes: {size} does not divide the recipe's {episodes:,} episodes "
                              f"(train.batch_size {base_batch} x train.steps {base_steps}); pick sizes that do")
        steps = episodes // size
        eval_every = max(1, round(config.train.eval_every * base_batch / size)) if config.train.eval_every else 0
        out.append((size, steps, min(eval_every, steps) if eval_every else 0))
    return out


def matched_rank(count: Callable[[int], int], reference: int, max_rank: int = 4096) -> int:
    """The rank whose trainable-parameter count ``count(rank)`` is closest to ``reference`` (ties: lower)."""
    per_rank = count(1)
    guess = max(1, round(reference / per_rank))
    candidates = [r for r in (guess - 1, guess, guess + 1) if 1 <= r <= max_rank]
    return min(candidates, key=lambda r: (abs(count(r) - reference), r))


def plan_arms(
    config: RecipeConfig,
    ranks: list[Rank],
    targets: list[str] | None = None,
    batch_sizes: list[int] | None = None,
    match_params: bool = False,
    adapters: list[AdapterArm] | None = None,
) -> list[Arm]:
    """Every arm: ranks (or ``adapters``, which replace them) x layer sets x batch sizes; one full arm per batch
    size (it trains every weight)."""
    targets = targets or []
    if match_params and len(targets) < 2:
        raise ConfigError("--match-params needs at least two layer sets in --targets, e.g. --targets attention,mlp")
    if match_params and adapters and any(kind not in ("lora", "full") for kind, _, _ in adapters):
        raise ConfigError("--match-params matches LoRA ranks across layer sets: it is not wired for --adapters "
                          "with other types")
    specs = adapters or [("full" if rank == "full" else config.lora.adapter, rank, ()) for rank in ranks]
    counter = _parameter_counter(config) if match_params else None
    arms = []
    for batch, steps, eval_every in batch_arms(config, batch_sizes or []):
        batch_label = batch if batch is not None else config.train.batch_size
        for kind, rank, options in specs:
            base = Arm(rank, None, batch, steps, eval_every, target_label(config.lora.targets), batch_label,
                       "lora" if kind == "full" else kind, options, kind not in ("full", config.lora.adapter))
            if rank == "full" or not targets:
                arms.append(base)
                continue
            for layer_set in targets:
                arm_rank = rank
                if counter is not None and layer_set != targets[0]:
                    reference = counter(int(rank), targets[0])

                    def count_on_set(r: int, s: str = layer_set, count: Callable[[int, str], int] = counter) -> int:
                        return count(r, s)

                    arm_rank = matched_rank(count_on_set, reference)
                arms.append(replace(base, rank=arm_rank, targets=layer_set, targets_label=target_label(layer_set)))
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"the sweep plans the same arm twice ({', '.join(twice)}): list each rank, layer set "
                          "and batch size once")
    return arms


def _parameter_counter(config: RecipeConfig) -> Callable[[int, str], int]:
    """count(rank, targets) -> trainable LoRA parameters on the recipe's policy (reads its config only)."""
    from rl_lora.adapters.counting import adapter_parameter_count
    from rl_lora.estimate.advisor import policy_shapes, recipe_moe

    policy = policy_shapes(config)
    moe = recipe_moe(config, policy)
    return lambda rank, targets: adapter_parameter_count(policy.linears, rank, targets, moe)


def points_for(
    config: RecipeConfig, arms: list[Arm], seeds: list[int], grids: LrGrids | None = None,
    lrs: dict[str, float] | None = None, phase: Literal["selection", "confirmation"] = "confirmation",
) -> list[SweepPoint]:
    """Runs of ``arms`` x ``seeds``: at each LR of its grid (``grids``), at a chosen LR per arm (``lrs``, by
    arm name), or at the LR the recipe and the rule give (neither)."""
    points: list[SweepPoint] = []
    for arm in arms:
        center = rule_lr(config, arm)
        if grids is not None:
            values: list[float | None] = list(grids.grid(arm, center))
        elif lrs is not None:
            values = [lrs[arm.name]]
        else:
            values = [None]
        for lr in values:
            points.extend(SweepPoint(arm, seed, lr, lr if lr is not None else center, phase) for seed in seeds)
    return points


def log_step(values: list[float]) -> float | None:
    """The ratio between neighbouring LRs of a sorted grid (geometric mean), None for fewer than two."""
    if len(values) < 2:
        return None
    return math.exp(math.log(values[-1] / values[0]) / (len(values) - 1))
