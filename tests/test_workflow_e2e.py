"""End to end: the Snakemake workflow on tiny models, as `make run` runs it.

TensorRT-RTX engines are really built (on CPU); trtexec and the full TensorRT
are not installed here and must be reported as skipped.
"""

from __future__ import annotations

import json

import pytest
from conftest import tiny_raw_config, write_tiny_workspace
from workflow_helpers import planned_jobs, snakemake, write_config

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    ws = tmp_path_factory.mktemp("e2e")
    write_tiny_workspace(ws)
    raw = tiny_raw_config(precisions=("fp32", "fp16", "int8"),
                          backends=("onnxruntime", "tensorrt-rtx", "trtexec", "tensorrt"))
    write_config(ws, raw)
    proc = snakemake(ws)
    return ws, raw, proc


def test_every_stage_output_exists(finished):
    ws, raw, proc = finished
    a = ws / "artifacts"
    for model, m in raw["models"].items():
        assert (a / model / "export/model.onnx").stat().st_size > 0
        assert (a / model / "simplify/model.onnx").stat().st_size > 0
        for p in m.get("precisions", raw["defaults"]["precisions"]):
            assert (a / model / f"precision/{p}/model.onnx").exists()
            assert (a / model / f"audit/onnxruntime/{p}.json").exists()
            for prof in m["profiles"]:
                assert (a / model / f"build/onnxruntime/{p}/{prof}/engine.onnx").exists()
                assert (a / model / f"build/tensorrt-rtx/{p}/{prof}/engine.plan").stat(
                ).st_size > 1000
                assert (a / model / f"bench/onnxruntime/{p}/{prof}.json").exists()
            assert not (a / model / "build/trtexec").exists()
        assert (a / model / "audit/drift.md").exists()
        assert json.loads((a / model / "track.json").read_text())["status"] == "logged"


def test_summary_reports_results_and_skipped_backends(finished):
    ws, _, proc = finished
    summary = (ws / "artifacts/summary.md").read_text()
    assert "| tinycls | int8 | onnxruntime |" in summary
    assert "trtexec: skipped: trtexec not found" in summary
    assert "tensorrt: skipped:" in summary
    assert "not runnable on tensorrt-rtx" in summary
    assert "# engineforge summary" in proc.stdout  # printed at the end of the run


def test_audit_and_accuracy_of_fp32(finished):
    ws, _, _ = finished
    drift = json.loads((ws / "artifacts/tinycls/audit/drift.json").read_text())
    fp32 = next(r for r in drift["rows"] if r["precision"] == "fp32"
                and r["backend"] == "onnxruntime")
    assert fp32["status"] == "pass" and fp32["accuracy"] == fp32["reference_accuracy"]


def test_mlflow_has_parent_and_child_runs(finished):
    ws, raw, _ = finished
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{ws}/mlflow.db")
    exp = client.get_experiment_by_name(raw["experiment"])
    runs = client.search_runs([exp.experiment_id], max_results=500)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert {r.info.run_name for r in parents} == {"tinycls", "tinyfcn"}
    # tinycls: 3 precisions x 1 profile x 2 backends; tinyfcn: 3 x 2 x 2
    assert len(children) == 6 + 12
    child = next(r for r in children if r.info.run_name == "tinycls/fp32/b1-8/onnxruntime")
    assert child.data.metrics["task.accuracy"] > 0.9
    assert "latency.opt.p50_ms" in child.data.metrics
    assert child.data.tags["engineforge.audit"] == "pass"
    assert child.data.params["precision"] == "fp32"
    assert {a.path for a in client.list_artifacts(child.info.run_id)} == {
        "audit", "bench", "build"}
    arts = {a.path for a in client.list_artifacts(child.info.run_id, "build")}
    assert {"build/build.json", "build/engine.onnx"} <= arts
    parent = next(r for r in parents if r.info.run_name == "tinycls")
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "export", "simplify", "precision", "audit"}


def test_rerun_and_touch_do_nothing(finished):
    ws, _, _ = finished
    assert planned_jobs(ws) == {}
    for f in ["tinycls.pt", "calib.npz", "eval.npz", "config.yaml"]:
        (ws / f).touch()
    assert planned_jobs(ws) == {}


def test_bad_config_stops_before_any_job_with_one_line(tmp_path):
    # setup
    write_tiny_workspace(tmp_path)
    raw = tiny_raw_config()
    raw["models"]["tinycls"]["precisions"] = ["fp32", "fp4"]
    write_config(tmp_path, raw)
    # execute
    proc = snakemake(tmp_path, check=False)
    # assert
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("engineforge:")]
    assert len(lines) == 1
    assert "key=models.tinycls.precisions.1" in lines[0] and "Allowed:" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "artifacts").exists()


def test_one_failing_model_does_not_stop_the_others(tmp_path):
    # setup: a state_dict that does not fit its arch
    write_tiny_workspace(tmp_path)
    import torch

    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "tinycls.pt")
    write_config(tmp_path, tiny_raw_config())
    # execute
    proc = snakemake(tmp_path, check=False)
    # assert
    assert proc.returncode != 0
    assert (tmp_path / "artifacts/tinyfcn/track.json").exists()  # the other model finished
    assert "model=tinycls stage=export key=models.tinycls.checkpoint.path" in proc.stderr
    assert not (tmp_path / "artifacts/tinycls/export/model.onnx").exists()
