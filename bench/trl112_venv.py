"""TRL 1.12's virtual environment for the PPO anchor (bench/trl_ppo_worker.py runs in it).

TRL 1.16 (the version rl-lora pins) has no PPO, so TRL 1.12 lives in a venv of its own, built from the
driver's side: ``trl==1.12.0`` plus exactly the torch, transformers, peft, accelerate and datasets the
driver runs, so the two sides of the comparison differ by their PPO code alone.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
VENV_DIR = BENCH_DIR / ".venv-trl112"
TRL_VERSION = "1.12.0"  # the last TRL release with a PPOTrainer (trl.experimental.ppo)
# Pinned to the driver's own versions: only the trainer differs between the two sides. torch pinned
# exactly also keeps pip on the wheel already on disk (an open range could fetch a CUDA build).
SHARED_PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets")


class VenvError(RuntimeError):
    """TRL 1.12's virtual environment could not be built or does not import PPOTrainer."""


def venv_pins() -> list[str]:
    """The requirements of TRL 1.12's venv: the TRL release and the driver's versions of what it shares."""
    return [f"trl=={TRL_VERSION}", *(f"{p}=={version(p)}" for p in SHARED_PACKAGES)]


def ensure_venv(folder: Path = VENV_DIR) -> Path:
    """The python of TRL 1.12's venv in ``folder``, built (or rebuilt, when the pins changed) if needed.

    Runs in the driver's environment. A finished build leaves ``bench-pins.txt`` with the pins it
    installed; pip's output goes to ``pip.log`` beside it.
    """
    python, marker, log = folder / "bin" / "python", folder / "bench-pins.txt", folder / "pip.log"
    pins = venv_pins()
    if python.exists() and marker.exists() and marker.read_text().split() == pins:
        return python
    print(f"bench: building TRL {TRL_VERSION}'s venv in {folder} (once for these pins)", file=sys.stderr, flush=True)
    shutil.rmtree(folder, ignore_errors=True)
    made = subprocess.run([sys.executable, "-m", "venv", str(folder)], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        raise VenvError(f"python -m venv {folder} exited {made.returncode}: {_last_line(made.stderr)}")
    with log.open("w") as out:
        pip = subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", *pins],
                             stdout=out, stderr=subprocess.STDOUT, check=False)
    if pip.returncode != 0:
        raise VenvError(f"pip install {' '.join(pins)} exited {pip.returncode}: "
                        f"{_last_line(log.read_text())} (whole output: {log})")
    probe = subprocess.run([str(python), "-c", "from trl.experimental.ppo import PPOConfig, PPOTrainer"],
                           capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        raise VenvError(f"{python} cannot import trl.experimental.ppo.PPOTrainer: {_last_line(probe.stderr)}")
    marker.write_text("\n".join(pins) + "\n")
    return python


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"
