"""Bad team-mode input is one line (what, where, fix), before any job: a Slurm partition that
does not exist, named in the config or in the profile's default resources."""

from __future__ import annotations

import pytest
import teamstack
from conftest import tiny_raw_config, write_tiny_workspace
from engineforge import resources
from workflow_helpers import write_config

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

