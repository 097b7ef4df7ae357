"""Ready for a cluster: every job as its own process gives the same artifacts.

Snakemake executor plugins (Slurm, Kubernetes) run each job as a separate process on
another node. ``snakemake-executor-plugin-cluster-generic`` with a submit command that
starts each job script as a local background process does the same here. Every stage's
fingerprint must equal that of a local run, and so must the content of every ONNX artifact
and ORT model; TensorRT-family engines are compared by fingerprint only (TensorRT does not
promise bit-identical builds: releases ship the bytes their sidecar hashes). MLflow must
hold every run.
"""

from __future__ import annotations

import json

import pytest
from conftest import FIXTURES, tiny_raw_config, write_tiny_workspace
from workflow_helpers import snakemake, write_config

pytestmark = pytest.mark.e2e

RAW = tiny_raw_config(precisions=("fp32", "int8"), backends=("onnxruntime", "tensorrt-rtx"))
del RAW["models"]["tinycls"]  # tinyfcn's two profiles are the richer case; half the jobs


def _run(ws, *args):
    write_tiny_workspace(ws)
    write_config(ws, RAW)
    return snakemake(ws, *args)


def _fingerprints(ws) -> dict:
    """Every cached stage's sidecar: fingerprint and output hashes, by relative path."""
    out = {}
    a = ws / "artifacts"
    for side in a.rglob("*.json"):
        rel = side.relative_to(a).as_posix()
        data = json.loads(side.read_text())
        if data.get("stage") in ("export", "simplify", "precision", "build"):
            bytes_comparable = "/build/tensorrt-rtx/" not in f"/{rel}"
            # the torch.export program (torch.export.save) is not byte-reproducible across
            # processes; the ONNX and everything built from it are
            out[rel] = (data["fingerprint"],
                        {k: v["sha256"] for k, v in data["outputs"].items() if k != "program"}
                        if bytes_comparable else None)
    return out


def _runs(ws) -> list[tuple[str, str]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{ws}/mlflow.db")
    exp = client.get_experiment_by_name(RAW["experiment"])
    runs = client.search_runs([exp.experiment_id], max_results=500)
    return sorted((r.info.run_name, r.info.status) for r in runs)


def test_one_process_per_job_gives_the_same_artifacts(tmp_path):
    # setup / execute: the same zoo, locally and as one process per job
    local, cluster = tmp_path / "local", tmp_path / "cluster"
    _run(local)
    _run(cluster, "--executor", "cluster-generic", "--cluster-generic-submit-cmd",
         str(FIXTURES / "submit_local.sh"), "--jobs", "4",
         "--seconds-between-status-checks", "1")
    # assert
    fp_local, fp_cluster = _fingerprints(local), _fingerprints(cluster)
    assert len(fp_local) == 1 + 1 + 2 + 2 * 2 * 2  # export, simplify, precision, builds
    assert fp_cluster == fp_local
    runs = _runs(cluster)
    assert runs == _runs(local)
    assert len(runs) == 1 + 2 * 2 * 2  # 1 parent; 2 precisions x 2 backends x 2 profiles
    assert {status for _, status in runs} == {"FINISHED"}
    summary = (cluster / "artifacts/summary.md").read_text()
    assert "| tinyfcn | int8 | onnxruntime | pass |" in summary
