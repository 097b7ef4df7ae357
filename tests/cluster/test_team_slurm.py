"""The zoo as real Slurm jobs (snakemake-executor-plugin-slurm, profiles/slurm) tracked on
the team's MLflow server (PostgreSQL, artifacts proxied to radosgw): the same fingerprints
and ONNX / ORT bytes as a local run, and every sidecar and MLflow run says where it ran."""

from __future__ import annotations

import json
import socket
import time

import boto3
import pytest
import teamstack
from conftest import tiny_raw_config, write_tiny_workspace
from mlflow.tracking import MlflowClient
from workflow_helpers import snakemake, write_config

pytestmark = pytest.mark.cluster



def unique_zoo(ws, seed: int, **overrides) -> dict:
    """The tiny zoo with weights of its own (fingerprints no other test has built)."""
    import tinynets
    import torch

    write_tiny_workspace(ws)
    torch.manual_seed(seed)
    torch.save(tinynets.TinyClassifier().state_dict(), ws / "tinycls.pt")
    raw = tiny_raw_config(precisions=("fp32", "int8"),
                          backends=("onnxruntime", "tensorrt-rtx"))
    raw["experiment"] = f"team-{seed}"
    raw["models"].pop("tinyfcn")  # ~10 s per Slurm job here: one model keeps it short
    raw["defaults"]["resources"] = teamstack.SMALL_JOBS
    raw |= overrides
    write_config(ws, raw)
    return raw


def comparable(sides: dict) -> dict:
    """Fingerprint and output hashes; TensorRT-family engines by fingerprint only (TensorRT
    does not promise bit-identical builds) and the torch.export program neither."""
    return {rel: (s["fingerprint"], None if "/build/tensorrt-rtx/" in f"/{rel}" else
                  {k: v["sha256"] for k, v in s["outputs"].items() if k != "program"})
            for rel, s in sides.items()}


@pytest.fixture(scope="module")
def stack():
    env = teamstack.read_env()
    assert teamstack.healthy(env["MLFLOW_TRACKING_URI"]), "the stack's MLflow server is down"
    return env


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The reference: the unique zoo run locally (sqlite tracking, no cache)."""
    seed = teamstack.unique_seed()
    local = tmp_path_factory.mktemp("local")
    unique_zoo(local, seed)
    snakemake(local, env={"ENGINEFORGE_CACHE": "0"})
    return seed, teamstack.sidecars(local)


def test_the_zoo_on_slurm_equals_a_local_run_and_says_where_it_ran(stack, local_run, tmp_path):
    # setup: the reference zoo in a second checkout
    seed, here = local_run
    cluster = tmp_path / "cluster"
    raw = unique_zoo(cluster, seed)
    # execute: as Slurm jobs against the team server
    t0 = time.time()
    teamstack.slurm(cluster, env=teamstack.team_env(stack))
    wall = time.time() - t0
    # assert: the same fingerprints and bytes
    there = teamstack.sidecars(cluster)
    assert len(there) == 1 + 1 + 2 + 2 * 2  # export, simplify, precisions, builds
    assert comparable(there) == comparable(here)
    # every job's sidecar records where its work ran: a Slurm job of its own, on this node
    every = teamstack.sidecars(cluster, stages=("export", "simplify", "precision",
                                                "ort_quantize", "build", "audit", "bench",
                                                "baseline", "profiles"))
    ids = [s["ran"]["slurm_job_id"] for s in every.values()]
    assert all(ids) and len(set(ids)) == len(ids), ids
    assert {s["ran"]["host"] for s in every.values()} == {socket.gethostname()}
    assert all(s["ran"]["started_at"] <= s["ran"]["finished_at"] for s in every.values())
    states = teamstack.sacct(ids)
    assert set(states) == set(ids) and set(states.values()) == {"COMPLETED"}, states
    # local rules ran here, not as Slurm jobs (no job id)
    assert (cluster / "artifacts/tinycls/track.json").is_file()
    # MLflow (PostgreSQL): every run, finished, each engine run carries its build's Slurm job
    client = MlflowClient(tracking_uri=stack["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(raw["experiment"])
    runs = client.search_runs([exp.experiment_id], max_results=500)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(runs) == 1 + 2 * 2 and len(children) == 4
    assert {r.info.status for r in runs} == {"FINISHED"}
    build_ids = {s["ran"]["slurm_job_id"] for rel, s in every.items() if "/build/" in rel}
    assert {r.data.tags["engineforge.ran.slurm_job_id"] for r in children} == build_ids
    # artifacts went through the server into the bucket (the client holds no S3 keys)
    assert exp.artifact_location.startswith("mlflow-artifacts:")
    s3 = boto3.client("s3", endpoint_url=stack["ENGINEFORGE_S3_ENDPOINT"],
                      aws_access_key_id=stack["ENGINEFORGE_STACK_S3_ACCESS_KEY"],
                      aws_secret_access_key=stack["ENGINEFORGE_STACK_S3_SECRET_KEY"])
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket=stack["ENGINEFORGE_STACK_ARTIFACT_BUCKET"], Prefix=f"{exp.experiment_id}/")
        for o in page.get("Contents", [])]
    assert any(k.endswith("/build/engine.onnx") for k in keys) and any(
        k.endswith("/simplify/model.onnx") for k in keys), keys[:20]
    print(f"slurm zoo: {len(every)} Slurm jobs, wall {wall:.1f} s")


def test_the_zoo_on_slurm_with_s3_storage_and_no_shared_files(stack, local_run, tmp_path):
    """Snakemake's S3 storage plugin (`--default-storage-provider s3`), as on a cluster
    without a shared file system: the inputs are in the bucket, every job retrieves what it
    declares and stores what it writes; nothing lands in the checkout's artifacts."""
    # setup: the reference zoo's inputs uploaded under a prefix of their own
    seed, here = local_run
    ws = tmp_path / "ws"
    unique_zoo(ws, seed)
    bucket, prefix = stack["ENGINEFORGE_STACK_STORAGE_BUCKET"], f"storage-test-{seed}"
    s3 = boto3.client("s3", endpoint_url=stack["ENGINEFORGE_S3_ENDPOINT"],
                      aws_access_key_id=stack["ENGINEFORGE_STACK_S3_ACCESS_KEY"],
                      aws_secret_access_key=stack["ENGINEFORGE_STACK_S3_SECRET_KEY"])
    for name in ("tinycls.pt", "tinynets.py", "calib.npz", "eval.npz"):
        s3.upload_file(str(ws / name), bucket, f"{prefix}/{name}")
    storage_env = {k: v for k, v in stack.items() if k.startswith("SNAKEMAKE_STORAGE_S3_")}
    assert set(storage_env) >= {"SNAKEMAKE_STORAGE_S3_ENDPOINT_URL",
                                "SNAKEMAKE_STORAGE_S3_ACCESS_KEY",
                                "SNAKEMAKE_STORAGE_S3_SECRET_KEY"}
    # execute: Slurm jobs, files in S3, cold builds (the first test's cache entries unused)
    teamstack.slurm(ws, "--default-storage-provider", "s3",
                    "--default-storage-prefix", f"s3://{bucket}/{prefix}",
                    env=teamstack.team_env(stack, ENGINEFORGE_CACHE="0", **storage_env))
    # assert: the bucket holds the same fingerprints and bytes as the local run
    got = tmp_path / "from-bucket"
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                              Prefix=f"{prefix}/artifacts/"):
        for obj in page.get("Contents", []):
            dest = got / obj["Key"][len(prefix) + 1:]
            dest.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, obj["Key"], str(dest))
    there = teamstack.sidecars(got)
    assert len(there) == 1 + 1 + 2 + 2 * 2
    assert comparable(there) == comparable(here)
    # the summary and the report read their inputs from the retrieved copies
    summary = json.loads((got / "artifacts/summary.json").read_text())
    rows = {(r["precision"], r["backend"]): r for r in summary["rows"]}
    ort = rows[("fp32", "onnxruntime")]
    assert ort["audit"] == "pass" and ort["p50_ms"] > 0, ort
    assert "tinycls" in (got / "artifacts/report.html").read_text()
    # no output landed in the checkout's own artifacts (logs and build diagnostics stay
    # on the node that ran the job)
    stored = {p.relative_to(got).as_posix() for p in got.rglob("*") if p.is_file()}
    local_files = {p.relative_to(ws).as_posix() for p in (ws / "artifacts").rglob("*")
                   if p.is_file()} if (ws / "artifacts").exists() else set()
    assert len(stored) > 30 and not stored & local_files, sorted(stored & local_files)
