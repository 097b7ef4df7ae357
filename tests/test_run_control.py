"""Run control: which config a run reads, time limits, Ctrl-C / SIGTERM, SIGKILL recovery and
concurrent runs — all on the real workflow (tiny models), with real signals."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FIXTURES, ROOT, tiny_raw_config, write_tiny_workspace
from workflow_helpers import SNAKEMAKE, planned_jobs, snakemake, write_config

pytestmark = pytest.mark.e2e

SLOW = "slowcls"
# Bounds sized for a loaded 2-core machine. The waits are for events (a file appears, the
# processes are gone) and return as soon as they happen: their limits only end a hung run.
# The time bounds are each far below what the failure they detect would take: the slow
# model's export sleeps SLOW_S, and a run that waited for it would take at least that.
SLOW_S = 600
START_TIMEOUT_S = 600      # a file the run writes appears (jobs before it included)
GONE_TIMEOUT_S = 120       # a killed run's workers exit (the fork server may be importing)
STOP_BOUND_S = 120         # SIGTERM / Ctrl-C to exit; Snakemake alone waits SLOW_S
TIME_LIMIT_RUN_BOUND_S = SLOW_S / 2  # the whole run past a 2 s time limit on the slow job


def add_slow_model(raw: dict, seconds: float, marker: str = "slow-started") -> dict:
    """A classifier whose export takes ``seconds`` (its arch sleeps while being built)."""
    tiny = raw["models"]["tinycls"]
    raw["models"][SLOW] = {
        "task": "classification",
        "checkpoint": {"kind": "state_dict", "arch": "slow_nets:SlowToBuild",
                       "arch_kwargs": {"seconds": seconds, "marker": marker}},
        "inputs": tiny["inputs"], "profiles": tiny["profiles"],
    }
    return raw


def workspace(tmp_path: Path, raw: dict) -> Path:
    write_tiny_workspace(tmp_path)
    shutil.copy(FIXTURES / "slow_nets.py", tmp_path / "slow_nets.py")
    write_config(tmp_path, raw)
    return tmp_path


def start(ws: Path, *args: str) -> subprocess.Popen:
    cmd = [str(SNAKEMAKE), "-s", str(ROOT / "Snakefile"), "--configfile", str(ws / "config.yaml"),
           "--directory", str(ws), "--cores", "2", *args]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{ws}/mlflow.db"}
    return subprocess.Popen(cmd, cwd=ws, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the run ended before {path} appeared:\n{out[-2000:]}\n"
                                 f"{err[-3000:]}")
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.05)


def processes_in(ws: Path) -> list[int]:
    """Processes whose working directory is the workspace (the run and its workers)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if Path(os.readlink(d / "cwd")) == ws.resolve():
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def wait_gone(ws: Path, timeout: float = GONE_TIMEOUT_S) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := processes_in(ws)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def workers_of(run: subprocess.Popen, ws: Path, timeout: float = START_TIMEOUT_S) -> list[int]:
    """The run's other processes in the workspace (fork server, job workers), once there
    is one: the positive control that a killed run had workers that could outlive it."""
    deadline = time.monotonic() + timeout
    while not (others := [p for p in processes_in(ws) if p != run.pid]):
        assert run.poll() is None and time.monotonic() < deadline, "the run started no worker"
        time.sleep(0.05)
    return others


def leftovers(artifacts: Path) -> list[Path]:
    """Half-written things a run may leave: staging directories and temporary files."""
    return [p for p in artifacts.rglob("*")
            if p.name.startswith(".staging-") or (p.name.startswith(".") and
                                                  p.name.endswith(".tmp"))]


def untrusted_outputs(artifacts: Path) -> list[str]:
    """Every sidecar's recorded outputs, re-hashed: the files that do not match."""
    bad = []
    for side in artifacts.rglob("*.json"):
        try:
            data = json.loads(side.read_text())
        except ValueError:
            bad.append(f"{side}: unreadable")
            continue
        if not isinstance(data, dict) or "sidecar_version" not in data:
            continue
        for out in data["outputs"].values():
            p = Path(out["path"])
            p = p if p.is_absolute() else artifacts.parent / p
            if not p.is_file() or hashlib.sha256(p.read_bytes()).hexdigest() != out["sha256"]:
                bad.append(str(p))
    return bad


# -- which config a run reads -------------------------------------------------------------
def test_configfile_replaces_the_demo_config(tmp_path):
    """--configfile is the user's whole config: the config.yaml beside it (the demo zoo) is
    not merged in. Positive control: without --configfile, that config.yaml is planned."""
    ws = workspace(tmp_path, tiny_raw_config())
    demo = tiny_raw_config()
    demo["models"] = {"demo_only": demo["models"]["tinyfcn"]}
    (ws / "config.yaml").rename(ws / "mine.yaml")
    write_config(ws, demo)  # config.yaml: the "demo"
    proc = subprocess.run([str(SNAKEMAKE), "-s", str(ROOT / "Snakefile"), "--configfile",
                           str(ws / "mine.yaml"), "-n", "--cores", "1"], cwd=ws,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "demo_only" not in proc.stdout and "tinycls" in proc.stdout
    plain = subprocess.run([str(SNAKEMAKE), "-s", str(ROOT / "Snakefile"), "-n", "--cores", "1"],
                           cwd=ws, capture_output=True, text=True)
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert "demo_only" in plain.stdout and "tinycls" not in plain.stdout


@pytest.mark.parametrize("text, expected", [
    ("models: [a\n  b: c\n", "is not valid YAML at line 2, column 4"),
    ("- 1\n- 2\n", "must be a mapping of keys"),
    ("", "must be a mapping of keys"),
])
def test_bad_config_file_is_one_line(tmp_path, text, expected):
    """The default config.yaml (read by the workflow) and `engineforge run --configfile`:
    one line in our format, no traceback, exit code non-zero."""
    (tmp_path / "config.yaml").write_text(text)
    runs = [
        subprocess.run([str(SNAKEMAKE), "-s", str(ROOT / "Snakefile"), "-n", "--cores", "1"],
                       cwd=tmp_path, capture_output=True, text=True),
        subprocess.run([sys.executable, "-m", "engineforge.cli", "run", "--configfile",
                        "config.yaml", "-n"], cwd=tmp_path, capture_output=True, text=True),
    ]
    for proc in runs:
        assert proc.returncode != 0
        ours = [line for line in proc.stderr.splitlines() if line.startswith("engineforge:")]
        assert len(ours) == 1 and expected in ours[0] and "Fix:" in ours[0], proc.stderr
        assert "Traceback" not in proc.stderr and 'File "' not in proc.stderr


@pytest.mark.parametrize("artifacts, expected", [
    ("a_file", "is a file, not a directory"),
    ("/proc/engineforge-artifacts", "is not writable"),
])
def test_bad_artifacts_path_is_one_line(tmp_path, artifacts, expected):
    raw = tiny_raw_config()
    raw["artifacts"] = artifacts
    ws = workspace(tmp_path, raw)
    (ws / "a_file").write_text("not a directory")
    proc = snakemake(ws, "-n", check=False)
    assert proc.returncode != 0
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("engineforge:")]
    assert len(line) == 1 and expected in line[0] and "key=artifacts" in line[0], proc.stderr
    assert "Traceback" not in proc.stderr


# -- time limits, interrupts ----------------------------------------------------------------
def test_time_limit_fails_the_job_and_the_run_goes_on(tmp_path):
    """A job past its stage's time limit is killed, fails with one line, and the other
    models still finish."""
    raw = add_slow_model(tiny_raw_config(), seconds=SLOW_S)
    # the PyTorch baseline builds the model too
    raw["models"][SLOW]["time_limits"] = {"export": 2, "baseline": 3}
    ws = workspace(tmp_path, raw)
    t0 = time.monotonic()
    proc = snakemake(ws, check=False)
    took = time.monotonic() - t0
    # a run that let the slow job sleep would take SLOW_S at least
    assert (ws / "slow-started").is_file(), "positive control: the slow job really started"
    assert took < TIME_LIMIT_RUN_BOUND_S, f"the run took {took:.0f} s"
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if f"model={SLOW} stage=export" in ln]
    assert lines and "ran past its time limit of 2 s" in lines[-1], proc.stderr[-3000:]
    assert f"model={SLOW} stage=baseline] " in proc.stderr
    assert (ws / "artifacts/tinycls/audit/drift.json").is_file()  # the others went on
    assert not (ws / f"artifacts/{SLOW}/export/model.onnx").exists()
    assert not wait_gone(ws)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_run_within_seconds(tmp_path, sig):
    """Snakemake alone waits for running jobs (SIGTERM) or its job threads (Ctrl-C): a job
    that runs for 10 minutes would hold the run. Ours stops at once (its running job is
    killed: "was stopped"), leaves no worker process and nothing half-written."""
    ws = workspace(tmp_path, add_slow_model(tiny_raw_config(), seconds=SLOW_S))
    proc = start(ws)
    wait_for(ws / "slow-started", proc)
    assert workers_of(proc, ws), "positive control: the job runs in a worker process"
    proc.send_signal(sig)
    # seconds when the machine is idle; the bound leaves a loaded one room, and is still far
    # below the SLOW_S a run that waited for its job would take
    try:
        _, err = proc.communicate(timeout=STOP_BOUND_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"the run did not stop within {STOP_BOUND_S} s of "
                    f"{signal.Signals(sig).name}: it waited for its job")
    assert proc.returncode != 0
    assert f"model={SLOW} stage=export" in err and "was stopped: the run got " \
        f"{signal.Signals(sig).name}" in err, err[-3000:]
    assert not wait_gone(ws), "worker processes outlived the run"
    assert not (ws / f"artifacts/{SLOW}/export/model.onnx").exists()
    assert not leftovers(ws / "artifacts")
    assert not untrusted_outputs(ws / "artifacts")


def test_second_run_refused_then_sigkill_recovers_without_manual_steps(tmp_path):
    """A second run on the same tree stops with one line naming the running one. After the
    first is SIGKILLed (its Snakemake locks stay behind: checked), the next run removes the
    stale locks itself and completes; nothing it trusts is half-written."""
    ws = workspace(tmp_path, add_slow_model(tiny_raw_config(), seconds=SLOW_S))
    first = start(ws)
    wait_for(ws / "slow-started", first)
    assert workers_of(first, ws), "positive control: the job runs in a worker process"
    second = snakemake(ws, check=False)
    assert second.returncode != 0
    ours = [ln for ln in second.stderr.splitlines() if ln.startswith("engineforge:")]
    assert len(ours) == 1 and f"pid {first.pid}" in ours[0] and "another run" in ours[0]
    assert "Traceback" not in second.stderr and "cannot be locked" not in second.stderr
    # a dry run beside it is allowed (it writes nothing)
    assert snakemake(ws, "-n", check=False).returncode == 0

    first.kill()
    first.communicate()
    assert not wait_gone(ws), "worker processes outlived the killed run"
    assert any((ws / ".snakemake/locks").iterdir()), "positive control: the kill left locks"

    write_config(ws, add_slow_model(tiny_raw_config(), seconds=0))
    again = snakemake(ws, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "removed the locks of an earlier run that is gone" in again.stderr
    assert (ws / "artifacts/summary.md").is_file()
    assert not leftovers(ws / "artifacts")
    assert not untrusted_outputs(ws / "artifacts")


@pytest.fixture(scope="module")
def int8_template(tmp_path_factory):
    ws = tmp_path_factory.mktemp("int8-template")
    raw = tiny_raw_config(precisions=("fp32", "int8"), backends=("onnxruntime", "tensorrt-rtx"))
    raw["models"].pop("tinyfcn")
    workspace(ws, raw)
    return ws


@pytest.mark.parametrize("point", ["export", "precision-int8",
                                   "build-tensorrt-rtx-int8-b1-8", "track"])
def test_sigkill_at_any_point_then_rerun(int8_template, tmp_path, point):
    """SIGKILL of the run while a job of each kind runs (its log file has just been
    created), then a plain rerun: it completes, every output matches its sidecar, no staging
    directory or temporary file is left."""
    ws = tmp_path / "ws"
    shutil.copytree(int8_template, ws)
    run = start(ws)
    wait_for(ws / f"artifacts/tinycls/logs/{point}.log", run)
    assert workers_of(run, ws), "positive control: the run has workers to outlive it"
    run.send_signal(signal.SIGKILL)
    run.communicate()
    assert not wait_gone(ws), "worker processes outlived the killed run"
    assert planned_jobs(ws), "positive control: the kill left work to do"

    again = snakemake(ws, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Traceback" not in again.stderr
    assert (ws / "artifacts/summary.md").is_file()
    assert (ws / "artifacts/tinycls/track.json").is_file()
    assert not leftovers(ws / "artifacts")
    assert not untrusted_outputs(ws / "artifacts")
    assert planned_jobs(ws) == {}
