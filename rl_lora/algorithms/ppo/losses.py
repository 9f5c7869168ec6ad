"""PPO's math as pure functions: no state, no device moves, no models; tensors in, tensors out.

Shapes are in the names: ``B`` sequences (completions) in a batch, ``T`` completion tokens, ``V`` the
vocabulary. A ``mask_B_T`` is 1 on a completion's real tokens (up to and including its EOS) and 0 on
the padding after it; every function here ignores what sits under a 0, even NaN or inf.

Sources: GAE is Schulman et al. 2016 (arXiv 1506.02438, eq. 16); the clipped policy objective is
Schulman et al. 2017 (arXiv 1707.06347, eq. 7); the per-token KL penalty folded into the reward and
the adaptive KL controller are Ziegler et al. 2019 (arXiv 1909.08593, section 2.2); the clipped value
loss is OpenAI baselines' ppo2; the k1/k3 KL estimators are from Schulman's note "Approximating KL
divergence" (2020). TRL 1.16 has no PPO (docs/findings.md, environment notes), so this is written here.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor


def _zero_where_masked(x: Tensor, mask: Tensor) -> Tensor:
    # torch.where, not x * mask: NaN * 0 is NaN, and padded positions may hold anything.
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1 (all of them, or along ``dim``)."""
    total = _zero_where_masked(x, mask)
    count = mask.to(x.dtype)
    if dim is None:
        return total.sum() / count.sum().clamp(min=1)
    return total.sum(dim) / count.sum(dim).clamp(min=1)


def masked_var(x: Tensor, mask: Tensor) -> Tensor:
    """Population variance of ``x`` over the masked-in positions."""
    centred = x - masked_mean(x, mask)
    return masked_mean(centred * centred, mask)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over the masked-in positions; 0 under the mask. ``shift_mean=False`` keeps the mean."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _zero_where_masked(whitened, mask)


def token_logps(logits_B_T_V: Tensor, tokens_B_T: Tensor) -> Tensor:
    """log p(token) under the logits at each position."""
    logps_B_T_V = torch.log_softmax(logits_B_T_V.float(), dim=-1)
    return logps_B_T_V.gather(-1, tokens_B_T.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits_B_T_V: Tensor) -> Tensor:
    """Entropy of the categorical distribution at each position: logsumexp(l) - sum softmax(l) * l."""
    logits = logits_B_T_V.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


def kl_estimate(logps_B_T: Tensor, ref_logps_B_T: Tensor, kind: Literal["k1", "k3"] = "k1") -> Tensor:
    """Per-token estimate of KL(policy || reference) from tokens sampled from the policy.

    k1 = log p - log q (unbiased, can be negative per token); k3 = (q/p) - 1 - log(q/p) (unbiased and
    never negative, lower variance when the two are close).
    """
    if kind == "k1":
        return logps_B_T - ref_logps_B_T
    if kind == "k3":
        log_ratio = ref_logps_B_T - logps_B_T
        return torch.exp(log_ratio) - 1 - log_ratio
    raise ValueError(f"unknown KL estimator '{kind}' (expected 'k1' or 'k3')")


def kl_penalised_rewards(scores_B: Tensor, kl_B_T: Tensor, mask_B_T: Tensor, kl_coef: float) -> Tensor:
    """Per-token rewards: -kl_coef * KL_t at every token, plus the task score on the last real token."""
    rewards_B_T = _zero_where_masked(-kl_coef * kl_B_T, mask_B_T)
    last_B = (mask_B_T.long().sum(dim=1) - 1).clamp(min=0)
    scores_B_1 = scores_B.to(rewards_B_T.dtype).unsqueeze(1)
    bonus_B_T = torch.zeros_like(rewards_B_T).scatter(1, last_B.unsqueeze(1), scores_B_1)
    return rewards_B_T + bonus_B_T


def gae(rewards_B_T: Tensor, values_B_T: Tensor, mask_B_T: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation: (advantages_B_T, returns_B_T), both 0 under the mask.

    delta_t = r_t + gamma * V_{t+1} - V_t, and A_t = delta_t + gamma * lam * A_{t+1}, with V and A
    taken as 0 past a completion's last real token (the episode ends there). returns = A + V, the
    value loss's target. ``mask_B_T`` must be a prefix mask (real tokens, then padding).
    """
    rewards = _zero_where_masked(rewards_B_T, mask_B_T)
    values = _zero_where_masked(values_B_T, mask_B_T)
    mask = mask_B_T.to(values.dtype)
    advantages_B_T = torch.zeros_like(values)
    running_B = torch.zeros_like(values[:, 0])
    next_value_B = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta_B = rewards[:, t] + gamma * next_value_B - values[:, t]
        running_B = (delta_B + gamma * lam * running_B) * mask[:, t]
        advantages_B_T[:, t] = running_B
        next_value_B = values[:, t]
    return advantages_B_T, _zero_where_masked(advantages_B_T + values, mask_B_T)


def policy_loss(
    logps_B_T: Tensor, old_logps_B_T: Tensor, advantages_B_T: Tensor, mask_B_T: Tensor, clip: float
) -> tuple[Tensor, Tensor]:
    """PPO's clipped surrogate, as a loss: (mean over real tokens of max(-A r, -A clip(r)), clipped fraction).

    r = exp(logp - old_logp). A token counts as clipped when the clipped term is the larger (it then
    gives no gradient).
    """
    ratio_B_T = torch.exp(logps_B_T - old_logps_B_T)
    unclipped_B_T = -advantages_B_T * ratio_B_T
    clipped_B_T = -advantages_B_T * torch.clamp(ratio_B_T, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped_B_T, clipped_B_T), mask_B_T)
    clip_frac = masked_mean((clipped_B_T > unclipped_B_T).to(logps_B_T.dtype), mask_B_T)
    return loss, clip_frac


def value_loss(
    values_B_T: Tensor, old_values_B_T: Tensor, returns_B_T: Tensor, mask_B_T: Tensor, clip: float
) -> tuple[Tensor, Tensor]:
    """Clipped value loss: (0.5 * mean over real tokens of max((V - R)^2, (V_clip - R)^2), clipped fraction).

    V_clip = V_old + clip(V - V_old, -clip, clip) keeps one update from moving a value estimate far
    from the one the advantages were computed with.
    """
    clipped_values_B_T = old_values_B_T + torch.clamp(values_B_T - old_values_B_T, -clip, clip)
    unclipped_B_T = (values_B_T - returns_B_T) ** 2
    clipped_B_T = (clipped_values_B_T - returns_B_T) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_B_T, clipped_B_T), mask_B_T)
    clip_frac = masked_mean((clipped_B_T > unclipped_B_T).to(values_B_T.dtype), mask_B_T)
    return loss, clip_frac


def explained_variance(values_B_T: Tensor, returns_B_T: Tensor, mask_B_T: Tensor) -> Tensor:
    """1 - Var(returns - values) / Var(returns): 1 = perfect critic, 0 = no better than the mean; NaN if Var = 0."""
    var_returns = masked_var(returns_B_T, mask_B_T)
    var_residual = masked_var(returns_B_T - values_B_T, mask_B_T)
    return 1.0 - var_residual / var_returns


def adaptive_kl_coef(kl_coef: float, kl: float, target: float, num_samples: int, horizon: int) -> float:
    """Ziegler et al.'s proportional controller: beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * num_samples / horizon)
