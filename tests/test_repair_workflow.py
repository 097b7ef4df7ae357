"""End to end with ``repair`` on: the real workflow on a tiny model whose fp16 variant drifts
(tests/fixtures/driftnets.py:Cancellation), onnxruntime only. The fp16 audit fails, the
localise job names the Sub, and fp16-repaired is built, audited, benched, tracked and
summarised beside fp16."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES
from engineforge.layout import Layout
from engineforge.sidecar import read_json
from workflow_helpers import Page, mlflow_client, mlflow_runs, snakemake, write_config

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
        bench = read_json(L.bench("cancel", "onnxruntime", v, prof))["result"]
        assert (bench["status"], bench["precision"], bench["profile"]) == ("ok", v, prof)
        # timed at the profile's three shapes with the config's counts (3 runs after 1)
        assert {w: (p["shapes"], p["batch"], p["iterations"], p["warmup"])
                for w, p in bench["points"].items()} == {
            "min": ({"x": [1, 3, 8, 8]}, 1, 3, 1), "opt": ({"x": [4, 3, 8, 8]}, 4, 3, 1),
            "max": ({"x": [8, 3, 8, 8]}, 8, 3, 1)}
        assert all(0 < p["min_ms"] <= p["p50_ms"] <= p["p99_ms"]
                   for p in bench["points"].values())
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
    client = mlflow_client(ws)
    runs = {r.info.run_name: r for r in mlflow_runs(ws, "engineforge")}
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


def test_report_of_the_real_repaired_run_shows_the_repair(finished):
    """report.html of the run itself (not fixture JSON): the localisation, the repaired
    variant's section with its verdicts side by side and its latency cost, and its heatmap
    row."""
    from engineforge.stages import report

    ws = finished
    L = Layout(str(ws / "artifacts"))
    loc = read_json(L.localise("cancel", "fp16"))["result"]
    rep = read_json(L.precision("precision.json", "cancel", "fp16-repaired"))["result"][
        "extra"]["repair"]
    for path in (L.report("report.html", "cancel"), L.report_html()):
        page = Page(Path(path).read_text())
        text = page.words()
        assert "none (no variant was localised)" not in text, path
        assert "none (no repaired variant)" not in text, path
        assert "fp16 : localised" in text, path
        assert "not localised (every audit passed): fp16-repaired" in text, path
        assert f"first {loc['first']['node']} Sub" in text, path
        assert "fp16-repaired (from fp16): repair repaired" in text, path
        assert ", ".join(rep["excluded_nodes"]) in text, path
        assert "onnxruntime fail pass" in text, path  # plain vs repaired verdicts
        assert re.search(r"\d+\.\d{3} → \d+\.\d{3} [+-]\d+\.\d%", text), path  # latency
        assert "fp16 / onnxruntime fail " in text, path  # why the plain variant failed
        assert "cancel drift heatmap" in {i.get("alt") for i in page.imgs()}, path
    settings = report.Settings(precisions=["fp32", "fp16", "fp16-repaired"],
                               builds={"onnxruntime": ["b1-8"]}, profiles=["b1-8"])
    rows = report.gather(L, "cancel", settings)["rows"]  # the heatmap's rows
    assert [(r["precision"], r["status"]) for r in rows] == [
        ("fp32", "pass"), ("fp16", "fail"), ("fp16-repaired", "pass")]


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
