"""What ``model.policy`` names, decided in one place.

A policy is one of five forms, tried in this order:

- a *named source*, ``<source>:<name>`` (``builtin:arithmetic-tiny``): a model a plug-in builds or ships,
  such as the built-in task's tiny Llama;
- a GGUF model (a ``.gguf`` path or ``package:<module>/<file>.gguf``), dequantised once into the cache;
- a local file that is not GGUF (refused where the model loads, with a clear line);
- a local folder;
- a hub id.

Every module that treats the forms differently (loading, the light tokenizer check, the advisor, the plan,
the preference-pair cache) asks :func:`classify` instead of testing prefixes itself.

Named sources are plug-ins found by module path, as tasks are (rl_lora/tasks/registry.py): the built-in
table below names where the built-in source lives as a string, so this layer imports no task; an installed
package adds its own through the ``rl_lora.policies`` entry-point group. A source object provides the
:class:`PolicySource` protocol. This module imports neither torch nor transformers, so the light checks
that run before the heavy libraries load can use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from rl_lora.models.gguf import is_gguf_reference
from rl_lora.utils.errors import ModelError
from rl_lora.utils.plugins import PluginKind, resolve

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

    from rl_lora.config.schema import DataSpec, ModelSpec

ENTRY_POINT_GROUP = "rl_lora.policies"
# Built-in sources by module path (a table of plug-ins, not an import: the task layer sits above this one).
BUILTIN_SOURCES = {"builtin": "rl_lora.tasks.arithmetic.source:source"}
_SOURCE_PLUGINS = PluginKind("policy source", ENTRY_POINT_GROUP, {}, ModelError)

PolicyForm = Literal["source", "gguf", "file", "folder", "hub"]


class PolicySource(Protocol):
    """A model a plug-in provides by name (``<source>:<name>``)."""

    names: tuple[str, ...]
    caches_pairs: bool  # whether sampled preference pairs are cached beside the model's folder

    def folder(self, name: str, spec: ModelSpec, data: DataSpec, progress: bool) -> Path:
        """The transformers folder of ``name``, built (and cached) on first use."""
        ...

    def config(self, name: str) -> PretrainedConfig:
        """The model's transformers config, without building it or loading weights."""
        ...

    def tokenizer(self, name: str) -> PreTrainedTokenizerBase:
        """The model's tokenizer, without building the model."""
        ...

    def tokenizer_folder(self, name: str) -> Path | None:
        """A folder holding the model's tokenizer.json and config.json, readable without torch; or None."""
        ...


@dataclass(frozen=True)
class Policy:
    """One ``model.policy`` value, classified."""

    text: str
    form: PolicyForm
    source: PolicySource | None = None  # for form "source"
    name: str = ""  # the part after ``<source>:`` for form "source"

    @property
    def is_named_source(self) -> bool:
        return self.form == "source"


def _source(prefix: str) -> Any | None:
    """The source object a prefix names, or None where the prefix names no source."""
    if prefix in BUILTIN_SOURCES:
        return resolve(_SOURCE_PLUGINS, BUILTIN_SOURCES[prefix])()
    from importlib.metadata import entry_points

    if any(ep.name == prefix for ep in entry_points(group=ENTRY_POINT_GROUP)):
        return resolve(_SOURCE_PLUGINS, prefix)()
    return None


def classify(policy: str) -> Policy:
    """Which form ``policy`` takes; ModelError for a named source's unknown model."""
    prefix, sep, name = policy.partition(":")
    if sep and prefix and "/" not in prefix and "\\" not in prefix and not is_gguf_reference(policy):
        source = _source(prefix)
        if source is not None:
            if name not in source.names:
                raise ModelError(f"unknown {prefix} model '{policy}' (known: "
                                 f"{', '.join(f'{prefix}:{n}' for n in source.names)})")
            return Policy(policy, "source", source, name)
    if is_gguf_reference(policy):
        return Policy(policy, "gguf")
    path = Path(policy)
    if path.exists():
        return Policy(policy, "folder" if path.is_dir() else "file")
    return Policy(policy, "hub")
