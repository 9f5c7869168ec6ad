"""The non-finite guard (rl_lora/training/nonfinite.py) on GRPO, DPO and reward-model training.

NaN is injected where it comes from in real runs, inside the loss: at chosen steps the trainer's
``compute_loss`` returns ``loss * nan``, so the backward pass fills every gradient with NaN as well.
An unguarded trainer would write NaN into every trained weight at that step (checked in
``test_an_unguarded_step_would_have_poisoned_the_weights``, so the tests below can fail).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import TrainerCallback
from trl import DPOTrainer, GRPOTrainer, RewardTrainer

from rl_lora.cli import main
from rl_lora.config.schema import validate
from rl_lora.launch.runner import finish_run, prepare_run
from rl_lora.training import checkpoint
from rl_lora.training.nonfinite import NonFiniteGuard, gradients_finite
from tests_support import tiny_raw

TRL_CLASSES = {"grpo": GRPOTrainer, "dpo": DPOTrainer, "reward": RewardTrainer}


def _raw(tmp: Path, algorithm: str, **train: Any) -> dict:
    raw = tiny_raw(tmp / "runs", train={"steps": 4, "eval_every": 100, "threads": 1, **train})
    if algorithm != "grpo":  # the preference recipes of tests/test_preference_training.py
        raw = {k: v for k, v in raw.items() if k not in ("grpo", "reward")} | {"algorithm": algorithm}
        raw["data"] = {"max_operand": 30, "eval_size": 20}
        raw["train"]["batch_size"] = 8
    return raw


def poison_loss(monkeypatch: pytest.MonkeyPatch, algorithm: str, steps: set[int]) -> None:
    """Make the TRL trainer's loss NaN (and so its gradients) at the given 1-based optimizer steps."""
    cls = TRL_CLASSES[algorithm]
    original = cls.compute_loss

    def compute_loss(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(self, *args, **kwargs)
        if self.state.global_step + 1 not in steps:
            return out
        if isinstance(out, tuple):
            return (out[0] * float("nan"), *out[1:])
        return out * float("nan")

    monkeypatch.setattr(cls, "compute_loss", compute_loss)


class Snapshots(TrainerCallback):
    """Trainable weights and optimizer state after every optimizer step."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.optimizer: dict[int, dict] = {}

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                    **kwargs: Any) -> None:
        self.weights[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters()
                                           if p.requires_grad}
        self.optimizer[state.global_step] = copy.deepcopy(optimizer.state_dict()["state"])


def _train(raw: dict) -> tuple[Snapshots, dict, list[dict]]:
    threads = torch.get_num_threads()
    try:
        run = prepare_run(validate(raw))
        snaps = Snapshots()
        run.trainer.add_callback(snaps)
        run.trainer.train()
        result = finish_run(run, train_seconds=0.0)
    finally:
        torch.set_num_threads(threads)
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    return snaps, result.summary, [r for r in records if r["step"] > 0]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        all(torch.equal(torch.as_tensor(a[i][k]), torch.as_tensor(b[i][k])) for k in a[i]) for i in a
    )


@pytest.mark.parametrize("algorithm", ["grpo", "dpo", "reward"])
def test_a_nan_step_is_skipped_counted_and_the_run_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           algorithm: str) -> None:
    poison_loss(monkeypatch, algorithm, {3})
    snaps, summary, records = _train(_raw(tmp_path, algorithm))

    # Step 3 left the weights and the optimizer state (Adam's moments and step count) bit for bit as step 2 did.
    assert _same(snaps.weights[2], snaps.weights[3])
    assert _same_state(snaps.optimizer[2], snaps.optimizer[3])
    # The run went on: step 4 trained again, and every weight is finite at the end.
    assert not _same(snaps.weights[3], snaps.weights[4])
    assert all(torch.isfinite(t).all() for t in snaps.weights[4].values())

    by_step = {r["step"]: r for r in records if "nonfinite_skipped" in r}
    assert {s: r["nonfinite_skipped"] for s, r in by_step.items()} == {1: 0, 2: 0, 3: 1, 4: 0}
    assert by_step[3]["loss"] is None  # logged as what it was, not a made-up mean
    assert by_step[4]["loss"] is not None
    assert summary["nonfinite_skipped"] == 1


def test_a_nan_gradient_under_a_finite_loss_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One gradient element turns NaN after the backward pass while the loss stays finite."""
    original = GRPOTrainer.training_step

    def training_step(self: Any, model: Any, *args: Any, **kwargs: Any) -> Any:
        loss = original(self, model, *args, **kwargs)
        if self.state.global_step + 1 == 2:
            grad = next(p.grad for p in model.parameters() if p.grad is not None)
            grad.view(-1)[0] = float("nan")
        return loss

    monkeypatch.setattr(GRPOTrainer, "training_step", training_step)
    snaps, summary, records = _train(_raw(tmp_path, "grpo", steps=3))
    assert _same(snaps.weights[1], snaps.weights[2])
    assert _same_state(snaps.optimizer[1], snaps.optimizer[2])
    assert not _same(snaps.weights[2], snaps.weights[3])
    assert all(torch.isfinite(t).all() for t in snaps.weights[3].values())
    by_step = {r["step"]: r for r in records if "nonfinite_skipped" in r}
    assert {s: r["nonfinite_skipped"] for s, r in by_step.items()} == {1: 0, 2: 1, 3: 0}
    assert summary["nonfinite_skipped"] == 1


def test_an_unguarded_step_would_have_poisoned_the_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the guard the same injection writes NaN into the adapter: the injection is real."""
    poison_loss(monkeypatch, "grpo", {2})
    monkeypatch.setattr(NonFiniteGuard, "_guard_is_off", lambda self: True)
    snaps, _, _ = _train(_raw(tmp_path, "grpo", steps=2))
    assert not all(torch.isfinite(t).all() for t in snaps.weights[2].values())


def test_k_in_a_row_stop_with_one_line_and_keep_the_sealed_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    poison_loss(monkeypatch, "grpo", {3, 4})
    raw = _raw(tmp_path, "grpo", steps=8, save_every=2, max_nonfinite_steps=2)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(raw))  # JSON is YAML
    threads = torch.get_num_threads()
    try:
        code = main(["run", str(recipe), "logging.run_name=k"])
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("rl-lora: error:")]
    assert len(errors) == 1, err
    assert "step 4:" in errors[0] and "2 optimizer steps in a row (steps 3-4)" in errors[0]
    assert "train.max_nonfinite_steps: 2" in errors[0]

    run = tmp_path / "runs" / "k"
    sealed = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert sealed == ["step_000002"]  # the run stopped inside step 4, before its save
    manifest = checkpoint.verify(run / "checkpoints" / "step_000002")  # every file's sha256 matches
    assert manifest["step"] == 2
    assert not (run / "summary.json").exists() and not (run / "adapter").exists()


def test_gradients_finite_sees_nan_and_inf() -> None:
    layer = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(layer.parameters())
    assert gradients_finite(optimizer)  # no gradients yet
    layer(torch.ones(1, 3)).sum().backward()
    assert gradients_finite(optimizer)
    for bad in (float("nan"), float("inf")):
        layer.bias.grad[0] = bad
        assert not gradients_finite(optimizer)
        layer.bias.grad[0] = 0.0
