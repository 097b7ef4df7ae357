"""End to end with ``repair`` on: the real workflow on a tiny model whose fp16 variant drifts
(tests/fixtures/driftnets.py:Cancellation), onnxruntime only. The fp16 audit fails, the
localise job names the Sub, and fp16-repaired is built, audited, benched, tracked and
summarised beside fp16."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import FIXTURES
from engineforge.layout import Layout
from engineforge.sidecar import read_json
from workflow_helpers import snakemake, write_config

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    ws = tmp_path_factory.mktemp("repair-e2e")
    shutil.copy(FIXTURES / "driftnets.py", ws / "driftnets.py")
    raw = {"defaults": {"precisions": ["fp32", "fp16"], "backends": ["onnxruntime"],
                        "export": {"exporter": "torchscript"}, "audit": {"samples": 8},
                        "bench": {"warmup": 1, "iterations": 3, "threads": 1},
                        "repair": True},
           "models": {"cancel": {
               "checkpoint": {"kind": "state_dict", "arch": "driftnets:Cancellation"},
               "inputs": {"x": {"shape": ["batch", 3, 8, 8]}},
               "profiles": {"b1-8": {"x": {"min": [1, 3, 8, 8], "opt": [4, 3, 8, 8],
                                           "max": [8, 3, 8, 8]}}}}}}
    write_config(ws, raw)
    snakemake(ws)
    return ws


def test_repaired_variant_is_built_audited_benched_and_tracked(finished):
    ws = finished
    L = Layout(str(ws / "artifacts"))
    prof = "b1-8"
    for v in ("fp16", "fp16-repaired"):
        assert read_json(L.precision("precision.json", "cancel", v))["result"]["precision"] == v
        assert read_json(L.build("onnxruntime", "cancel", v, prof))["result"]["status"] == "ok"
        assert read_json(L.bench("cancel", "onnxruntime", v, prof))["result"]["points"]
    audit = lambda v: read_json(L.audit("cancel", "onnxruntime", v))["result"]["status"]
    assert (audit("fp16"), audit("fp16-repaired")) == ("fail", "pass")
    loc = read_json(L.localise("cancel", "fp16"))["result"]
    assert loc["status"] == "localised" and loc["first"]["op_type"] == "Sub"
    assert read_json(L.localise("cancel", "fp16-repaired"))["result"]["status"] == "passes"
    rep = read_json(L.precision("precision.json", "cancel", "fp16-repaired"))["result"]
    assert rep["extra"]["repair"]["status"] == "repaired"
    assert loc["first"]["node"] in rep["extra"]["repair"]["excluded_nodes"]
    rows = {r["precision"]: r for r in read_json(L.drift("json", "cancel"))["rows"]}
    assert rows["fp16-repaired"]["status"] == "pass" and rows["fp16"]["status"] == "fail"
    # MLflow: a child run of the repaired engine
    track = read_json(L.track("cancel"))
    assert track["status"] == "logged"
    assert any("/fp16-repaired/" in name for name in track["children"])


def test_summary_shows_the_localisation_and_the_trade_off(finished):
    ws = finished
    summary = read_json(ws / "artifacts/summary.json")
    assert {(r["precision"], r["audit"]) for r in summary["rows"]} >= {
        ("fp16", "fail"), ("fp16-repaired", "pass")}
    (loc,) = summary["localisations"]
    assert (loc["precision"], loc["first"]["op_type"]) == ("fp16", "Sub")
    (rep,) = summary["repairs"]
    assert rep["precision"] == "fp16-repaired" and rep["status"] == "repaired"
    ort = rep["backends"]["onnxruntime"]
    assert (ort["plain"]["audit"], ort["repaired"]["audit"]) == ("fail", "pass")
    assert ort["repaired"]["cosine"] > ort["plain"]["cosine"]
    lat = ort["latency"]["b1-8"]
    assert lat["plain_p50_ms"] > 0 and lat["repaired_p50_ms"] > 0
    assert lat["plain_engine_mib"] > 0 and lat["repaired_engine_mib"] > 0
    md = (ws / "artifacts/summary.md").read_text()
    assert "Where the drift enters" in md and f"`{loc['first']['node']}` (Sub" in md
    assert "Repair cancel fp16 -> fp16-repaired: repaired" in md


def test_mlflow_records_the_localisation_and_the_repair(finished):
    ws = finished
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{ws}/mlflow.db")
    exp = client.get_experiment_by_name("engineforge")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    parent = runs["cancel"]
    assert parent.data.tags["engineforge.localise.fp16"] == "localised"
    assert parent.data.tags["engineforge.localise.fp16.first"].endswith("(Sub)")
    assert parent.data.tags["engineforge.localise.fp16-repaired"] == "passes"
    assert parent.data.metrics["localise.fp16.first_drop_db"] > 30
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "audit/localise")} == {
        "audit/localise/fp16.json", "audit/localise/fp16-repaired.json"}
    child = runs["cancel/fp16-repaired/b1-8/onnxruntime"]
    assert child.data.tags["engineforge.repair"] == "repaired"
    assert child.data.tags["engineforge.audit"] == "pass"
    assert "/Sub" in child.data.params["repair.excluded_nodes"]
    # the plain variant's child has no repair record
    assert "engineforge.repair" not in runs["cancel/fp16/b1-8/onnxruntime"].data.tags


def test_a_repaired_variant_is_releasable_with_its_repair_record(finished, tmp_path):
    from engineforge import release

    ws = finished
    res = release.release("0.1.0", config_path=ws / "config.yaml", out=tmp_path,
                          patterns=["cancel/fp16-repaired"], say=lambda _: None,
                          register_models=False)
    (entry,) = res["manifest"]["engines"]
    assert entry["name"] == "cancel/fp16-repaired/b1-8/onnxruntime"
    assert entry["audit"]["verdict"] == "pass"
    assert entry["repair"]["status"] == "repaired" and entry["repair"]["from"] == "fp16"
    assert "/Sub" in entry["repair"]["excluded_nodes"]
    assert entry["sidecars"]["localise"] == "cancel/audit/localise/fp16-repaired.json"


def test_onnxruntime_int8_repaired_builds_from_ort_graph_of_the_repair_record(tmp_path):
    """The DAG (dry run): onnxruntime's int8-repaired engine is built from ORT's quantizer's
    graph, made from the fp32 ONNX and the repair record; tensorrt-rtx's from ModelOpt's."""
    shutil.copy(FIXTURES / "driftnets.py", tmp_path / "driftnets.py")
    np.savez(tmp_path / "calib.npz",
             x=np.random.default_rng(0).random((8, 3, 8, 8), dtype=np.float32))
    write_config(tmp_path, {
        "defaults": {"precisions": ["fp32", "int8"], "backends": ["onnxruntime", "tensorrt-rtx"],
                     "repair": {"precisions": ["int8"]}},
        "models": {"outl": {
            "checkpoint": {"kind": "state_dict", "arch": "driftnets:Outliers"},
            "inputs": {"x": {"shape": ["batch", 3, 8, 8]}}, "calibration": {"path": "calib.npz"},
            "profiles": {"b1-8": {"x": {"min": [1, 3, 8, 8], "opt": [4, 3, 8, 8],
                                        "max": [8, 3, 8, 8]}}}}}})
    text = snakemake(tmp_path, "--dry-run").stdout
    jobs = {}  # (rule, first output) -> input line
    for block in text.split("rule ")[1:]:
        lines = {k.strip(): v.strip() for k, _, v in
                 (line.partition(": ") for line in block.splitlines()[1:]) if v}
        if "output" in lines:
            jobs[(block.split(":")[0], lines["output"].split(",")[0])] = lines.get("input", "")
    L = Layout("artifacts")
    ort_graph = L.quantized("model.onnx", "onnxruntime", "outl", "int8-repaired")
    assert ort_graph in jobs[("build_onnxruntime",
                              L.engine("onnxruntime", "outl", "int8-repaired", "b1-8"))]
    assert jobs[("ort_quantize", ort_graph)].split(", ") == [
        "calib.npz", L.precision("precision.json", "outl", "int8-repaired"),
        L.simplify("model.onnx", "outl")]
    # the TensorRT backends keep ModelOpt's repaired graph (the control)
    assert L.precision("model.onnx", "outl", "int8-repaired") in jobs[(
        "build_tensorrt_rtx", L.engine("tensorrt-rtx", "outl", "int8-repaired", "b1-8"))]
