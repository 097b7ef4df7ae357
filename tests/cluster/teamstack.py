"""The team stack the team-scale tests run against: real single-node Slurm (slurmdbd on
MariaDB), PostgreSQL, Ceph radosgw and an MLflow server on them, started by the project's
own script (workflow/stack/stack.sh; `make stack-up`). Nothing here fakes a component."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from workflow_helpers import ROOT, snakemake

STACK_SH = ROOT / "workflow" / "stack" / "stack.sh"
SLURM_PROFILE = ROOT / "profiles" / "slurm"


def stack_dir() -> Path:
    return Path(os.environ.get("ENGINEFORGE_STACK_DIR", "/tmp/engineforge-stack"))


def read_env() -> dict[str, str]:
    """The variables stack.env exports (what a team member's shell would source)."""
    path = stack_dir() / "stack.env"
    if not path.is_file():
        pytest.fail(f"the team stack is not running ({path} is missing): run `make stack-up`",
                    pytrace=False)
    out = subprocess.run(["bash", "-c", f"set -a; . {shlex.quote(str(path))}; env -0"],
                         capture_output=True, check=True).stdout.decode()
    return dict(kv.split("=", 1) for kv in out.split("\0") if "=" in kv)


def healthy(uri: str, timeout: float = 2) -> bool:
    try:
        urllib.request.urlopen(f"{uri}/health", timeout=timeout)
        return True
    except OSError:
        return False


def ctl(*args: str, timeout: float = 300) -> str:
    """``stack.sh <args>`` (e.g. ``stop mlflow``); its output."""
    proc = subprocess.run(["bash", str(STACK_SH), *args], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"stack.sh {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def unique_seed() -> int:
    """An export seed no earlier run used: the tests share one tracking server (and so one
    build cache), so a test that needs cold builds makes fingerprints of its own."""
    return uuid.uuid4().int % 2**31


# One node with 2 cores here: jobs ask for one core and 1.5 GB (the Snakemake process inside
# each Slurm job needs more than 200 MB), so two run side by side.
SMALL_JOBS = {section: {"cpus": 1, "mem_mb": 1500} for section in (
    "export", "simplify", "precision", "build", "audit", "localise", "repair", "bench",
    "other")}


def team_env(stack: dict, **extra) -> dict:
    """A job's environment in team mode: the tracking server only (no S3 keys: the server
    proxies artifacts), this test's signing key, plus ``extra``."""
    env = {"MLFLOW_TRACKING_URI": stack["MLFLOW_TRACKING_URI"]}
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL"):
        env[var] = ""
    return env | extra


def slurm(ws: Path, *args: str, env: dict, check: bool = True,
          timeout: float = 1200) -> subprocess.CompletedProcess:
    """The workflow with the Slurm profile (every job an sbatch job), as a user runs it."""
    return snakemake(ws, "--workflow-profile", str(SLURM_PROFILE), *args, env=env, check=check)


def sacct(job_ids: list[str]) -> dict[str, str]:
    """Slurm's accounting (slurmdbd) state of each job id."""
    out = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j",
                          ",".join(job_ids)], capture_output=True, text=True, check=True).stdout
    return dict(line.split("|", 1) for line in out.splitlines() if "|" in line)


def wait_for(predicate, timeout: float, what: str, every: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def sidecars(ws: Path, stages=("export", "simplify", "precision", "build")) -> dict[str, dict]:
    """Sidecars of the given stages by path relative to the artifacts directory."""
    a = ws / "artifacts"
    out = {}
    for side in a.rglob("*.json"):
        if "/_tracking/" in side.as_posix() or side.name.startswith("."):
            continue
        data = json.loads(side.read_text())
        if isinstance(data, dict) and data.get("stage") in stages:
            out[side.relative_to(a).as_posix()] = data
    return out
