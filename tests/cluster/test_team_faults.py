"""Faults of the team's systems, each ending with nothing lost and nothing untrusted: a Slurm
job cancelled mid-way, the MLflow server stopped mid-run, radosgw stopped before the
artifact uploads, PostgreSQL restarted during a run."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import teamstack
from conftest import FIXTURES, tiny_raw_config, write_tiny_workspace
from mlflow.tracking import MlflowClient
from workflow_helpers import ROOT, SNAKEMAKE, snakemake, write_config

pytestmark = pytest.mark.cluster
SLOW = "slowcls"


@pytest.fixture(scope="module")
def stack():
    env = teamstack.read_env()
    assert teamstack.healthy(env["MLFLOW_TRACKING_URI"]), "the stack's MLflow server is down"
    yield env
    # a failed test must not leave a service down for the next one
    for service in ("mlflow", "radosgw", "postgres"):
        teamstack.ctl("start", service)


def _zoo(ws: Path, experiment: str, slow_seconds: float | None = None) -> dict:
    write_tiny_workspace(ws)
    raw = tiny_raw_config()
    raw["experiment"] = experiment
    raw["models"].pop("tinyfcn")
    raw["defaults"]["resources"] = teamstack.SMALL_JOBS
    if slow_seconds:
        shutil.copy(FIXTURES / "slow_nets.py", ws / "slow_nets.py")
        tiny = raw["models"]["tinycls"]
        raw["models"][SLOW] = {
            "task": "classification", "inputs": tiny["inputs"], "profiles": tiny["profiles"],
            "checkpoint": {"kind": "state_dict", "arch": "slow_nets:SlowToBuild",
                           "arch_kwargs": {"seconds": slow_seconds, "marker": "slow-started"}}}
    write_config(ws, raw)
    return raw


def _start(ws: Path, env: dict, *args: str) -> subprocess.Popen:
    cmd = [str(SNAKEMAKE), "-s", str(ROOT / "Snakefile"), "--configfile", str(ws / "config.yaml"),
           "--directory", str(ws), "--cores", "2", *args]
    return subprocess.Popen(cmd, cwd=ws, env={**os.environ, **env}, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _runs(uri: str, experiment: str):
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=500) if exp else []


def _sync(ws: Path, uri: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).with_name("engineforge")), "sync",
                           "--artifacts", str(ws / "artifacts")],
                          env={**os.environ, "MLFLOW_TRACKING_URI": uri}, cwd=ws,
                          capture_output=True, text=True, timeout=600)


def test_a_slurm_job_cancelled_mid_way(stack, tmp_path):
    """scancel of a running job: that job is one failed line (model, stage, fix), the others'
    results are all reported, nothing it half-wrote is used, and a rerun completes it."""
    # setup: a model whose export takes 20 s, beside a quick one
    ws = tmp_path / "ws"
    raw = _zoo(ws, f"team-cancel-{teamstack.unique_seed()}", slow_seconds=20)
    env = teamstack.team_env(stack, ENGINEFORGE_CACHE="0")
    proc = _start(ws, env, "--workflow-profile", str(teamstack.SLURM_PROFILE))
    # execute: cancel the slow model's job once its work has started
    marker = ws / "slow-started"
    job = teamstack.wait_for(lambda: marker.is_file() and marker.read_text().strip().isdigit()
                             and marker.read_text().strip(), 600, "the slow job to start")
    subprocess.run(["scancel", job], check=True)
    out, err = proc.communicate(timeout=1200)
    # assert: the run failed, naming that job in one line with the fix
    assert proc.returncode != 0
    assert teamstack.sacct([job])[job].startswith("CANCELLED")
    lines = [ln for ln in err.splitlines() if ln.startswith("  - ")]
    assert len(lines) == 1, err[-3000:]
    # the export and the eager baseline both build the slow model: either may be the one
    m = re.match(rf"  - {SLOW} (export|baseline)( b1-8)?: \[model={SLOW} "
                 rf"stage=(export|baseline)\] "
                 rf"the job was stopped before it finished \(Slurm job {job} on ", lines[0])
    assert m, lines[0]
    cancelled = ws / "artifacts" / SLOW / ("export/export.json" if m.group(1) == "export"
                                           else "bench/pytorch/b1-8.json")
    assert "Fix: " in lines[0] and "Traceback" not in err
    # everything else is reported; the cancelled job left nothing a later run would trust
    summary = (ws / "artifacts/summary.md").read_text()
    assert "| tinycls | fp32 | onnxruntime | pass |" in summary
    assert SLOW in summary and "Failed jobs" in summary
    assert not cancelled.exists()
    assert not list((ws / "artifacts").rglob(".*.tmp"))
    # execute: a rerun
    rerun = teamstack.slurm(ws, env=env)
    # assert: it completes the cancelled model, and reruns nothing of the other
    assert rerun.returncode == 0
    assert cancelled.is_file()
    assert f"| {SLOW} | fp32 | onnxruntime | pass |" in (ws / "artifacts/summary.md").read_text()
    assert "rule export:" not in re.sub(rf"(?s)rule export:.*?model={SLOW}", "", rerun.stdout)
    assert len(_runs(stack["MLFLOW_TRACKING_URI"], raw["experiment"])) >= 2


@pytest.mark.parametrize("service", ["mlflow", "radosgw"])
def test_tracking_down_mid_run_keeps_records_pending_until_sync(stack, tmp_path, service):
    """The MLflow server (or its artifact store, radosgw) stops after the first job: the
    builds finish, the records stay pending on disk, `engineforge sync` uploads them once the
    service is back, and no half-uploaded run is ever a cache source."""
    # setup
    ws = tmp_path / "ws"
    raw = _zoo(ws, f"team-{service}-down-{teamstack.unique_seed()}")
    uri = stack["MLFLOW_TRACKING_URI"]
    env = teamstack.team_env(stack, ENGINEFORGE_CACHE="0")
    proc = _start(ws, env)
    # execute: the service goes down once the export is published (tracking comes last)
    teamstack.wait_for(lambda: (ws / "artifacts/tinycls/export/export.json").is_file(), 300,
                       "the export")
    teamstack.ctl("stop", service)
    try:
        out, err = proc.communicate(timeout=900)
    finally:
        teamstack.ctl("start", service)
    # assert: the builds finished; the record is pending, not lost
    assert proc.returncode == 0, err[-3000:]
    track = json.loads((ws / "artifacts/tinycls/track.json").read_text())
    assert track["status"] == "pending", track
    pending = list((ws / "artifacts/_tracking/pending").glob("*.json"))
    assert len(pending) == 1
    assert "| tinycls | fp32 | onnxruntime | pass |" in (ws / "artifacts/summary.md").read_text()
    finished = [r for r in _runs(uri, raw["experiment"]) if r.info.status == "FINISHED"]
    assert finished == []  # a half-uploaded run (radosgw down) never ends FINISHED
    # execute: the service is back (started above); sync
    proc = _sync(ws, uri)
    # assert: everything uploaded once, nothing pending
    assert proc.returncode == 0, proc.stderr
    runs = [r for r in _runs(uri, raw["experiment"]) if r.info.status == "FINISHED"]
    assert len(runs) == 2  # the parent and its one engine
    assert not list((ws / "artifacts/_tracking/pending").glob("*.json"))
    # the engine is there: uploaded, or referenced in the finished run that holds the same
    # build (this zoo's fingerprints are shared with other tests on this server)
    client = MlflowClient(tracking_uri=uri)
    child = next(r for r in runs if "mlflow.parentRunId" in r.data.tags)
    holder = child.data.tags.get("engineforge.ref.build", f"runs:/{child.info.run_id}/build")
    holder_id = holder.removeprefix("runs:/").split("/")[0]
    assert client.get_run(holder_id).info.status == "FINISHED"
    assert "build/engine.onnx" in {f.path for f in client.list_artifacts(holder_id, "build")}


def test_postgres_restarted_during_a_run(stack, tmp_path):
    """PostgreSQL goes away for a few seconds mid-run: the MLflow server reconnects and the
    run's record is logged, or kept pending and synced: never lost, never logged twice."""
    # setup
    ws = tmp_path / "ws"
    raw = _zoo(ws, f"team-pg-restart-{teamstack.unique_seed()}")
    uri = stack["MLFLOW_TRACKING_URI"]
    proc = _start(ws, teamstack.team_env(stack, ENGINEFORGE_CACHE="0"))
    # execute
    teamstack.wait_for(lambda: (ws / "artifacts/tinycls/export/export.json").is_file(), 300,
                       "the export")
    teamstack.ctl("stop", "postgres")
    time.sleep(3)
    teamstack.ctl("start", "postgres")
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    synced = _sync(ws, uri)
    # assert
    assert synced.returncode == 0, synced.stderr
    runs = [r for r in _runs(uri, raw["experiment"]) if r.info.status == "FINISHED"]
    assert len(runs) == 2
    assert teamstack.healthy(uri)
    # the server serves new work after the restart
    again = snakemake(ws, "--forcerun", "track", env=teamstack.team_env(stack))
    assert again.returncode == 0


def test_slurmd_killed_while_jobs_run(stack, tmp_path):
    """The node's slurmd dies mid-run (SIGKILL) and comes back: running job steps survive
    it, nothing is lost or half-written, and the run (or else a rerun) completes."""
    # setup
    ws = tmp_path / "ws"
    _zoo(ws, f"team-slurmd-{teamstack.unique_seed()}")
    env = teamstack.team_env(stack, ENGINEFORGE_CACHE="0")
    proc = _start(ws, env, "--workflow-profile", str(teamstack.SLURM_PROFILE))
    # execute: kill slurmd once the first job has published its output
    teamstack.wait_for(lambda: (ws / "artifacts/tinycls/export/export.json").is_file(), 600,
                       "the export")
    pid = int((teamstack.stack_dir() / "pids/slurmd.pid").read_text())
    os.kill(pid, 9)
    time.sleep(10)
    teamstack.ctl("start", "slurmd")
    out, err = proc.communicate(timeout=1200)
    if proc.returncode != 0:  # jobs the scheduler lost are listed, each in one line
        lines = [ln for ln in err.splitlines() if ln.startswith("  - ")]
        assert lines and all("Fix: " in ln for ln in lines), err[-3000:]
        proc = teamstack.slurm(ws, env=env)
    # assert: complete, and every output matches its sidecar
    assert "| tinycls | fp32 | onnxruntime | pass |" in (ws / "artifacts/summary.md").read_text()
    check = subprocess.run([str(Path(sys.executable).with_name("engineforge")), "check",
                            "--artifacts", str(ws / "artifacts")], cwd=ws, capture_output=True,
                           text=True, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr
    assert not list((ws / "artifacts").rglob(".*.tmp"))
