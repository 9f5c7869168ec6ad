"""Sweeps on Ray (rl_lora/study/ray_launcher.py) on a real 3-node Ray cluster started by the test on this
machine: a head with no CPU slots and two 1-slot worker nodes (one test adds a 3-slot node for a while),
each node on its own loopback address (127.0.0.2-5: Ray rewrites 127.0.0.1 itself to the machine's network
address, so it cannot be used), and the test checks that every node Ray registered is on the loopback range.
Every subprocess has a timeout, and the fixture's finalizer stops every Ray process it started.

Needs the extra (pip install 'rl-lora[ray]'; CI installs it)."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rl_lora.config.schema import load_recipe
from rl_lora.estimate.plan import GB, make_plan
from rl_lora.study import ray_launcher
from rl_lora.study.ray_launcher import RayLauncher, parse_devices, planned_devices, storage_problem
from rl_lora.study.sweep_plan import Arm
from rl_lora.utils.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "grpo_arithmetic.yaml"
HEAD_IP, WORKER_IPS, BIG_IP = "127.0.0.2", ("127.0.0.3", "127.0.0.4"), "127.0.0.5"
# Tiny runs of the shipped recipe: 4 steps of 16 completions, a checkpoint every 2 steps, one thread each. The
# data section stays the recipe's, so runs start from the shipped warm-up (another eval_size is another build).
TINY = ["train.steps=4", "train.eval_every=2", "train.save_every=2", "train.batch_size=16",
        "grpo.num_generations=4", "train.threads=1", "logging.wandb=false"]
# Per-step figures that must agree between two runs of one point (not timings or memory).
COMPARED = ("loss", "grad_norm", "reward", "reward_std", "entropy", "eval/accuracy", "rewards/exact_answer/mean")


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rl_lora.cli", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def _ok(result: subprocess.CompletedProcess, sweep_dir: Path) -> None:
    failures = sweep_dir / "failures.jsonl"
    assert result.returncode == 0, (failures.read_text() if failures.is_file() else "") + result.stderr[-3000:]


def _figures(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: row[k] for k in ("step", *COMPARED) if k in row} for row in rows]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HEAD_IP, 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[object, str]]:
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    started = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "node_ip_address": HEAD_IP, "include_dashboard": False})
    try:
        for ip in WORKER_IPS:
            cluster.add_node(num_cpus=1, node_ip_address=ip)
        ray.init(address=cluster.address, _node_ip_address=HEAD_IP, log_to_driver=False, logging_level="WARNING")
        cluster.wait_for_nodes(timeout=120)
        nodes = [n for n in ray.nodes() if n["Alive"]]
        assert len(nodes) == 3
        assert cluster.address.split(":")[0] == HEAD_IP
        for node in nodes:  # every node registered, and so every connection to it, on the loopback range
            assert ipaddress.ip_address(node["NodeManagerAddress"]).is_loopback, node["NodeManagerAddress"]
        assert time.perf_counter() - started < 180
        yield cluster, cluster.address
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_devices_parsing() -> None:
    arms = [Arm(1), Arm(16), Arm("full")]
    assert parse_devices("full=4,lora=1", arms) == {"full": 4, "lora": 1}
    assert parse_devices("r16=2", arms) == {"r16": 2}
    with pytest.raises(ConfigError, match="no method 'fulll'.*full, lora, r1, r16"):
        parse_devices("fulll=2", arms)
    with pytest.raises(ConfigError, match="--devices 'full=0'"):
        parse_devices("full=0", arms)


def test_devices_per_arm_default_to_what_the_plan_says_fits() -> None:
    """--device-memory 80GB on Llama-3.1-8B's shapes under ZeRO-3 with gradient checkpointing: each arm --devices
    leaves out gets the fewest devices `rl-lora plan` gives for it (1 at rank 1, 4 full); --devices still wins."""
    recipe = REPO / "recipes" / "grpo_gsm8k_qwen.yaml"
    overrides = [f"model.policy={REPO / 'docs' / 'plan_shapes' / 'llama-3.1-8b.json'}", "distributed.zero_stage=3",
                 "trl.gradient_checkpointing=true"]
    arms = [Arm(1), Arm("full")]
    planned = planned_devices(recipe, overrides, arms, "80GB", {})
    plan = make_plan(load_recipe(recipe, overrides), device_memory=80 * GB)
    by_method = {str(m.method): m.smallest[(3, True)] for m in plan.methods}
    assert planned == {arms[0]: by_method["1"], arms[1]: by_method["full"]}
    assert (planned[arms[0]], planned[arms[1]]) == (1, 4)
    assert planned_devices(recipe, overrides, arms, "80GB", {"full": 8}) == {arms[0]: 1}


def test_an_arm_no_device_count_fits_is_refused_before_ray_is_touched(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def no_ray(address: str) -> None:
        raise AssertionError("Ray contacted")

    monkeypatch.setattr(ray_launcher, "connect", no_ray)
    with pytest.raises(ConfigError, match=r"^r1-all-b\d+: no device count its batch divides over fits one run in "
                                          r"--device-memory 1MB per device .*give --devices lora=N$"):
        RayLauncher(RECIPE, TINY, tmp_path / "s", [Arm(1), Arm("full")], "local", device_memory="1MB")
    assert not (tmp_path / "s").exists()


def test_storage_check(tmp_path: Path) -> None:
    assert storage_problem(tmp_path, "127.0.0.3") is None
    assert list(tmp_path.iterdir()) == []  # the probe file is gone
    assert "does not see the sweep folder" in storage_problem(tmp_path / "elsewhere", "127.0.0.3")


def test_ray_not_installed(tmp_path: Path) -> None:
    fake = tmp_path / "no_ray"
    (fake / "ray").mkdir(parents=True)
    (fake / "ray" / "__init__.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
    result = _cli("sweep", str(RECIPE), "--ranks", "1", "--seeds", "1", "--ray", "--output-dir", str(tmp_path / "o"),
                  *TINY, env={"PYTHONPATH": str(fake)}, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "rl-lora: error: --ray: Ray is not installed in this environment; pip install 'rl-lora[ray]'"]
    assert not (tmp_path / "o").exists()


# The tests on the cluster stay on one pytest-xdist worker (--dist loadgroup): one cluster, started once.
ON_CLUSTER = pytest.mark.xdist_group("ray-cluster")


@ON_CLUSTER
def test_bad_input_is_one_line_before_any_run(cluster: tuple[object, str], tmp_path: Path) -> None:
    _, address = cluster
    out = tmp_path / "o"
    base = ["sweep", str(RECIPE), "--ranks", "1,full", "--seeds", "1", "--output-dir", str(out), *TINY]
    cases = [
        (["--ray", address, "--devices", "lora=1,ful=2"], "--devices 'ful=2': no method 'ful' in this sweep"),
        (["--ray", address, "--devices", "full=2"],
         "--devices full=2: the largest node of this Ray cluster offers 1 CPU slot(s)"),
        (["--ray", f"{HEAD_IP}:{_free_port()}"], "no Ray cluster answers there"),
    ]
    for extra, expected in cases:
        started = time.perf_counter()
        result = _cli(*base, *extra, timeout=120)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and expected in lines[0], (extra, result.stderr[-2000:])
        assert time.perf_counter() - started < 60  # the interpreter's start-up under load, not Ray's retries
        assert not out.exists(), extra  # nothing written


# 2 methods (full at one LR, rank 1 at two) on 1 selection seed, then 1 confirmation seed at each best LR: 5 runs.
# Rank 1's 1.5e-3 is the LR rule's for these 4-step runs, which the lost-node test's sweep (no --lrs) takes.
SWEEP = ["sweep", str(RECIPE), "--ranks", "1,full", "--lrs", "full=1e-4;lora=1.5e-3,3e-3", "--selection-seeds", "1",
         "--seeds", "2", "--name", "s", *TINY]


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SWEEP run locally with --jobs 1 (no Ray): the reference of the Ray sweep and of the lost-node run."""
    out = tmp_path_factory.mktemp("local")
    _ok(_cli(*SWEEP, "--output-dir", str(out)), out / "s")
    return out / "s"


@ON_CLUSTER
@pytest.mark.slow
def test_ray_sweep_equals_local_jobs_1(cluster: tuple[object, str], local_sweep: Path, tmp_path: Path) -> None:
    """The Ray sweep on the two worker nodes gives, run for run, the local --jobs 1 sweep's per-step figures, LR
    choice and report."""
    _, address = cluster
    on_ray = _cli(*SWEEP, "--output-dir", str(tmp_path / "ray"), "--ray", address)
    _ok(on_ray, tmp_path / "ray" / "s")
    assert "5 finished, 0 already done, 0 failed" in on_ray.stdout

    local_runs, ray_runs = local_sweep / "runs", tmp_path / "ray" / "s" / "runs"
    names = sorted(p.parent.name for p in local_runs.glob("*/summary.json"))
    assert len(names) == 5 and names == sorted(p.parent.name for p in ray_runs.glob("*/summary.json"))
    for name in names:
        assert _figures(ray_runs / name) == _figures(local_runs / name), name
    placed = {json.loads((ray_runs / f"{n}.ray.json").read_text())["node"] for n in names}
    assert placed <= set(WORKER_IPS)  # on the worker nodes (the head offers no slot)
    assert json.loads((tmp_path / "ray" / "s" / "selection.json").read_text()) == \
        json.loads((local_sweep / "selection.json").read_text())
    verdicts = [(d / "report.md").read_text().split("\n## ")[1] for d in (local_sweep, tmp_path / "ray" / "s")]
    assert verdicts[0] == verdicts[1]


@ON_CLUSTER
@pytest.mark.slow
def test_two_device_arm_runs_as_two_processes_beside_lora(cluster: tuple[object, str], tmp_path: Path) -> None:
    """--devices full=2 with one 3-slot node added: the full-parameter run is a 2-process gloo run (torchrun,
    --nproc 2) on that node, and the rank-1 run takes a free slot (there or on a 1-slot node) at the same time.
    (With a 2-slot node Ray may put the 1-slot run there first, and the full run then waits for it.)"""
    handle, address = cluster
    big = handle.add_node(num_cpus=3, node_ip_address=BIG_IP)
    try:
        handle.wait_for_nodes(timeout=120)
        out = tmp_path / "o"
        result = _cli("sweep", str(RECIPE), "--ranks", "1,full", "--seeds", "1", "--name", "s", "--output-dir",
                      str(out), "--ray", address, "--devices", "full=2", *[o for o in TINY if "threads" not in o])
        _ok(result, out / "s")
    finally:
        handle.remove_node(big, allow_graceful=False)
    runs = out / "s" / "runs"
    full, lora = (next(runs.glob(f"{prefix}*.ray.json")) for prefix in ("full-", "r1-"))
    assert json.loads(full.read_text())["node"] == BIG_IP and json.loads(full.read_text())["devices"] == 2
    assert json.loads(lora.read_text())["devices"] == 1
    full_run, lora_run = (runs / f.name.removesuffix(".ray.json") for f in (full, lora))
    assert sorted(p.name for p in (full_run / "ranks").iterdir()) == ["rank0.json", "rank1.json"]
    assert not (lora_run / "ranks").exists()  # one process
    # the two ran at once: each started before the other finished
    assert full.stat().st_mtime < (lora_run / "summary.json").stat().st_mtime
    assert lora.stat().st_mtime < (full_run / "summary.json").stat().st_mtime


def _processes_naming(text: str) -> list[int]:
    """Pids of this machine's processes whose command line holds ``text`` (a test's own temporary path)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().decode(errors="replace"):
                found.append(int(cmdline.parent.name))
        except OSError:  # ended while we read
            continue
    return [pid for pid in found if _alive(pid)]


@ON_CLUSTER
def test_an_interrupted_ray_sweep_stops_its_runs(cluster: tuple[object, str], tmp_path: Path) -> None:
    """Ctrl-C (SIGINT) or SIGTERM to the driver: every started task stops its run and the processes under it,
    on the node it ran on, and the driver returns; nothing is reported finished. The two sweeps run at once,
    one on each worker node."""
    import signal

    _, address = cluster
    procs: dict[signal.Signals, subprocess.Popen] = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            out = tmp_path / sig.name
            command = [sys.executable, "-m", "rl_lora.cli", "sweep", str(RECIPE), "--ranks", "1", "--seeds", "1",
                       "--name", "s", "--output-dir", str(out), "--ray", address,
                       *[o for o in TINY if not o.startswith("train.steps")], "train.steps=500"]
            procs[sig] = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True)
        for sig in procs:
            runs = tmp_path / sig.name / "s" / "runs"
            deadline = time.time() + 180
            while time.time() < deadline and not any("run folder" in log.read_text()
                                                      for log in runs.glob("*.log") if log.is_file()):
                time.sleep(0.2)
            (log,) = runs.glob("*.log")
            assert "run folder" in log.read_text(), sig.name
            assert _processes_naming(str(runs)), f"{sig.name}: no run process found"
        for sig, proc in procs.items():
            proc.send_signal(sig)
        errors: dict[signal.Signals, str] = {}
        for sig, proc in procs.items():  # bounded, with room for a loaded machine (once past 120 s in a full suite)
            errors[sig] = proc.communicate(timeout=240)[1][-3000:]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for sig, proc in procs.items():
        runs = tmp_path / sig.name / "s" / "runs"
        expected = 130 if sig == signal.SIGINT else 128 + signal.SIGTERM  # 'interrupted', or the SIGTERM exit
        assert proc.returncode == expected, (sig.name, proc.returncode, errors[sig])
        deadline = time.time() + 30
        while time.time() < deadline and _processes_naming(str(runs)):
            time.sleep(0.5)
        assert _processes_naming(str(runs)) == [], f"{sig.name}: a run outlived its sweep"
        assert not list(runs.glob("*/summary.json"))


@ON_CLUSTER
@pytest.mark.slow
def test_lost_node_resumes_from_checkpoint(cluster: tuple[object, str], local_sweep: Path, tmp_path: Path) -> None:
    """The run's node is removed right after its step-2 checkpoint: Ray retries the task on the other node,
    the run continues from that checkpoint and ends with the uninterrupted run's figures (the local sweep's run
    of the same point). Runs last: it leaves one worker node."""
    handle, address = cluster
    sweep = ["sweep", str(RECIPE), "--ranks", "1", "--seeds", "1", "--name", "s", *TINY]

    marker = tmp_path / "paused"
    env = {"PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "pause_hook"), os.environ.get("PYTHONPATH", "")]),
           "RL_LORA_TEST_PAUSE_AFTER_STEP": "2", "RL_LORA_TEST_PAUSE_MARKER": str(marker)}
    proc = subprocess.Popen([sys.executable, "-m", "rl_lora.cli", *sweep, "--output-dir", str(tmp_path / "ray"),
                             "--ray", address], cwd=REPO, env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        timeline = {"start": time.perf_counter()}
        deadline = time.time() + 300
        while not marker.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert marker.exists(), "the run never reached its step-2 checkpoint"
        timeline["checkpoint 2 sealed"] = time.perf_counter()
        runs = tmp_path / "ray" / "s" / "runs"
        name = next(p.name for p in runs.iterdir() if p.is_dir())
        node_ip = json.loads((runs / f"{name}.ray.json").read_text())["node"]
        victim = next(n for n in handle.worker_nodes if n.node_ip_address == node_ip)
        handle.remove_node(victim, allow_graceful=False)
        timeline["node removed"] = time.perf_counter()
        out, err = proc.communicate(timeout=300)
        timeline["sweep done"] = time.perf_counter()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    assert "1 finished, 0 already done, 0 failed" in out
    assert (local_sweep / "runs" / name).is_dir(), f"{name} is not one of SWEEP's points"
    placement = json.loads((runs / f"{name}.ray.json").read_text())
    assert placement["resumed"] and placement["node"] != node_ip
    assert json.loads((runs / name / "summary.json").read_text())["resumed_from_step"] == 2
    assert _figures(runs / name) == _figures(local_sweep / "runs" / name)
    assert not _alive(int(marker.read_text()))  # the first attempt's process died with its node
    print("timeline (s):", {k: round(v - timeline["start"], 1) for k, v in timeline.items()})
