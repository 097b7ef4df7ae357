"""Releases, the Model Registry and the gate's MLflow baselines against the team's server
(runs and the registry in PostgreSQL, artifacts proxied to radosgw): the commands a user
runs, in subprocesses, with the environment a team member has (no S3 keys)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import mlflow.artifacts
import pytest
import teamstack
from conftest import tiny_raw_config, write_tiny_workspace
from engineforge.sidecar import read_json, sha256_file
from mlflow.tracking import MlflowClient
from workflow_helpers import snakemake, write_config

pytestmark = pytest.mark.cluster

ENGINEFORGE = Path(sys.executable).parent / "engineforge"
NAME = "engineforge.tinycls.fp32.b1-8.onnxruntime"


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """tinycls (weights of its own) built locally and tracked on the team server."""
    import tinynets
    import torch

    stack = teamstack.read_env()
    assert teamstack.healthy(stack["MLFLOW_TRACKING_URI"]), "the stack's MLflow server is down"
    seed = teamstack.unique_seed()
    ws = tmp_path_factory.mktemp("team-release")
    write_tiny_workspace(ws)
    torch.manual_seed(seed)
    torch.save(tinynets.TinyClassifier().state_dict(), ws / "tinycls.pt")
    raw = tiny_raw_config()
    raw["models"].pop("tinyfcn")
    raw["experiment"] = f"team-release-{seed}"
    write_config(ws, raw)
    env = teamstack.team_env(stack)
    snakemake(ws, env=env)
    return ws, raw, env, stack, seed


def cli(ws: Path, *args: str, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(ENGINEFORGE), *args], cwd=ws, capture_output=True, text=True,
                          env={**os.environ, **env})
    assert not check or proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_release_registers_the_engine_and_its_bundle_verifies(tracked, tmp_path, monkeypatch):
    # setup
    ws, raw, env, stack, seed = tracked
    version = f"1.{seed}"
    alias = f"release-1_{seed}"
    # execute: a release from the team server's runs, then verify the bundle
    cli(ws, "release", version, env=env)
    bundle = ws / f"artifacts/releases/engineforge-{version}.tar.gz"
    verified = cli(ws, "verify", str(bundle), env=env)
    # assert: the registry (PostgreSQL) holds the version under the alias, its run is
    # this model's engine run, and its source downloads (through the server, from
    # radosgw) to the released bytes
    assert "OK: 1 engines verified" in verified.stdout, verified.stdout
    with tarfile.open(bundle) as tar:
        manifest = json.loads(tar.extractfile(f"engineforge-{version}/manifest.json").read())
    (engine,) = manifest["engines"]
    client = MlflowClient(tracking_uri=stack["MLFLOW_TRACKING_URI"])
    mv = client.get_model_version_by_alias(NAME, alias)
    assert mv.tags["engineforge.sha256"] == engine["sha256"]
    assert mv.run_id == engine["mlflow"]["run_id"]
    run = client.get_run(mv.run_id)
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == raw["experiment"]
    assert run.data.tags["engineforge.model"] == "tinycls"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack["MLFLOW_TRACKING_URI"])  # the registry's
    got = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{NAME}@{alias}",
                                              dst_path=str(tmp_path / "dl"),
                                              tracking_uri=stack["MLFLOW_TRACKING_URI"])
    assert sha256_file(Path(got) / Path(engine["path"]).name) == engine["sha256"]
    local = ws / "artifacts/tinycls/build/onnxruntime/fp32/b1-8/engine.onnx"
    assert sha256_file(local) == engine["sha256"]


def test_the_gate_reads_models_and_runs_baselines_from_the_team_server(tracked):
    # setup: the release of the first test names the registered version
    ws, raw, env, stack, seed = tracked
    alias = f"release-1_{seed}"
    client = MlflowClient(tracking_uri=stack["MLFLOW_TRACKING_URI"])
    mv = client.get_model_version_by_alias(NAME, alias)
    parent = client.get_run(mv.run_id).data.tags["mlflow.parentRunId"]
    for source, label in ((f"models:/{NAME}@{alias}", parent), (f"runs:/{parent}", parent)):
        raw["models"]["tinycls"]["gate"] = {"baseline": source, "strict": True}
        write_config(ws, raw)
        # execute: the gate job (and what depends on it) against the server
        snakemake(ws, env=env)
        # assert: compared against that run's drift matrix, nothing regressed
        gate = read_json(ws / "artifacts/tinycls/audit/gate.json")
        assert gate["baseline"]["source"] == source
        assert label in gate["baseline"]["label"]
        assert gate["status"] == "pass" and gate["compared"] > 0 and gate["regressions"] == 0
