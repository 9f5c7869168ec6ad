"""Named layer sets for ``lora.targets``: ``all-linear``, ``attention`` and ``mlp``, next to PEFT's own forms.

PEFT takes a list of module names or a regex over full module names. rl-lora adds two names for the
comparison the findings make (claim 4: attention-only against MLP-only adapters): ``attention`` selects
every linear inside an attention block, ``mlp`` every linear inside an MLP block, MoE experts included.
Both resolve to a regex before PEFT or the capacity estimate sees them, so they mean the same layers
everywhere. ``target_label`` is the short form run names and report groups carry.
"""

from __future__ import annotations

import hashlib
import re

ALL_LINEAR = "all-linear"

# Parent modules that mark a linear as attention or MLP, and MLP projections named on their own.
ATTENTION_PARTS = frozenset({"attn", "self_attn", "attention", "self_attention", "cross_attn", "linear_attn"})
MLP_PARTS = frozenset(
    {"mlp", "feed_forward", "ffn", "block_sparse_moe", "moe", "experts", "shared_expert", "shared_experts"}
)
MLP_NAMES = frozenset(
    {"gate_proj", "up_proj", "down_proj", "fc1", "fc2", "w1", "w2", "w3", "c_fc", "dense_h_to_4h", "dense_4h_to_h"}
)


def _alternatives(names: frozenset[str]) -> str:
    return "|".join(sorted(names))


TARGET_SETS = {
    "attention": rf"(?:.*\.)?(?:{_alternatives(ATTENTION_PARTS)})\..+",
    "mlp": rf"(?:.*\.)?(?:{_alternatives(MLP_PARTS)})\..+|(?:.*\.)?(?:{_alternatives(MLP_NAMES)})",
}


def resolve_targets(targets: str | list[str]) -> str | list[str]:
    """``targets`` in PEFT's terms: a named set becomes its regex; anything else is returned as it is."""
    if isinstance(targets, str):
        return TARGET_SETS.get(targets.lower(), targets)
    return targets


def target_label(targets: str | list[str]) -> str:
    """A short name for run names and report groups: all, attention, mlp, q_proj+v_proj, or re-<hash>."""
    if isinstance(targets, str):
        lowered = targets.lower()
        if lowered == ALL_LINEAR:
            return "all"
        if lowered in TARGET_SETS:
            return lowered
        if re.fullmatch(r"[A-Za-z0-9_]+", targets):
            return targets
        return "re-" + hashlib.sha1(targets.encode()).hexdigest()[:6]
    return "+".join(targets)
