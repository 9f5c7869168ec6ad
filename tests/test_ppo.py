"""PPO with a critic: the math against hand-derived numbers, and short runs on a tiny random-init model.

The math tests work in fp32 with atol 1e-6; each derivation is in the test's docstring. The run
tests check what the shared-base design promises: both adapters and the value head train, the base
stays bitwise unchanged, the adapter-off network is exactly the untouched base, and policy + critic +
reference hold about one base model's parameter bytes (three for the full-parameter baseline).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from rl_lora.algorithms.ppo import losses as pm
from rl_lora.algorithms.ppo.actor_critic import VALUE_ADAPTER, unique_param_bytes
from rl_lora.algorithms.ppo.trainer import check_layout, completion_mask
from rl_lora.config.schema import validate
from rl_lora.launch.runner import finish_run, prepare_run
from rl_lora.utils.errors import ConfigError
from tests_support import tiny_raw

# One pytest-xdist worker for the file (--dist loadgroup): its tests share a run trained once.
pytestmark = pytest.mark.xdist_group("ppo")

ATOL = 1e-6
PPO_KEYS = ("loss/policy", "loss/value", "kl", "clip_frac", "value_clip_frac", "entropy", "explained_variance",
            "return_mean", "reward", "kl_coef", "lr", "num_tokens", "completions/mean_length")


def _t(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# -- the math, by hand ------------------------------------------------------------------------

def test_gae_by_hand() -> None:
    """gamma = lam = 0.5: delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1} (= delta + 0.25 A).

    Row 1, r = [0, 0, 1], V = [0.5, 0.25, 0.5], all real:
      t=2: delta = 1 + 0 - 0.5 = 0.5,               A = 0.5
      t=1: delta = 0 + 0.5*0.5 - 0.25 = 0,          A = 0 + 0.25*0.5 = 0.125
      t=0: delta = 0 + 0.5*0.25 - 0.5 = -0.375,     A = -0.375 + 0.25*0.125 = -0.34375
      returns = A + V = [0.15625, 0.375, 1.0]
    Row 2, r = [0, 2, 9], V = [1, 0.5, 7], last token padding (its 9 and 7 must be ignored):
      t=2: masked, A = 0 and V_3 counts as 0
      t=1: delta = 2 + 0 - 0.5 = 1.5,               A = 1.5
      t=0: delta = 0 + 0.5*0.5 - 1 = -0.75,         A = -0.75 + 0.25*1.5 = -0.375
      returns = [0.625, 2.0, 0]
    """
    rewards, values, mask = _t([0, 0, 1], [0, 2, 9]), _t([0.5, 0.25, 0.5], [1, 0.5, 7]), _t([1, 1, 1], [1, 1, 0])
    advantages, returns = pm.gae(rewards, values, mask, gamma=0.5, lam=0.5)
    torch.testing.assert_close(advantages, _t([-0.34375, 0.125, 0.5], [-0.375, 1.5, 0.0]), atol=ATOL, rtol=0)
    torch.testing.assert_close(returns, _t([0.15625, 0.375, 1.0], [0.625, 2.0, 0.0]), atol=ATOL, rtol=0)


def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_value() -> None:
    """gamma = lam = 1: the deltas telescope, A_t = sum_{k>=t} r_k - V_t. r = [0.1, -0.2, 1], V = [0.3, 0.4, 0.5]:
    reward-to-go = [0.9, 0.8, 1.0], so A = [0.6, 0.4, 0.5] and returns = reward-to-go."""
    advantages, returns = pm.gae(_t([0.1, -0.2, 1.0]), _t([0.3, 0.4, 0.5]), _t([1, 1, 1]), gamma=1.0, lam=1.0)
    torch.testing.assert_close(advantages, _t([0.6, 0.4, 0.5]), atol=ATOL, rtol=0)
    torch.testing.assert_close(returns, _t([0.9, 0.8, 1.0]), atol=ATOL, rtol=0)


def test_clipped_policy_loss_by_hand() -> None:
    """clip = 0.2, so r is clamped to [0.8, 1.2]; per token max(-A r, -A clamp(r)):
      r=1.5, A=1:  max(-1.5, -1.2) = -1.2   clipped (the clamped term is larger)
      r=0.5, A=1:  max(-0.5, -0.8) = -0.5
      r=1.0, A=-2: max(2, 2)       = 2
      r=1.1, A=-1: max(1.1, 1.1)   = 1.1    (inside the range: not clipped)
      r=0.5, A=-1: max(0.5, 0.8)   = 0.8    clipped
      r=3,   A=5:  padding, ignored
    loss = (-1.2 - 0.5 + 2 + 1.1 + 0.8) / 5 = 0.44; clip fraction = 2/5 = 0.4.
    d loss / d logp = -A r / 5 on unclipped tokens, 0 on clipped ones: [0, -0.1, 0.4, 0.22, 0, 0].
    """
    ratios = [1.5, 0.5, 1.0, 1.1, 0.5, 3.0]
    logps = torch.log(_t(ratios)).requires_grad_(True)
    old = torch.zeros_like(logps)
    loss, clip_frac = pm.policy_loss(logps, old, _t([1, 1, -2, -1, -1, 5]), _t([1, 1, 1, 1, 1, 0]), clip=0.2)
    assert abs(loss.item() - 0.44) <= ATOL and abs(clip_frac.item() - 0.4) <= ATOL
    loss.backward()
    torch.testing.assert_close(logps.grad, _t([0, -0.1, 0.4, 0.22, 0, 0]), atol=ATOL, rtol=0)


def test_clipped_value_loss_by_hand() -> None:
    """clip = 0.2, V_clip = V_old + clamp(V - V_old, -0.2, 0.2); per token max((V-R)^2, (V_clip-R)^2):
      V=1, V_old=0.5, R=2: V_clip = 0.7; max(1, 1.69) = 1.69   clipped
      V=0, V_old=0.5, R=1: V_clip = 0.3; max(1, 0.49) = 1
      V=2, V_old=2,   R=1: V_clip = 2;   max(1, 1)    = 1
      V=5, V_old=0,   R=0: padding, ignored
    loss = 0.5 * (1.69 + 1 + 1) / 3 = 0.615; clip fraction = 1/3.
    """
    values, old, returns, mask = _t([1, 0, 2, 5]), _t([0.5, 0.5, 2, 0]), _t([2, 1, 1, 0]), _t([1, 1, 1, 0])
    loss, clip_frac = pm.value_loss(values, old, returns, mask, clip=0.2)
    assert abs(loss.item() - 0.615) <= ATOL and abs(clip_frac.item() - 1 / 3) <= ATOL


def test_kl_estimators_by_hand() -> None:
    """p = 0.5, q = 0.25 for the sampled token: k1 = log p - log q = ln 2 = 0.693147;
    k3 = q/p - 1 - ln(q/p) = 0.5 - 1 + ln 2 = 0.193147. Where p = q both are 0."""
    logps, ref = torch.log(_t([0.5, 0.3])), torch.log(_t([0.25, 0.3]))
    torch.testing.assert_close(pm.kl_estimate(logps, ref, "k1"), _t([math.log(2), 0.0]), atol=ATOL, rtol=0)
    torch.testing.assert_close(pm.kl_estimate(logps, ref, "k3"), _t([math.log(2) - 0.5, 0.0]), atol=ATOL, rtol=0)


def test_kl_penalty_folds_into_per_token_rewards() -> None:
    """kl_coef = 0.5: r_t = -0.5 KL_t, plus the score on the last real token.
    Row 1 (3 real tokens, score 1): [-0.05, -0.1, -0.15 + 1] = [-0.05, -0.1, 0.85].
    Row 2 (2 real tokens, score 0, padding KL 9 ignored): [-0.25, 0.25, 0]."""
    rewards = pm.kl_penalised_rewards(torch.tensor([1.0, 0.0]), _t([0.1, 0.2, 0.3], [0.5, -0.5, 9]),
                                      _t([1, 1, 1], [1, 1, 0]), kl_coef=0.5)
    torch.testing.assert_close(rewards, _t([-0.05, -0.1, 0.85], [-0.25, 0.25, 0.0]), atol=ATOL, rtol=0)


def test_whitening_entropy_and_explained_variance_by_hand() -> None:
    """x = [1, 3] (+ padding 100): mean 2, population std 1, so whitened = [-1, 1, 0].
    Uniform logits over 4 tokens: entropy ln 4. Returns [1, 3], values [1, 2]: residuals [0, 1] have
    variance 0.25, returns variance 1, explained variance 1 - 0.25 = 0.75."""
    mask = _t([1, 1, 0])
    torch.testing.assert_close(pm.masked_whiten(_t([1, 3, 100]), mask), _t([-1, 1, 0]), atol=ATOL, rtol=0)
    assert abs(pm.entropy_from_logits(torch.zeros(1, 1, 4)).item() - math.log(4)) <= ATOL
    assert abs(pm.explained_variance(_t([1, 2]), _t([1, 3]), _t([1, 1])).item() - 0.75) <= ATOL


def test_completion_mask_keeps_tokens_through_the_first_eos() -> None:
    eos = 2
    completions = torch.tensor([[5, 6, 2, 0], [2, 0, 0, 0], [5, 5, 5, 5], [5, 2, 2, 2]])
    expected = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    assert torch.equal(completion_mask(completions, eos), expected)


def test_adaptive_kl_moves_the_coefficient_toward_the_target() -> None:
    """KL at 2x the target: error clipped to +0.2, 64 samples over a 10,000 horizon: beta *= 1 + 0.2 * 0.0064."""
    assert pm.adaptive_kl_coef(0.1, kl=2.0, target=1.0, num_samples=64, horizon=10_000) == pytest.approx(0.1001280)
    assert pm.adaptive_kl_coef(0.1, kl=0.0, target=1.0, num_samples=64, horizon=10_000) == pytest.approx(0.0998720)


# -- config --------------------------------------------------------------------------------------

def test_ppo_batch_must_split_into_prompts_and_minibatches() -> None:
    with pytest.raises(ConfigError, match=r"train.batch_size \(64\).*ppo.samples_per_prompt \(5\)"):
        validate({"algorithm": "ppo", "ppo": {"samples_per_prompt": 5}})
    with pytest.raises(ConfigError, match=r"train.batch_size \(64\).*ppo.minibatch_size \(48\)"):
        validate({"algorithm": "ppo", "ppo": {"minibatch_size": 48}})
    with pytest.raises(ConfigError, match="unknown key 'ppo.gama'; did you mean 'ppo.gamma'"):
        validate({"algorithm": "ppo", "ppo": {"gama": 1.0}})


def test_ppo_layout_over_processes_is_checked_before_training() -> None:
    """64 completions = 16 prompts x 4 samples, minibatches of 32: splits over 2 or 4 processes, not 3."""
    ppo = validate({"algorithm": "ppo", "ppo": {"samples_per_prompt": 4, "minibatch_size": 32}})
    check_layout(ppo, processes=4, deepspeed=True)
    with pytest.raises(ConfigError, match=r"= 16\) and ppo.minibatch_size \(32\) must divide evenly over 3"):
        check_layout(ppo, processes=3, deepspeed=True)
    with pytest.raises(ConfigError, match="needs distributed.zero_stage"):
        check_layout(ppo, processes=2, deepspeed=False)
    saving = validate({"algorithm": "ppo", "train": {"save_every": 10}, "distributed": {"zero_stage": 2}})
    check_layout(saving, processes=2, deepspeed=True)  # checkpoints under DeepSpeed on one machine
    with pytest.raises(ConfigError, match=r"train.save_every under DeepSpeed works on one machine only .* spans 2"):
        check_layout(saving, processes=2, deepspeed=True, nodes=2)
    accumulating = validate({"algorithm": "ppo", "distributed": {"zero_stage": 2, "gradient_accumulation": 2}})
    with pytest.raises(ConfigError, match="distributed.gradient_accumulation must be 1"):
        check_layout(accumulating, processes=1, deepspeed=True)


# -- runs on a tiny random-init model ----------------------------------------------------------------

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tiny model's matrices gain nothing from a second thread, and on a busy machine a second
    thread stalls every small op (docs/ppo.md); the previous count is restored for other tests."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _ppo_raw(output_dir: Path, **sections: dict) -> dict:
    raw = tiny_raw(output_dir, ppo={"samples_per_prompt": 4, "max_completion_length": 4, "epochs": 2,
                                    "minibatch_size": 8}, **sections)
    raw["algorithm"] = "ppo"
    del raw["grpo"]  # a PPO recipe has no GRPO section
    return raw


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters() if not torch.equal(before[n], p.detach())}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory):
    run = prepare_run(validate(_ppo_raw(tmp_path_factory.mktemp("runs"))))
    trainer = run.trainer
    frozen = {n for n, p in trainer.model.named_parameters() if not p.requires_grad}
    before, head_before = _snapshot(trainer.model), _snapshot(trainer.ac.value_head)
    trainer.train()
    changed, head_changed = _changed(before, trainer.model), _changed(head_before, trainer.ac.value_head)
    result = finish_run(run, train_seconds=0.0)
    return run, frozen, changed, head_changed, result


def test_both_adapters_and_the_value_head_train_and_the_base_is_bitwise_unchanged(lora_run) -> None:
    run, frozen, changed, head_changed, _ = lora_run
    names = [n for n, _ in run.trainer.model.named_parameters()]
    policy = [n for n in names if "lora_" in n and f".{VALUE_ADAPTER}." not in n]
    value = [n for n in names if "lora_" in n and f".{VALUE_ADAPTER}." in n]
    # every attention and MLP linear of the 4 layers carries both adapters (A and B each)
    assert len(policy) == len(value) == 4 * 7 * 2
    assert frozen == set(names) - set(policy) - set(value)
    assert set(policy) <= changed, f"policy adapter tensors that did not train: {set(policy) - changed}"
    assert set(value) <= changed, f"value adapter tensors that did not train: {set(value) - changed}"
    assert head_changed == {"weight", "bias"}
    assert not frozen & changed, f"frozen base parameters that changed: {frozen & changed}"


def test_adapters_off_is_exactly_the_untouched_base(lora_run) -> None:
    """The reference is the trained PeftModel with its (now non-zero) adapters disabled."""
    run, *_, result = lora_run
    policy = run.trainer.model.eval()
    base = AutoModelForCausalLM.from_pretrained(result.summary["base_model"]).eval()
    batch = run.tokenizer(["12+35=", "99+99=", "10+1="], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = base(**batch).logits
        trained = policy(**batch).logits
        with policy.disable_adapter():
            reference = policy(**batch).logits
        from_trainer = run.trainer.ac.reference_logits(dict(batch), keep=batch["input_ids"].shape[1])
    assert not torch.equal(trained, expected), "the policy adapter should have moved the logits"
    assert torch.equal(reference, expected) and torch.equal(from_trainer, expected)
    assert all(p.requires_grad for p in run.trainer.ac.policy_params + run.trainer.ac.critic_params)


def test_run_logs_ppo_figures_and_shared_base_memory(lora_run) -> None:
    run, *_, result = lora_run
    summary = result.summary
    assert summary["algorithm"] == "ppo"
    assert summary["ppo_param_bytes_vs_base"] <= 1.1
    # base + two rank-1 adapters (10,240 params each) + a 129-param value head, fp32, counted once
    assert summary["ppo_param_bytes"] == summary["ppo_base_param_bytes"] + 4 * (2 * 10_240 + 129)
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for key in (*PPO_KEYS, "step_time", "peak_rss_bytes", "ppo_param_bytes"):
        assert all(key in r for r in steps), key
    assert steps[0]["num_tokens"] < steps[1]["num_tokens"] < steps[2]["num_tokens"]
    assert "eval/accuracy" in steps[1] and "eval/accuracy" in steps[2]


def test_saved_policy_adapter_loads_with_plain_peft(lora_run) -> None:
    run, *_, result = lora_run
    base = AutoModelForCausalLM.from_pretrained(result.summary["base_model"])
    loaded = PeftModel.from_pretrained(base, str(result.run_dir / "adapter")).eval()
    batch = run.tokenizer(["12+35=", "10+1="], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert (run.trainer.model.eval()(**batch).logits - loaded(**batch).logits).abs().max().item() <= 1e-5


def test_full_parameter_ppo_holds_three_models_and_trains_policy_and_critic(tmp_path: Path) -> None:
    # Also exercises the k3 estimator and the adaptive KL controller (KL starts at 0, below the target).
    raw = _ppo_raw(tmp_path, lora={"rank": "full"}, train={"steps": 2})
    raw["ppo"].update({"kl_estimator": "k3", "adaptive_kl": True})
    run = prepare_run(validate(raw))
    ac = run.trainer.ac
    assert unique_param_bytes(ac.policy, ac.critic_backbone, ac.reference) >= 3 * run.trainer.base_param_bytes
    before = {name: _snapshot(m) for name, m in (("policy", ac.policy), ("critic", ac.critic_backbone),
                                                  ("head", ac.value_head), ("reference", ac.reference))}
    run.trainer.train()
    assert _changed(before["policy"], ac.policy) == set(before["policy"])
    assert _changed(before["head"], ac.value_head) == {"weight", "bias"}
    assert _changed(before["critic"], ac.critic_backbone) == set(before["critic"]), "the critic did not train"
    assert not _changed(before["reference"], ac.reference), "the reference must stay frozen"
    result = finish_run(run, train_seconds=0.0)
    assert result.summary["ppo_param_bytes_vs_base"] >= 3.0
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["kl_coef"] for r in records if r["step"] > 0][-1] < 0.05
    assert (result.run_dir / "model" / "model.safetensors").is_file()


def test_merged_rollouts_sample_what_unmerged_rollouts_sample(lora_run) -> None:
    """With the trained (non-zero) policy adapter: the same seed gives the same completions either way,
    and sampling leaves every weight as it was."""
    run, *_ = lora_run
    trainer = run.trainer
    prompts = ["12+35=", "99+99=", "10+1=", "57+68="] * 4
    before = _snapshot(trainer.model)
    completions = {}
    for merge in (True, False):
        trainer.spec.merge_rollouts = merge
        torch.manual_seed(7)
        completions[merge] = trainer._sample(prompts)[2]
    trainer.spec.merge_rollouts = True
    assert torch.equal(completions[True], completions[False])
    assert not _changed(before, trainer.model)


def test_zero3_padding_is_not_read_as_weights() -> None:
    """A ZeRO-3 partition ends in never-written padding when the size does not split evenly: NaN there
    must not stop a checkpoint (it did, for the 1-element value-head bias on the second of two processes)."""
    from rl_lora.algorithms.ppo.trainer import zero3_local_values

    nan = float("nan")
    bias = torch.zeros(0)  # what a partitioned parameter holds outside a gather
    bias.ds_numel, bias.ds_tensor = 1, torch.tensor([nan])  # rank 1's partition: padding only
    assert zero3_local_values(bias, rank=1).numel() == 0
    bias.ds_tensor = torch.tensor([0.5])  # rank 0 holds the one real element
    assert zero3_local_values(bias, rank=0).tolist() == [0.5]
    weight = torch.zeros(0)
    weight.ds_numel, weight.ds_tensor = 5, torch.tensor([1.0, nan, nan])  # 5 over 2 processes: 3 + (2 + 1 pad)
    assert zero3_local_values(weight, rank=1).numel() == 2
    assert not torch.isfinite(zero3_local_values(weight, rank=1)).all()  # a real NaN is still seen
    plain = torch.ones(3)
    assert zero3_local_values(plain, rank=1) is plain
