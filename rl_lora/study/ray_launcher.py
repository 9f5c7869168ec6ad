"""Sweeps on a Ray cluster: ``rl-lora sweep RECIPE ... --ray [ADDRESS]`` makes every run a Ray task.

The sweep is the same as a local one (rl_lora/study/sweep.py: the two phases, ``sweep.json``,
``selection.json``, run names, reuse rules, ``failures.jsonl``, the report); only where a run's process
starts differs. Each run is a Ray task that starts ``rl-lora run`` as its own process on the node Ray
placed it on, with the command line the local launcher builds, so a crash in one run cannot take the
sweep down. The driver (this process) only submits tasks and records their outcome.

- **Devices.** A run asks Ray for ``--devices`` devices of its method (``full=4,lora=1``). A method that
  option leaves out gets, with ``--device-memory``, the fewest devices ``rl-lora plan`` says its run fits
  on (``planned_devices``), else 1. GPUs when the cluster has any, else CPU slots. A run with K > 1
  devices is started with ``--nproc K`` on its node (torchrun; DeepSpeed from the recipe's
  ``distributed:``). A run needing more devices than the largest node offers is refused before anything
  is written.
- **Storage.** Run folders must be on a path every node sees (NFS, a shared volume). Each task first checks
  it can write the sweep's ``runs/`` folder on its node; a node that cannot costs that run (recorded in
  ``failures.jsonl`` with the reason), not the sweep.
- **Faults.** A task whose node or worker is lost, or whose run process is killed by a signal, is retried
  by Ray (``TASK_RETRIES``). The retry continues the run from its newest sealed checkpoint
  (``rl-lora run ... --resume RUN_DIR``) when the run has one (``train.save_every``), so a lost node costs
  the steps since that checkpoint; without one the run starts again from step 0.

Ray is an optional extra (``pip install 'rl-lora[ray]'``): this module imports it only inside functions,
so ``import rl_lora.study.sweep`` never loads it. Runs spread over several nodes (one run on more devices
than one node has, e.g. 70B full-parameter) are not built: see docs/cluster.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rl_lora.study.sweep import POLL_SECONDS, Launcher, Outcome, StopSignals
from rl_lora.study.sweep_plan import Arm, SweepPoint
from rl_lora.training import checkpoint
from rl_lora.training.run_dir import write_json_atomic
from rl_lora.utils.errors import ConfigError

INSTALL_HINT = "pip install 'rl-lora[ray]'"
# Ray retries a task this many times after its node or worker is lost (or its run process is killed).
TASK_RETRIES = 3
# Seconds an interrupted sweep waits for its cancelled tasks to stop their runs; a task still running then is
# stopped when Ray ends this driver's workers (SIGTERM: run_task stops its run on the way out).
CANCEL_SECONDS = 10
# Seconds to wait for a TCP answer from the cluster's address before refusing it.
CONNECT_TIMEOUT = 3.0
# A local Ray instance (``--ray`` with no address) stays on the loopback range. Ray rewrites 127.0.0.1 (and
# "localhost") to the machine's network address before connecting, so the instance uses 127.0.0.2.
LOCAL_NODE_IP = "127.0.0.2"
# The driver's variables that travel with every task (a worker node's environment is its own otherwise).
FORWARDED_PREFIXES = ("RL_LORA_", "WANDB_", "HF_")
FORWARDED_NAMES = ("PYTHONPATH",)


def parse_devices(text: str | None, arms: Sequence[Arm]) -> dict[str, int]:
    """``"full=4,lora=1"`` as {method key: devices}; keys are ``full``, ``lora`` (every LoRA arm) or a rank's
    method (``r16``, which overrides ``lora`` for that rank)."""
    if not text:
        return {}
    known = {"full", "lora", *(arm.method for arm in arms if not arm.is_full)}
    table: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not value.strip().isdigit() or int(value) < 1:
            raise ConfigError(f"--devices '{item}': give METHOD=N with N a whole number of devices of at least 1, "
                              "e.g. --devices full=4,lora=1")
        if key not in known:
            raise ConfigError(f"--devices '{item}': no method '{key}' in this sweep (its methods: "
                              f"{', '.join(sorted(known))})")
        table[key] = int(value)
    return table


def device_key(arm: Arm, table: dict[str, int]) -> str:
    """The ``--devices`` key that sets ``arm``'s devices: ``full``, its rank's method if named, else ``lora``."""
    return "full" if arm.is_full else (arm.method if arm.method in table else "lora")


def devices_for(arm: Arm, table: dict[str, int]) -> int:
    """Devices one run of ``arm`` asks for: its rank's entry, else full/lora's, else 1."""
    if arm.is_full:
        return table.get("full", 1)
    return table.get(arm.method, table.get("lora", 1))


def planned_devices(recipe: Path, overrides: Sequence[str], arms: Sequence[Arm], device_memory: str,
                    table: dict[str, int]) -> dict[Arm, int]:
    """Devices per arm from ``rl-lora plan`` (estimate/plan.fewest_devices at ``device_memory`` per device) for
    the arms ``table`` (``--devices``) does not name; ConfigError naming the arm when no device count fits."""
    from rl_lora.config.schema import load_recipe
    from rl_lora.estimate.plan import fewest_devices, parse_memory

    memory = parse_memory(device_memory)
    planned: dict[Arm, int] = {}
    for arm in arms:
        key = device_key(arm, table)
        if key in table:
            continue
        config = load_recipe(recipe, [*overrides, *arm.overrides()])
        count = fewest_devices(config, memory)
        if count is None:
            raise ConfigError(f"{arm.name}: no device count its batch divides over fits one run in "
                              f"--device-memory {device_memory} per device (rl-lora plan {recipe} "
                              f"{' '.join(arm.overrides())} shows the breakdown); give --devices {key}=N")
        planned[arm] = count
    return planned


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--ray: Ray is not installed in this environment; {INSTALL_HINT}") from None
    return ray


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rstrip("/").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"--ray '{address}': give the cluster's address as HOST:PORT (the head node's GCS port, "
                          "6379 by default), 'auto' for the cluster this node belongs to, or no address for a "
                          "local Ray instance")
    return host.strip("[]"), int(port)


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """Refuse an address where nothing answers, within ``timeout`` seconds (Ray itself retries for minutes)."""
    host, port = _split_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        why = "no answer" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__)
        raise ConfigError(f"--ray {address}: no Ray cluster answers there ({why}); start one with "
                          "`ray start --head` or give the head node's address") from None


def connect(address: str) -> Any:
    """Connect this process to the cluster at ``address`` ('auto', HOST:PORT) or start a local instance
    ('local'); returns the ``ray`` module."""
    if address.startswith("ray://"):
        raise ConfigError(f"--ray {address}: Ray Client addresses are not supported; run the sweep on a node of "
                          "the cluster (it writes the sweep folder) and give the head's HOST:PORT or 'auto'")
    ray = _import_ray()
    options: dict[str, Any] = {"log_to_driver": False, "logging_level": "WARNING", "configure_logging": True}
    if address == "local":
        options.update(address="local", include_dashboard=False, _node_ip_address=LOCAL_NODE_IP)
    else:
        if address == "auto" and os.environ.get("RAY_ADDRESS"):
            address = os.environ["RAY_ADDRESS"]
        if address != "auto":
            check_reachable(address)
            host, _ = _split_address(address)
            if _loopback(host):  # a cluster on this machine's loopback: this driver joins it there too
                options["_node_ip_address"] = host
        options["address"] = address
    try:
        ray.init(**options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"--ray {address}: cannot join a Ray cluster there ({str(exc).splitlines()[0]})") from None
    return ray


def cluster_devices(ray: Any) -> tuple[str, int, int]:
    """(kind, the largest node's count, the cluster's total) of the devices runs are placed by: GPU when any
    alive node has one, else CPU."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    kind = "GPU" if any(r.get("GPU", 0) > 0 for r in nodes) else "CPU"
    counts = [int(r.get(kind, 0)) for r in nodes]
    return kind, max(counts, default=0), sum(counts)


def _unit(kind: str, count: int) -> str:
    return f"{count} GPU(s)" if kind == "GPU" else f"{count} CPU slot(s)"


def storage_problem(runs_dir: Path, node: str) -> str | None:
    """Why this node cannot write the sweep's run folders, or None; writes and removes one probe file."""
    if not runs_dir.is_dir():
        return (f"node {node} does not see the sweep folder '{runs_dir}': put the sweep on a path every node "
                "sees (--output-dir on NFS or a shared volume)")
    probe = runs_dir / f".write-test-{socket.gethostname()}-{os.getpid()}"
    try:
        probe.write_text("ok", encoding="utf-8")
        probe.unlink()
    except OSError as exc:
        return f"node {node} cannot write the sweep folder '{runs_dir}' ({exc.strerror or exc})"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """In the run's process before exec: SIGKILL it when the Ray worker that started it dies (Linux), so a
    lost worker leaves no run behind to race its retry for the run folder."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the run outlives a lost worker
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _stop(proc: subprocess.Popen) -> None:
    """Stop a run and every process under it (torchrun and its workers for a multi-device run): SIGTERM to
    its process group, then SIGKILL if it has not ended within 30 s."""
    for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


class RunKilled(RuntimeError):
    """The run's process died from a signal (a preempted or failing node): Ray retries the task."""


def run_task(args: list[str], env: dict[str, str], runs_dir: str, name: str, cwd: str, devices: int) -> dict:
    """One sweep run on the node Ray placed it on: check the storage, then ``rl-lora run`` as a process,
    resuming from the run's newest checkpoint when an earlier attempt left one."""
    import ray

    node = ray.util.get_node_ip_address()
    started = time.perf_counter()
    problem = storage_problem(Path(runs_dir), node)
    if problem:
        return {"code": None, "node": node, "message": problem, "seconds": 0.0, "resumed": False}
    run_dir = Path(runs_dir) / name
    command = [sys.executable, *args]
    resumed = checkpoint.latest(run_dir / "checkpoints") is not None
    if resumed:
        command += ["--resume", str(run_dir)]
    else:  # an attempt that ended before its first checkpoint: start afresh in the same folder
        shutil.rmtree(run_dir, ignore_errors=True)
    if devices > 1:
        command += ["--nproc", str(devices), "--master-port", str(_free_port())]
    write_json_atomic(Path(runs_dir) / f"{name}.ray.json",
                      {"node": node, "pid": os.getpid(), "devices": devices, "resumed": resumed,
                       "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    with (Path(runs_dir) / f"{name}.log").open("a", encoding="utf-8") as log:
        log.write(f"rl-lora sweep: on Ray node {node}" + (f", resuming from {run_dir}" if resumed else "") + "\n")
        log.flush()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env},
                                cwd=cwd if os.path.isdir(cwd) else None, preexec_fn=_die_with_parent,
                                start_new_session=True)
        try:  # polled: Ray's cancel interrupts Python code, not a blocking wait
            while proc.poll() is None:
                time.sleep(POLL_SECONDS)
        except BaseException:  # the task cancelled (the sweep interrupted): stop the run, torchrun's too
            _stop(proc)
            raise
        code = proc.returncode
    if code < 0:
        raise RunKilled(f"run {name} on node {node} was killed by signal {-code}")
    return {"code": code, "node": node, "message": None, "seconds": time.perf_counter() - started,
            "resumed": resumed}


class RayLauncher(Launcher):
    """Runs sweep points as Ray tasks; refuses, before anything is written, what the cluster cannot run."""

    def __init__(self, recipe: Path, overrides: list[str], sweep_dir: Path, arms: Sequence[Arm], address: str,
                 devices: str | None = None, jobs: int = 1, progress: bool = True, device_memory: str | None = None):
        if jobs != 1:
            raise ConfigError(f"--jobs {jobs}: with --ray the cluster's free devices decide how many runs go at "
                              "once; leave --jobs out")
        table = parse_devices(devices, arms)  # an unknown method, or one no count fits, fails before Ray is touched
        planned = planned_devices(recipe, overrides, arms, device_memory, table) if device_memory else {}
        if planned and progress:
            print(f"rl-lora: devices per run from rl-lora plan at {device_memory} per device: "
                  + ", ".join(f"{arm.name} {count}" for arm, count in planned.items()), file=sys.stderr, flush=True)
        self.ray = connect(address or "local")
        self.kind, self.largest, self.total = cluster_devices(self.ray)
        self.devices = {arm: planned.get(arm, devices_for(arm, table)) for arm in arms}
        for arm, count in self.devices.items():
            if count > self.largest:
                key = device_key(arm, table)
                asked = (f"--devices {key}={count}" if key in table else
                         f"{arm.name}: {count} device(s) (rl-lora plan at --device-memory {device_memory})"
                         if arm in planned else f"{arm.name}: {count} device(s)")
                raise ConfigError(f"{asked}: the largest node of this Ray cluster offers "
                                  f"{_unit(self.kind, self.largest)}; a run spread over several nodes is not "
                                  "supported (docs/cluster.md)")
        # Paths the tasks see: absolute, since a worker starts in a folder of its own.
        super().__init__(recipe.resolve(), overrides, sweep_dir.resolve(), 1, progress)
        self.task = self.ray.remote(run_task)
        self.forward = {k: v for k, v in os.environ.items()
                        if k.startswith(FORWARDED_PREFIXES) or k in FORWARDED_NAMES}

    def _slot_settings(self, jobs: int) -> list[tuple[dict[str, str], list[str]]]:
        return [({}, [])]  # devices and threads are set per run (_task_settings)

    def _task_settings(self, devices: int) -> tuple[dict[str, str], list[str], dict[str, Any]]:
        """(environment, overrides, Ray resources) of a run holding ``devices`` devices."""
        if self.kind == "GPU":  # Ray sets CUDA_VISIBLE_DEVICES in the task's worker; the run inherits it
            return {}, [], {"num_gpus": devices, "num_cpus": 1}
        given = next((o for o in self.overrides if o.startswith("train.threads=")), None)
        threads = int(given.split("=", 1)[1]) if given else max(1, devices)
        per_process = str(max(1, threads // devices)) if devices > 1 else str(threads)
        return ({"OMP_NUM_THREADS": per_process}, [] if given else [f"train.threads={per_process}"],
                {"num_cpus": devices})

    def _prepare(self, point: SweepPoint, fingerprint: dict) -> tuple[Any, float]:
        shutil.rmtree(self.runs_dir / point.name, ignore_errors=True)  # a partial run from an interrupted sweep
        (self.runs_dir / f"{point.name}.ray.json").unlink(missing_ok=True)
        write_json_atomic(self.runs_dir / f"{point.name}.point.json",
                          {"point": asdict(point), "name": point.name, "fingerprint": fingerprint})
        (self.runs_dir / f"{point.name}.log").write_text("", encoding="utf-8")
        devices = self.devices.get(point.arm, 1)
        env, task_overrides, resources = self._task_settings(devices)
        args = [  # the local launcher's command line (sweep.py Launcher._start), the interpreter the node's own
            "-m", "rl_lora.cli", "run", str(self.recipe), *self.overrides, *task_overrides,
            *point.overrides(), f"logging.output_dir={self.runs_dir}", f"logging.run_name={point.name}",
            f"logging.wandb_group={self.sweep_dir.name}", "logging.progress=false",
        ]
        remote = self.task.options(
            **resources, max_retries=TASK_RETRIES, retry_exceptions=[RunKilled], name=f"rl-lora {point.name}")
        ref = remote.remote(args, {**self.forward, **env}, str(self.runs_dir), point.name, os.getcwd(), devices)
        return ref, time.perf_counter()

    def _where(self, pending: dict[Any, tuple[SweepPoint, float]]) -> str:
        """'name@node' of the runs that have started, and the devices they hold."""
        placed, busy = [], 0
        for point, _ in pending.values():
            try:
                record = json.loads((self.runs_dir / f"{point.name}.ray.json").read_text())
            except (OSError, ValueError):
                continue
            placed.append(f"{point.name}@{record['node']}")
            busy += int(record.get("devices", 1))
        return f"{busy}/{self.total} {self.kind} busy" + (": " + ", ".join(placed) if placed else "")

    def run(self, points: list[SweepPoint], label: str) -> Outcome:
        outcome, todo = self.split_done(points)
        bar = self.progress_bar(points, outcome, label)
        pending: dict[Any, tuple[SweepPoint, float]] = {}
        with StopSignals() as stop:  # Ctrl-C or SIGTERM: the finally cancels the tasks, which stop their runs
            try:
                for point, fingerprint in todo:  # Ray queues them and starts each when a node has its devices
                    ref, submitted = self._prepare(point, fingerprint)
                    pending[ref] = (point, submitted)
                    stop.check()
                while pending:
                    ready, _ = self.ray.wait(list(pending), num_returns=1, timeout=POLL_SECONDS * 5)
                    for ref in ready:
                        point, submitted = pending.pop(ref)
                        self._finish(point, ref, submitted, outcome)
                        bar.update(1)
                    bar.set_postfix_str(self._where(pending))
                    stop.check()
            finally:
                if pending:  # interrupted: each started task stops its run and the processes under it (run_task)
                    for ref in pending:
                        self.ray.cancel(ref)
                    self.ray.wait(list(pending), num_returns=len(pending), timeout=CANCEL_SECONDS)
                bar.close()
        return outcome

    def _finish(self, point: SweepPoint, ref: Any, submitted: float, outcome: Outcome) -> None:
        try:
            result = self.ray.get(ref)
        except Exception as exc:  # the task failed for good: retries spent, or an error in the task itself
            why = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            result = {"code": None, "message": f"its Ray task failed ({why})",
                      "seconds": time.perf_counter() - submitted}
        if result.get("message"):
            with (self.runs_dir / f"{point.name}.log").open("a", encoding="utf-8") as log:
                log.write(f"rl-lora sweep: {result['message']}\n")
        self._record(point, result["code"], result["seconds"], outcome)
