"""PPO's models: policy, critic and reference as one module (rl_lora/algorithms/ppo/trainer.py trains it).

With LoRA the three share ONE frozen base: the policy is the PEFT adapter ``POLICY_ADAPTER``, the
critic a second adapter ``VALUE_ADAPTER`` on the same PeftModel plus a scalar value head on the last
hidden state, and the reference is the same network with its adapters disabled. With ``lora.rank:
full`` the policy and a deep-copied critic train separately and the reference is a third, frozen copy.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft import get_peft_model
from torch import Tensor, nn
from transformers import PreTrainedModel

from rl_lora.adapters.lora import peft_config
from rl_lora.config.schema import LoraSpec
from rl_lora.training.memory import quantization_state_bytes

# PEFT saves the adapter named "default" at the folder's root and any other in a subfolder of its
# name (peft_model.save_pretrained). Naming the policy "default" keeps the saved policy loadable with
# plain PeftModel.from_pretrained(base, folder) (docs/findings.md, RELIABILITY); the critic's adapter
# lands in folder/value/.
POLICY_ADAPTER = "default"
VALUE_ADAPTER = "value"


def unique_param_bytes(*modules: nn.Module | None) -> int:
    """Bytes of the parameters held by ``modules``, each storage counted once (shared tensors, tied weights).

    A ZeRO-3-partitioned parameter counts its whole size (``ds_numel``), keyed by its DeepSpeed id:
    its local data is an empty placeholder whose address says nothing.
    """
    seen: set[Any] = set()
    total = 0
    for module in modules:
        for p in module.parameters() if module is not None else ():
            key = ("ds", p.ds_id) if hasattr(p, "ds_id") else p.data_ptr()
            if key not in seen:
                seen.add(key)
                # a 4-bit (QLoRA) weight: its packed bytes plus its quantisation state
                total += getattr(p, "ds_numel", p.numel()) * p.element_size() + quantization_state_bytes(p)
    return total


class ActorCritic(nn.Module):
    """Every trainable part of PPO in one module, and the forward passes PPO needs from them.

    Shared (LoRA): ``policy`` is a PeftModel with two adapters on one frozen base; the critic is the
    same network under VALUE_ADAPTER, the reference the same network with adapters disabled.
    Separate (full): ``critic_backbone`` and ``reference`` are copies of the base.

    One module so that one DeepSpeed engine (and one optimizer) holds policy, critic and value head:
    ``forward(role, ...)`` picks the pass, and every pass goes through the engine.
    """

    # The PeftModel holding both adapters (shared) or the causal LM itself (full): PEFT's adapter switches
    # and transformers' forward keywords are used on it, which nn.Module does not declare.
    policy: Any
    critic_backbone: nn.Module | None
    reference: nn.Module | None  # kept out of the submodules (see __init__)

    def __init__(self, policy: nn.Module, value_head: nn.Linear, critic_backbone: nn.Module | None = None,
                 reference: nn.Module | None = None, value_adapter_params: list[nn.Parameter] | None = None) -> None:
        super().__init__()
        self.policy = policy
        self.value_head = value_head
        self.critic_backbone = critic_backbone
        # Not registered as a submodule: the frozen reference copy is never trained, so it stays out of
        # the optimizer, the checkpoints and the DeepSpeed engine (ZeRO-3 would partition it).
        self.__dict__["reference"] = reference
        self.shared = critic_backbone is None
        # accelerate sizes ZeRO-3's "auto" buckets and thresholds from model.config.hidden_size.
        self.config = policy.config
        critic_body = list(critic_backbone.parameters()) if critic_backbone is not None else value_adapter_params or []
        critic_ids = {id(p) for p in critic_body}
        self.policy_params = [p for p in policy.parameters() if p.requires_grad and id(p) not in critic_ids]
        self.critic_params = [*critic_body, *value_head.parameters()]

    def keep_trainable(self) -> None:
        # PEFT's set_adapter / disable_adapter set requires_grad=False on every adapter but the active
        # one; both adapters train here, so their flags are put back after each switch.
        for p in (*self.policy_params, *self.critic_params):
            p.requires_grad_(True)

    @contextmanager
    def _adapter(self, name: str) -> Iterator[None]:
        self.policy.set_adapter(name)
        try:
            yield
        finally:
            self.policy.set_adapter(POLICY_ADAPTER)  # evaluation and saving see the policy
            self.keep_trainable()

    def forward(self, role: str, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                keep: int = 0) -> Tensor:
        """``role`` "policy" / "reference": logits of the last ``keep`` positions; "value": V(s), (B, L)."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        if role == "policy":
            return self.policy_logits(inputs, keep)
        if role == "reference":
            return self.reference_logits(inputs, keep)
        if role == "value":
            return self.values(inputs)
        raise ValueError(f"ActorCritic.forward: unknown role {role!r} (policy, reference, value)")

    def policy_logits(self, inputs: dict[str, Tensor], keep: int) -> Tensor:
        """Logits of the last ``keep`` positions under the policy."""
        return self.policy(**inputs, logits_to_keep=keep).logits

    @torch.no_grad()
    def reference_logits(self, inputs: dict[str, Tensor], keep: int) -> Tensor:
        """Logits under the reference: the adapters switched off (shared), or the frozen copy."""
        if self.reference is not None:  # separate (full); shared has no copy
            return self.reference(**inputs, logits_to_keep=keep).logits
        try:
            with self.policy.disable_adapter():
                return self.policy(**inputs, logits_to_keep=keep).logits
        finally:
            self.keep_trainable()

    def values(self, inputs: dict[str, Tensor]) -> Tensor:
        """V(s) at every position: the value head on the critic's last hidden state, (B, L)."""
        if self.critic_backbone is not None:  # separate (full)
            hidden = self.critic_backbone(**inputs).last_hidden_state
            return self.value_head(hidden.float()).squeeze(-1)
        # get_base_model() is the causal LM carrying the LoRA layers; its .base_model is the decoder
        # without the LM head, so no vocabulary-sized logits are computed for the critic.
        with self._adapter(VALUE_ADAPTER):
            hidden = self.policy.get_base_model().base_model(**inputs).last_hidden_state
        return self.value_head(hidden.float()).squeeze(-1)

    def param_bytes(self) -> int:
        """Parameter bytes of policy + critic + reference, shared tensors counted once."""
        critic = self.policy if self.shared else self.critic_backbone
        reference = self.policy if self.shared else self.reference
        return unique_param_bytes(self.policy, critic, self.value_head, reference)


def build_actor_critic(model: PreTrainedModel, lora: LoraSpec) -> ActorCritic:
    """One frozen base with policy and value adapters (LoRA), or three copies (full)."""
    value_head = nn.Linear(model.config.hidden_size, 1, dtype=torch.float32)
    if lora.is_full:
        critic_backbone = copy.deepcopy(model.base_model)
        reference = copy.deepcopy(model).requires_grad_(False).eval()
        return ActorCritic(model.requires_grad_(True), value_head, critic_backbone, reference)
    # The configs are built before PEFT wraps the model: an MoE config lists the model's own parameter names.
    policy_config, value_config = peft_config(lora, model=model), peft_config(lora, model=model)
    assert policy_config is not None and value_config is not None  # None only for lora.rank: full (above)
    policy = get_peft_model(model, policy_config, adapter_name=POLICY_ADAPTER)
    before = {id(p) for p in policy.parameters()}
    policy.add_adapter(VALUE_ADAPTER, value_config)  # a fresh config: PEFT resolves targets in place
    value_params = [p for p in policy.parameters() if id(p) not in before]
    policy.set_adapter(POLICY_ADAPTER)
    ac = ActorCritic(policy, value_head, value_adapter_params=value_params)
    ac.keep_trainable()
    return ac
