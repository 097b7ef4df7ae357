"""Every artifact path in one place (engineforge/layout.py): templates keep the wildcards left
out, concrete calls give one file, engines are named by their backend, and ``model_outputs``
lists exactly the outputs a model's configuration produces."""

from __future__ import annotations

import pytest
from engineforge.layout import ALL_PROFILES, REPORT_FILES, Layout, files_of


def test_default_root_and_templates_keep_every_wildcard():
    # setup
    lay = Layout()
    # execute
    got = {"model": lay.model(), "export": lay.export("model.onnx"),
           "simplify": lay.simplify("simplify.json"), "profile_check": lay.profile_check(),
           "precision": lay.precision("precision.json"),
           "quantized": lay.quantized("model.onnx", "onnxruntime"),
           "build_dir": lay.build_dir("trtexec"), "build": lay.build(),
           "audit": lay.audit(), "localise": lay.localise(), "drift": lay.drift("md"),
           "gate": lay.gate(), "gate_ok": lay.gate("gate.ok"), "bench": lay.bench(),
           "bench_work": lay.bench_work(), "baseline": lay.baseline(),
           "report": lay.report("latency.png"), "log": lay.log("export"),
           "track": lay.track()}
    # assert
    assert got == {
        "model": "artifacts/{model}",
        "export": "artifacts/{model}/export/model.onnx",
        "simplify": "artifacts/{model}/simplify/simplify.json",
        "profile_check": "artifacts/{model}/export/profiles/{profile}.json",
        "precision": "artifacts/{model}/precision/{precision}/precision.json",
        "quantized": "artifacts/{model}/precision/{precision}/onnxruntime/model.onnx",
        "build_dir": "artifacts/{model}/build/trtexec/{precision}/{profile}",
        "build": "artifacts/{model}/build/{backend}/{precision}/{profile}/build.json",
        "audit": "artifacts/{model}/audit/{backend}/{precision}.json",
        "localise": "artifacts/{model}/audit/localise/{precision}.json",
        "drift": "artifacts/{model}/audit/drift.md",
        "gate": "artifacts/{model}/audit/gate.json",
        "gate_ok": "artifacts/{model}/audit/gate.ok",
        "bench": "artifacts/{model}/bench/{backend}/{precision}/{profile}.json",
        "bench_work": "artifacts/{model}/bench/{backend}/{precision}/{profile}",
        "baseline": "artifacts/{model}/bench/pytorch/{profile}.json",
        "report": "artifacts/{model}/report/latency.png",
        "log": "artifacts/{model}/logs/export.log",
        "track": "artifacts/{model}/track.json",
    }


def test_run_wide_paths_sit_under_the_root():
    # setup
    lay = Layout("/data/out")
    # execute
    got = [lay.timing_cache_dir(), lay.report_html(), lay.summary("csv"), lay.failures_dir(),
           lay.pending_dir()]
    # assert
    assert got == ["/data/out/_timing_cache", "/data/out/report.html", "/data/out/summary.csv",
                   "/data/out/_failures", "/data/out/_tracking/pending"]


def test_concrete_arguments_fill_the_wildcards():
    # setup
    lay = Layout("out")
    # execute
    got = [lay.build("tensorrt", "resnet", "int8", "b1-8"),
           lay.audit("resnet", "tensorrt", "int8"),
           lay.bench("resnet", "tensorrt", "int8", "b1-8"),
           lay.precision("model.onnx", "resnet", "fp16-repaired"),
           lay.quantized("precision.json", "onnxruntime", "resnet", "int8"),
           lay.profile_check("resnet", "b1-8"), lay.baseline("resnet", "b1-8")]
    # assert
    assert got == ["out/resnet/build/tensorrt/int8/b1-8/build.json",
                   "out/resnet/audit/tensorrt/int8.json",
                   "out/resnet/bench/tensorrt/int8/b1-8.json",
                   "out/resnet/precision/fp16-repaired/model.onnx",
                   "out/resnet/precision/int8/onnxruntime/precision.json",
                   "out/resnet/export/profiles/b1-8.json",
                   "out/resnet/bench/pytorch/b1-8.json"]


@pytest.mark.parametrize("backend,artifact", [("onnxruntime", "engine.onnx"),
                                              ("torch-inductor", "package.pt2"),
                                              ("trtexec", "engine.plan"),
                                              ("tensorrt", "engine.plan")])
def test_an_engine_is_named_by_its_backend(backend, artifact):
    # execute
    path = Layout("a").engine(backend, "m", "fp16", "p")
    # assert
    assert path == f"a/m/build/{backend}/fp16/p/{artifact}"


def test_an_unknown_backend_is_a_key_error_naming_the_registered_ones():
    # execute
    with pytest.raises(KeyError) as err:
        Layout().engine("openvino", "m", "fp32", "p")
    # assert
    assert err.value.args[0] == ("unknown backend 'openvino'; registered: ['onnxruntime', "
                                 "'tensorrt-rtx', 'tensorrt', 'trtexec', 'torch-inductor']")


def test_layout_is_immutable():
    # setup
    lay = Layout("a")
    # execute / assert
    with pytest.raises(AttributeError):
        lay.root = "b"


# -- model_outputs ------------------------------------------------------------------------------
def test_model_outputs_for_onnxruntime_with_int8_and_a_multi_profile_engine():
    """int8 builds from the backend's own quantizer's graph; fp32 has no localisation; the
    all-profiles engine is built and audited but not benched."""
    # execute
    t = Layout("a").model_outputs("m", ["fp32", "int8"], {"onnxruntime": ["p1", ALL_PROFILES]},
                                  ["p1"])
    # assert
    assert (t["export"], t["simplify"]) == ("a/m/export/export.json",
                                            "a/m/simplify/simplify.json")
    assert (t["drift"], t["drift_md"]) == ("a/m/audit/drift.json", "a/m/audit/drift.md")
    assert t["precision"] == {"fp32": "a/m/precision/fp32/precision.json",
                              "int8": "a/m/precision/int8/precision.json",
                              "int8/onnxruntime": "a/m/precision/int8/onnxruntime/precision.json"}
    assert t["localise"] == {"int8": "a/m/audit/localise/int8.json"}
    assert t["audit"] == {("onnxruntime", "fp32"): "a/m/audit/onnxruntime/fp32.json",
                          ("onnxruntime", "int8"): "a/m/audit/onnxruntime/int8.json"}
    assert sorted(t["build"]) == sorted(t["engine"]) == [
        ("onnxruntime", p, prof) for p in ("fp32", "int8") for prof in ("all", "p1")]
    assert t["engine"][("onnxruntime", "int8", "all")] == (
        "a/m/build/onnxruntime/int8/all/engine.onnx")
    assert t["bench"] == {("onnxruntime", "fp32", "p1"): "a/m/bench/onnxruntime/fp32/p1.json",
                          ("onnxruntime", "int8", "p1"): "a/m/bench/onnxruntime/int8/p1.json"}
    assert t["baseline"] == {"p1": "a/m/bench/pytorch/p1.json"}
    assert t["report"] == {name: f"a/m/report/{name}" for name in REPORT_FILES}
    assert "gate" not in t


def test_model_outputs_skip_precisions_a_backend_cannot_build():
    """torch-inductor builds fp32/fp16/bf16 only: its int8 has no audit, build or bench, a
    repaired fp16 does (by its base precision); trtexec has no quantizer of its own."""
    # execute
    t = Layout("a").model_outputs("m", ["fp16-repaired", "int8"],
                                  {"torch-inductor": ["p"], "trtexec": ["p"]}, ["p"], gate=True)
    # assert
    assert sorted(t["audit"]) == [("torch-inductor", "fp16-repaired"),
                                  ("trtexec", "fp16-repaired"), ("trtexec", "int8")]
    assert sorted(t["bench"]) == sorted(t["build"]) == [
        ("torch-inductor", "fp16-repaired", "p"), ("trtexec", "fp16-repaired", "p"),
        ("trtexec", "int8", "p")]
    assert sorted(t["precision"]) == ["fp16-repaired", "int8"]  # no backend quantizer graphs
    assert t["gate"] == "a/m/audit/gate.json"


def test_files_of_lists_every_leaf_of_model_outputs():
    # setup
    t = Layout("a").model_outputs("m", ["fp32"], {"onnxruntime": ["p"]}, ["p"], gate=True)
    # execute
    files = files_of(t)
    # assert: export, simplify, drift x2, precision, audit, build, engine, bench, baseline,
    # report files, gate
    assert len(files) == 10 + len(REPORT_FILES) + 1
    assert set(files) == {
        "a/m/export/export.json", "a/m/simplify/simplify.json", "a/m/audit/drift.json",
        "a/m/audit/drift.md", "a/m/precision/fp32/precision.json",
        "a/m/audit/onnxruntime/fp32.json", "a/m/build/onnxruntime/fp32/p/build.json",
        "a/m/build/onnxruntime/fp32/p/engine.onnx", "a/m/bench/onnxruntime/fp32/p.json",
        "a/m/bench/pytorch/p.json", "a/m/audit/gate.json",
        *(f"a/m/report/{name}" for name in REPORT_FILES)}


def test_files_of_a_single_path_and_an_empty_dict():
    # execute / assert
    assert files_of("a/b.json") == ["a/b.json"]
    assert files_of({"x": {}, "y": {"z": "c"}}) == ["c"]
