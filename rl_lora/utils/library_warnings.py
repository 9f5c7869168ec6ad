"""Library warnings go to the run folder, not the console.

Warnings raised inside installed packages (transformers, TRL, DeepSpeed, torch: deprecations, notices
about their own internals) say nothing a user of a recipe can act on, and a run under several processes
prints each once per process. Once a run folder exists they are appended to ``<run>/warnings.log``;
warnings from rl-lora itself and from the user's own files (reward plug-ins, tasks) still reach the
console.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import TextIO

LOG_NAME = "warnings.log"
_LIBRARY_PARTS = ("site-packages", "dist-packages")


def is_library_file(filename: str) -> bool:
    """Whether ``filename`` is an installed package's (rl-lora's own files are not, even when installed)."""
    path = Path(filename).as_posix()
    return any(part in path for part in _LIBRARY_PARTS) and "/rl_lora/" not in path and "/reward_models/" not in path


def route_library_warnings(run_dir: Path) -> None:
    """From now on, write warnings raised in library code to ``run_dir / LOG_NAME`` instead of stderr."""
    shown = getattr(warnings.showwarning, "_rl_lora_original", warnings.showwarning)
    log_path = run_dir / LOG_NAME

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: TextIO | None = None, line: str | None = None) -> None:
        if not is_library_file(filename):
            shown(message, category, filename, lineno, file, line)
            return
        try:
            with log_path.open("a", encoding="utf-8") as f:
                f.write(warnings.formatwarning(message, category, filename, lineno, line))
        except OSError:  # the log is a convenience: never fail a run over it
            shown(message, category, filename, lineno, file or sys.stderr, line)

    show._rl_lora_original = shown  # type: ignore[attr-defined]
    warnings.showwarning = show
