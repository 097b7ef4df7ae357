"""Run the real Snakemake workflow (CLI, workflow profile) on a test workspace."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
PROFILE = ROOT / "profiles" / "default"


def write_config(workspace: Path, raw: dict) -> Path:
    path = workspace / "config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def snakemake(workspace: Path, *args: str, env: dict | None = None, cores: int = 2,
              check: bool = True, snakefile: Path = ROOT / "Snakefile"
              ) -> subprocess.CompletedProcess:
    # No --workflow-profile: Snakemake must find profiles/default next to the Snakefile itself.
    cmd = [str(SNAKEMAKE), "-s", str(snakefile), "--configfile", str(workspace / "config.yaml"),
           "--directory", str(workspace), "--cores", str(cores), *args]
    full_env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workspace}/mlflow.db",
                **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, cwd=workspace)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def planned_jobs(workspace: Path, env: dict | None = None) -> dict[str, int]:
    """Jobs a dry run plans, by rule ({} when there is nothing to do)."""
    counts: dict[str, int] = {}
    for rule, _ in planned_outputs(workspace, env):
        counts[rule] = counts.get(rule, 0) + 1
    return counts


def planned_outputs(workspace: Path, env: dict | None = None) -> list[tuple[str, str]]:
    """(rule, first output) of every job a dry run plans."""
    proc = snakemake(workspace, "--dry-run", env=env)
    text = proc.stdout + proc.stderr
    if "Nothing to be done" in text:
        return []
    jobs, rule = [], None
    for line in text.splitlines():
        m = re.match(r"^(?:local)?rule (\w+):$", line.strip())
        if m:
            rule = m.group(1)
            if rule == "all":
                jobs.append((rule, ""))
            continue
        m = re.match(r"^output: (\S+?),?(?: |$)", line.strip())
        if m and rule:
            jobs.append((rule, m.group(1)))
            rule = None
    return jobs
