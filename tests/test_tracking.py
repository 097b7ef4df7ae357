"""Tracking records: idempotent uploads, deduplicated artifacts, and the pending queue."""

from __future__ import annotations

from pathlib import Path

import pytest
from engineforge import cache, mlflow_store
from engineforge.layout import Layout
from engineforge.sidecar import write_json
from engineforge.stages import track
from mlflow.tracking import MlflowClient


def _record(tmp_path, rid, fp="f" * 64, metric=1.0):
    art = tmp_path / "export.json"
    art.write_text('{"x": 1}')
    run = {"name": "m", "tags": {f"{mlflow_store.CACHE_TAG}.export": fp},
           "params": {"p": "1"}, "metrics": {"t": metric}, "artifacts": [[str(art), "export"]]}
    child = {"name": "m/fp32/p/onnxruntime", "tags": {}, "params": {}, "metrics": {"lat": 2.0},
             "artifacts": []}
    return {"experiment": "t", "model": "m", "id": rid, "parent": run, "children": [child]}


@pytest.fixture
def uri(local_mlflow):
    return local_mlflow


def test_upload_is_idempotent(tmp_path, uri):
    # execute
    first = mlflow_store.upload(_record(tmp_path, "r1"))
    again = mlflow_store.upload(_record(tmp_path, "r1"))
    # assert
    assert again["reused"] and again["parent"] == first["parent"]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    assert len(runs) == 2  # one parent, one child, logged once


def test_experiment_opens_on_the_runs_table(tmp_path, uri):
    """MLflow 3's UI reads the experiment tag mlflow.experimentKind; untagged experiments
    open in the GenAI view. An experiment made before the tag existed gets it too."""
    client = MlflowClient(uri)
    old = client.create_experiment("t")  # control: created elsewhere, untagged
    assert "mlflow.experimentKind" not in client.get_experiment(old).tags
    mlflow_store.upload(_record(tmp_path, "r1"))
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"


def test_unchanged_stage_files_are_referenced_not_uploaded(tmp_path, uri):
    # setup: a first record holds the export files
    first = mlflow_store.upload(_record(tmp_path, "r1"))
    # execute: a new record (another metric) with the same export fingerprint
    second = mlflow_store.upload(_record(tmp_path, "r2", metric=3.0))
    # assert
    client = MlflowClient(uri)
    run = client.get_run(second["parent"])
    assert run.data.tags[f"{mlflow_store.REF_TAG}.export"] == f"runs:/{first['parent']}/export"
    assert f"{mlflow_store.CACHE_TAG}.export" not in run.data.tags
    assert client.list_artifacts(second["parent"]) == []
    assert cache.lookup("export", "f" * 64) == first["parent"]  # the holder stays the cache


def test_unreachable_server_keeps_the_record_pending(tmp_path, monkeypatch, uri):
    # setup
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    record = _record(tmp_path, "r3")
    # execute
    status = track.track(record, tmp_path / "track.json", tmp_path / "artifacts")
    # assert
    assert status["status"] == "pending"
    pending = list(Path(Layout(str(tmp_path / "artifacts")).pending_dir()).glob("*.json"))
    assert len(pending) == 1 and pending[0].name == "m-r3.json"
    # execute: the server is back (here: a reachable store)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    uploaded = mlflow_store.sync(tmp_path / "artifacts")
    # assert
    assert len(uploaded) == 1 and not list(pending[0].parent.glob("*.json"))


def test_runs_carry_the_real_times_of_the_work(tmp_path, uri):
    """A run's start and end are those the sidecars recorded (when the stages ran), not the
    moment of the upload; a record without them is timed at upload (control)."""
    timed = {"started_at": 1_700_000_000.25, "finished_at": 1_700_000_042.5}
    assert track._span(timed, None, {"started_at": 1_700_000_010.0,
                                        "finished_at": 1_700_000_050.0}) == [
        1_700_000_000_250, 1_700_000_050_000]
    assert track._span({"result": {}}, None) is None
    record = _record(tmp_path, "r-times")
    record["parent"]["span"] = [1_700_000_000_250, 1_700_000_042_500]
    out = mlflow_store.upload(record)
    client = MlflowClient(uri)
    parent = client.get_run(out["parent"]).info
    assert (parent.start_time, parent.end_time) == (1_700_000_000_250, 1_700_000_042_500)
    assert client.get_run(out["parent"]).data.metrics["t"] == 1.0
    child = client.get_run(out["children"]["m/fp32/p/onnxruntime"]).info
    assert child.start_time > 1_700_000_042_500  # no span: the upload's own time


def test_runs_say_where_the_work_ran(tmp_path, uri):
    """Child runs carry the build's host and Slurm job (``ran`` of its sidecar), the audit's
    and bench's hosts; the parent the export's."""
    # setup: sidecars as the runner writes them, on two nodes
    lay = Layout(str(tmp_path / "a"))
    outs = lay.model_outputs("m", ["fp32"], {"onnxruntime": ["p"]}, ["p"])
    ran = {"export": ("login1", None), "build": ("gpu7", "4242"), "audit": ("cpu3", "4243"),
           "bench": ("gpu7", "4244")}
    paths = {"export": outs["export"], "build": outs["build"][("onnxruntime", "fp32", "p")],
             "audit": outs["audit"][("onnxruntime", "fp32")],
             "bench": outs["bench"][("onnxruntime", "fp32", "p")]}
    for stage, path in paths.items():
        host, job = ran[stage]
        write_json(path, {"fingerprint": stage * 4, "tools": {}, "outputs": {},
                          "result": {"time_s": 1.0} if stage == "export" else {},
                          "ran": {"host": host, "slurm_job_id": job}})
    m = {"checkpoint": {}, "opset": 17, "precisions": ["fp32"], "backends": ["onnxruntime"],
         "task": "regression", "profiles": {"p": {}}}
    # execute
    record = track.build_record("m", m, "e", outs)
    out = mlflow_store.upload(record)
    # assert: in MLflow
    client = MlflowClient(uri)
    child = client.get_run(out["children"]["m/fp32/p/onnxruntime"]).data.tags
    assert (child["engineforge.ran.host"], child["engineforge.ran.slurm_job_id"]) == (
        "gpu7", "4242")
    assert (child["engineforge.ran.audit.host"], child["engineforge.ran.bench.host"]) == (
        "cpu3", "gpu7")
    parent = client.get_run(out["parent"]).data.tags
    assert parent["engineforge.ran.host"] == "login1"
    assert "engineforge.ran.slurm_job_id" not in parent  # not a Slurm job: no tag
