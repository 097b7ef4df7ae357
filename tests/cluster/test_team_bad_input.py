"""Bad team-mode input is one line (what, where, fix), before any job: a Slurm partition that
does not exist (named in the config or in the profile's default resources), a tracking URI
with a wrong password, a tracking server whose artifact bucket does not exist."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import teamstack
from conftest import tiny_raw_config, write_tiny_workspace
from engineforge import mlflow_store, resources
from workflow_helpers import snakemake, write_config

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def stack():
    return teamstack.read_env()


def _one_line(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("engineforge: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    return lines[0]


@pytest.mark.parametrize("where", ["config", "profile"])
def test_a_partition_slurm_does_not_have(stack, tmp_path, where):
    # setup
    write_tiny_workspace(tmp_path)
    raw = tiny_raw_config()
    args = []
    if where == "config":
        raw["defaults"]["resources"] = {"cpu_partition": "nosuch"}
    else:  # what a profile's `default-resources: [slurm_partition=nosuch]` sets
        args = ["--default-resources", "slurm_partition=nosuch"]
    write_config(tmp_path, raw)
    # execute
    proc = teamstack.slurm(tmp_path, *args, env=teamstack.team_env(stack), check=False)
    # assert: one line naming the partition, the ones there are, where it was named
    assert proc.returncode != 0
    line = _one_line(proc)
    assert "Slurm has no partition 'nosuch' (it has: cpu, gpu)" in line
    assert ("key=models.tinycls.resources.cpu_partition" if where == "config"
            else "key=default-resources: slurm_partition (profile)") in line
    assert "Fix: " in line
    # nothing was submitted
    assert not (tmp_path / "artifacts/tinycls/export").exists()
    # control: partitions Slurm has pass the same check (real sinfo)
    resources.check_partitions({"m": {"resources": {"cpu_partition": "cpu",
                                                    "gpu_partition": "gpu"}}}, "cpu")



def test_a_tracking_uri_with_a_wrong_password(stack, tmp_path):
    """MLflow straight on the team's PostgreSQL with a wrong password: one line before any
    job (MLflow's own retries would take minutes, then every record would go pending)."""
    # setup
    write_tiny_workspace(tmp_path)
    write_config(tmp_path, tiny_raw_config())
    good = stack["ENGINEFORGE_STACK_PG_URI"]
    user, rest = good.split("://", 1)[1].split("@", 1)
    password = user.split(":", 1)[1]
    bad = good.replace(f":{password}@", ":not-the-password@")
    # execute
    t0 = time.time()
    proc = snakemake(tmp_path, env={"MLFLOW_TRACKING_URI": bad}, check=False)
    took = time.time() - t0
    # assert: one line naming the key and the server's reason; no password printed
    assert proc.returncode != 0
    line = _one_line(proc)
    assert "key=MLFLOW_TRACKING_URI" in line and "password authentication failed" in line
    assert "Fix: correct the user, password or database name" in line
    assert "not-the-password" not in proc.stdout + proc.stderr
    assert password not in proc.stdout + proc.stderr
    assert not (tmp_path / "artifacts/tinycls/export").exists()
    assert took < 120, took  # generous: the parse alone takes ~10 s on a loaded machine
    # control: the right password passes the same check
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", good)
        mlflow_store.preflight()


@pytest.fixture
def server_with_a_missing_bucket(stack, tmp_path):
    """A second MLflow server on the stack's radosgw whose artifact bucket does not exist."""
    bucket = f"engineforge-missing-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": stack["ENGINEFORGE_STACK_S3_ACCESS_KEY"],
           "AWS_SECRET_ACCESS_KEY": stack["ENGINEFORGE_STACK_S3_SECRET_KEY"],
           "MLFLOW_S3_ENDPOINT_URL": stack["ENGINEFORGE_S3_ENDPOINT"],
           "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    for _ in range(3):  # a port taken between its choice and the server's bind: next one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
             f"sqlite:///{tmp_path}/server.db", "--artifacts-destination", f"s3://{bucket}",
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        uri = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline and not teamstack.healthy(uri):
            time.sleep(0.5)
        if teamstack.healthy(uri):
            break
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    else:
        pytest.fail("the second MLflow server did not start", pytrace=False)
    yield uri, bucket
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


def test_a_missing_bucket(stack, server_with_a_missing_bucket, tmp_path):
    """The server's artifact bucket does not exist: one line before any job, not a build
    whose every upload fails."""
    # setup
    uri, bucket = server_with_a_missing_bucket
    write_tiny_workspace(tmp_path)
    write_config(tmp_path, tiny_raw_config())
    # execute
    proc = snakemake(tmp_path, env={"MLFLOW_TRACKING_URI": uri}, check=False)
    # assert
    assert proc.returncode != 0
    line = _one_line(proc)
    assert f"stores artifacts in s3://{bucket}, whose bucket does not exist" in line
    assert "key=MLFLOW_TRACKING_URI" in line and "Fix: create the bucket" in line
    assert not (tmp_path / "artifacts/tinycls/export").exists()
    # control: the team server, whose bucket exists, passes the same check
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", stack["MLFLOW_TRACKING_URI"])
        mlflow_store.preflight()
