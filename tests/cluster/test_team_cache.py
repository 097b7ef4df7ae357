"""The build cache on the team's server: two clones submitting the same zoo to Slurm at the
same time, then a third clone that restores every export, precision and build; an engine
replaced in the bucket and entries of a key nobody trusts are refused and rebuilt."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import teamstack
from conftest import tiny_raw_config, write_tiny_workspace
from mlflow.tracking import MlflowClient
from workflow_helpers import ROOT, SNAKEMAKE, snakemake, write_config

pytestmark = pytest.mark.cluster
CACHED = ("export", "simplify", "precision", "build")


@pytest.fixture(scope="module")
def stack():
    env = teamstack.read_env()
    assert teamstack.healthy(env["MLFLOW_TRACKING_URI"]), "the stack's MLflow server is down"
    return env


def _zoo(ws: Path, seed: int, trusted: list[str] | None = None) -> dict:
    import tinynets
    import torch

    write_tiny_workspace(ws)
    torch.manual_seed(seed)
    torch.save(tinynets.TinyClassifier().state_dict(), ws / "tinycls.pt")
    # ONNX Runtime only: TensorRT-RTX entries go through the same code (test_team_slurm
    # builds them on Slurm), and each Slurm job costs ~10 s here
    raw = tiny_raw_config(precisions=("fp32", "int8"), backends=("onnxruntime",))
    raw["experiment"] = f"team-cache-{seed}"
    raw["models"].pop("tinyfcn")
    raw["defaults"]["resources"] = teamstack.SMALL_JOBS
    if trusted is not None:
        raw["trust"] = {"trusted_keys": trusted}
    write_config(ws, raw)
    return raw


def _key(tmp_path: Path, name: str) -> tuple[Path, str]:
    """A builder's own signing key (engineforge keygen): its file and public key line."""
    path = tmp_path / "keys" / f"{name}.key"
    out = subprocess.run([str(Path(sys.executable).with_name("engineforge")), "keygen",
                          "--out", str(path)], capture_output=True, text=True, check=True)
    return path, out.stdout.strip()


def _hits(ws: Path) -> dict[str, bool]:
    return {rel: bool((s.get("cache") or {}).get("hit"))
            for rel, s in teamstack.sidecars(ws, CACHED).items()}


def test_two_clones_at_once_then_a_third_restores_everything(stack, tmp_path):
    # setup: two checkouts of one zoo, one builder key
    seed = teamstack.unique_seed()
    key, _ = _key(tmp_path, "team")
    clones = [tmp_path / name for name in ("a", "b", "c")]
    for ws in clones:
        _zoo(ws, seed)
    env = teamstack.team_env(stack, ENGINEFORGE_SIGNING_KEY_FILE=str(key))
    # execute: a and b submit to Slurm at the same time
    procs = [subprocess.Popen(
        [str(SNAKEMAKE), "-s", str(ROOT / "Snakefile"), "--configfile", str(ws / "config.yaml"),
         "--directory", str(ws), "--cores", "2", "--workflow-profile",
         str(teamstack.SLURM_PROFILE)], cwd=ws, env={**os.environ, **env},
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for ws in clones[:2]]
    outs = [p.communicate(timeout=1800) for p in procs]
    # assert: both finished
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    # execute: a third clone afterwards (locally: the cache does not care where it runs)
    snakemake(clones[2], env=env)
    # assert: every export, simplify, precision and build came from the cache, with the
    # bytes one of the two clones built (ORT and ONNX files are reproducible: the same)
    third = teamstack.sidecars(clones[2], CACHED)
    assert len(third) == 1 + 1 + 2 + 2  # export, simplify, 2 precisions, 2 builds
    assert all(_hits(clones[2]).values()), _hits(clones[2])
    for rel, side in third.items():
        builders = [teamstack.sidecars(ws, CACHED)[rel] for ws in clones[:2]]
        assert side["fingerprint"] == builders[0]["fingerprint"] == builders[1]["fingerprint"]
        for role, out in side["outputs"].items():
            assert out["sha256"] in {b["outputs"][role]["sha256"] for b in builders}, rel
        assert side["cache"]["signed_by"]
        # it records where the entry was built: a Slurm job of clone a or b
        assert side["ran"]["slurm_job_id"]
    # no half-uploaded entry: every holder run the third clone used is FINISHED
    client = MlflowClient(tracking_uri=stack["MLFLOW_TRACKING_URI"])
    for side in third.values():
        assert client.get_run(side["cache"]["run_id"]).info.status == "FINISHED"


def _entry_run(uri: str, experiment: str, name: str) -> str:
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'")
    assert len(runs) == 1
    return exp.experiment_id, runs[0].info.run_id


def test_a_replaced_engine_and_an_untrusted_signer_are_refused_and_rebuilt(stack, tmp_path):
    # setup: a builder (key 1) fills the cache
    seed = teamstack.unique_seed()
    key1, pub1 = _key(tmp_path, "builder")
    key2, _ = _key(tmp_path, "colleague")
    key3, _ = _key(tmp_path, "stranger")
    first = tmp_path / "first"
    raw = _zoo(first, seed)
    snakemake(first, env=teamstack.team_env(stack, ENGINEFORGE_SIGNING_KEY_FILE=str(key1)))
    original = (first / "artifacts/tinycls/build/onnxruntime/fp32/b1-8/engine.onnx").read_bytes()
    # ... and someone with write access to the bucket replaces one engine there
    exp_id, run_id = _entry_run(stack["MLFLOW_TRACKING_URI"], raw["experiment"],
                                "tinycls/fp32/b1-8/onnxruntime")
    s3 = boto3.client("s3", endpoint_url=stack["ENGINEFORGE_S3_ENDPOINT"],
                      aws_access_key_id=stack["ENGINEFORGE_STACK_S3_ACCESS_KEY"],
                      aws_secret_access_key=stack["ENGINEFORGE_STACK_S3_SECRET_KEY"])
    bucket = stack["ENGINEFORGE_STACK_ARTIFACT_BUCKET"]
    s3_key = f"{exp_id}/{run_id}/artifacts/build/engine.onnx"
    s3.head_object(Bucket=bucket, Key=s3_key)  # positive control: that is where it is
    s3.put_object(Bucket=bucket, Key=s3_key, Body=original[:-16] + b"\0" * 16)

    # execute: a colleague who trusts the builder
    second = tmp_path / "second"
    _zoo(second, seed, trusted=[pub1])
    snakemake(second, env=teamstack.team_env(stack, ENGINEFORGE_SIGNING_KEY_FILE=str(key2)))
    # assert: the replaced engine is refused (one warning naming the run and the reason) and
    # rebuilt with the right bytes; every other entry restored
    hits = _hits(second)
    tampered = "tinycls/build/onnxruntime/fp32/b1-8/build.json"
    assert hits.pop(tampered) is False and all(hits.values()), hits
    log = (second / "artifacts/tinycls/logs/build-onnxruntime-fp32-b1-8.log").read_text()
    warned = [ln for ln in log.splitlines() if "not used, rebuilding" in ln]
    assert len(warned) == 1 and run_id in warned[0]
    assert "engine.onnx sha256 differs from the signed entry" in warned[0]
    rebuilt = second / "artifacts/tinycls/build/onnxruntime/fp32/b1-8/engine.onnx"
    assert rebuilt.read_bytes() == original

    # execute: a stranger whose config trusts nobody else (entries signed by key 1 only)
    third = tmp_path / "third"
    _zoo(third, seed, trusted=[])
    snakemake(third, env=teamstack.team_env(stack, ENGINEFORGE_SIGNING_KEY_FILE=str(key3)))
    # assert: nothing installed from the cache; each refusal names the untrusted key
    assert not any(_hits(third).values()), _hits(third)
    logs = "".join(p.read_text() for p in (third / "artifacts/tinycls/logs").glob("*.log"))
    refusals = [ln for ln in logs.splitlines() if "not used, rebuilding" in ln]
    assert refusals and all("untrusted" in ln for ln in refusals), refusals[:3]
    assert json.loads((third / "artifacts/tinycls/track.json").read_text())["status"] == "logged"
