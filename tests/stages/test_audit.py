"""Audit stage: Polygraphy comparison against the PyTorch reference, verdicts, drift matrix."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from engineforge.backends import BuildRequest, get_backend
from engineforge.sidecar import read_json
from engineforge.stages import audit, export
from onnx import numpy_helper


@pytest.fixture
def exported(tiny_models, tiny_workspace):
    m = tiny_models["tinycls"]
    export.run("tinycls", m, tiny_workspace / "e/model.onnx", tiny_workspace / "e/ref.npz",
               tiny_workspace / "e/export.json", root=tiny_workspace)
    return m, tiny_workspace


def _ort_build(src, dst, tmp):
    req = BuildRequest(model="tinycls", precision="fp32", onnx_path=src, engine_path=dst,
                       work_dir=tmp, profiles=[])
    return get_backend("onnxruntime").build(req)


def _perturb(src, dst, scale):
    model = onnx.load(str(src))
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype == np.float32 and arr.ndim >= 2:
            init.CopyFrom(numpy_helper.from_array(arr * scale, init.name))
            break
    onnx.save(model, str(dst))


def test_exact_variant_passes_with_task_accuracy(exported):
    # setup
    m, tmp = exported
    _ort_build(tmp / "e/model.onnx", tmp / "b/engine.onnx", tmp)
    # execute
    side = audit.run("tinycls", m, "onnxruntime", "fp32", tmp / "b/engine.onnx",
                     tmp / "e/ref.npz", tmp / "a/fp32.json", root=tmp)
    # assert
    r = side["result"]
    assert r["status"] == "pass", r.get("failures")
    (out,) = r["outputs"].values()
    assert out["max_abs"] < 1e-4 and out["cosine"] > 0.99999 and out["top1_agreement"] == 1.0
    assert 0.0 <= out["p99_abs"] <= out["max_abs"]
    assert r["task"]["accuracy"] == r["task"]["reference_accuracy"] == pytest.approx(30 / 32)


def test_drifted_variant_fails_and_says_why(exported):
    # setup: scale the first conv's weights — a large, measurable drift
    m, tmp = exported
    _perturb(tmp / "e/model.onnx", tmp / "drift.onnx", 1.5)
    _ort_build(tmp / "drift.onnx", tmp / "b/engine.onnx", tmp)
    # execute
    side = audit.run("tinycls", m, "onnxruntime", "fp32", tmp / "b/engine.onnx",
                     tmp / "e/ref.npz", tmp / "a/fp32.json", root=tmp)
    # assert
    r = side["result"]
    assert r["status"] == "fail"
    assert any("max_abs" in f for f in r["failures"])
    (out,) = r["outputs"].values()
    assert out["max_abs"] > 1e-3


def test_unloadable_variant_is_not_runnable_result(exported):
    # setup: a bf16 Conv, which ORT's CPU provider has no kernel for
    m, tmp = exported
    model = onnx.load(str(tmp / "e/model.onnx"))
    for init in model.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init), init.name))
    bad = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Conv", ["x", "w"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.BFLOAT16, [1, 3, 8, 8])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.BFLOAT16, None)],
        [onnx.helper.make_tensor("w", onnx.TensorProto.BFLOAT16, [5, 3, 1, 1],
                                 np.ones(15, dtype=np.float32).tolist())]),
        opset_imports=[onnx.helper.make_opsetid("", 17)])
    onnx.save(bad, str(tmp / "bad.onnx"))
    build = _ort_build(tmp / "bad.onnx", tmp / "b/engine.onnx", tmp)
    # execute
    side = audit.run("tinycls", m, "onnxruntime", "bf16", tmp / "b/engine.onnx",
                     tmp / "e/ref.npz", tmp / "a/bf16.json", root=tmp)
    # assert
    assert build["status"] == "not_runnable" and "onnxruntime" in build["reason"]
    assert side["result"]["status"] == "not_runnable"
    assert side["result"]["reason"].startswith("not runnable on onnxruntime:")


def test_bf16_variant_is_audited_by_onnx_reference_when_ort_cannot_run_it(exported):
    # setup: a real bf16 variant (ModelOpt AutoCast); ORT's CPU provider has no bf16 Conv
    from engineforge.stages import precision

    m, tmp = exported
    precision.run("tinycls", m, "bf16", tmp / "e/model.onnx", tmp / "p/bf16.onnx",
                  tmp / "p/bf16.json", tmp)
    build = _ort_build(tmp / "p/bf16.onnx", tmp / "b/engine.onnx", tmp)
    # execute
    side = audit.run("tinycls", m, "onnxruntime", "bf16", tmp / "b/engine.onnx",
                     tmp / "e/ref.npz", tmp / "a/bf16.json", root=tmp)
    matrix = audit.drift_matrix("tinycls", [tmp / "a/bf16.json"], tmp / "a/drift.json",
                                tmp / "a/drift.md")
    # assert: ORT says why not; the emulated audit measures real bf16 drift
    r = side["result"]
    assert build["status"] == "not_runnable" and r["status"] == "not_runnable"
    emu = r["emulated"]
    (out,) = emu["outputs"].values()
    assert 0 < out["max_abs"] < 0.5 and out["cosine"] > 0.99
    assert emu["task"]["samples"] == 32 and emu["status"] in ("pass", "fail")
    backends = [row["backend"] for row in matrix["rows"]]
    assert backends == ["onnxruntime", "onnx-reference (emulated)"]


def test_drift_matrix_rows_and_markdown(exported):
    # setup
    m, tmp = exported
    _ort_build(tmp / "e/model.onnx", tmp / "b/engine.onnx", tmp)
    audit.run("tinycls", m, "onnxruntime", "fp32", tmp / "b/engine.onnx", tmp / "e/ref.npz",
              tmp / "a/fp32.json", root=tmp)
    _perturb(tmp / "e/model.onnx", tmp / "drift.onnx", 1.01)
    _ort_build(tmp / "drift.onnx", tmp / "b2/engine.onnx", tmp)
    audit.run("tinycls", m, "onnxruntime", "int8", tmp / "b2/engine.onnx", tmp / "e/ref.npz",
              tmp / "a/int8.json", root=tmp)
    # execute
    matrix = audit.drift_matrix("tinycls", [tmp / "a/int8.json", tmp / "a/fp32.json"],
                                tmp / "a/drift.json", tmp / "a/drift.md")
    # assert
    assert [r["precision"] for r in matrix["rows"]] == ["fp32", "int8"]
    assert matrix["rows"][1]["max_abs"] > matrix["rows"][0]["max_abs"]
    md = (tmp / "a/drift.md").read_text()
    assert "| fp32 | onnxruntime | pass |" in md and "| int8 | onnxruntime |" in md
    assert read_json(tmp / "a/drift.json") == matrix


@pytest.mark.parametrize("tol, status", [({"max_abs": 10.0}, True), ({"max_abs": 0.0}, False),
                                         ({"cosine_min": 1.01}, False)])
def test_verdict_limits(tol, status):
    metrics = {"outputs": {"y": {"max_abs": 0.5, "cosine": 0.99, "top1_agreement": 1.0}}}
    assert audit.verdict(metrics, tol, "classification")[0] is status
