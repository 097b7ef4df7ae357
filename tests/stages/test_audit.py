"""Audit stage: Polygraphy comparison against the PyTorch reference, verdicts, drift matrix.

Every stage runs through the real runner (``conftest.run_stage``): named inputs and outputs
as the rules declare them, the stage's own settings slice, the crash-isolated worker and the
sidecar whose ``result`` is the typed :class:`~engineforge.results.AuditResult`. Engines are
built by the build stage (onnxruntime); the drift matrix is its own stage (``drift``).
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import run_stage, stage_job, tiny_raw_config, write_tiny_workspace
from engineforge import config
from engineforge.results import AuditResult, BuildResult
from engineforge.runner import run_job
from engineforge.settings import Tolerance
from engineforge.sidecar import read_json
from engineforge.stages import audit, drift
from onnx import numpy_helper

MODEL, PROFILE = "tinycls", "b1-8"


@pytest.fixture(autouse=True)
def _no_mlflow_cache(monkeypatch):
    """Stage tests never consult (or create) an MLflow cache."""
    monkeypatch.setenv("ENGINEFORGE_CACHE", "0")


def _export_inputs(m: dict) -> dict:
    """The export rule's named inputs: checkpoint, arch source, evaluation, calibration."""
    return {"checkpoint": m["checkpoint"]["path"], "arch_source": "tinynets.py",
            "evaluation": m["evaluation"]["path"], "calibration": m["calibration"]["path"]}


@pytest.fixture(scope="module")
def _export_once(tmp_path_factory) -> Path:
    """tinycls exported once per module by the export stage (e/model.onnx, e/reference.npz)."""
    root = tmp_path_factory.mktemp("export")
    write_tiny_workspace(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("ENGINEFORGE_CACHE", "0")
        models = config.resolve(tiny_raw_config(), root)["models"]
        run_stage("export", models, MODEL, _export_inputs(models[MODEL]),
                  {"onnx": root / "e/model.onnx", "reference": root / "e/reference.npz",
                   "sidecar": root / "e/export.json"}, root)
    return root / "e"


@pytest.fixture
def exported(tiny_models, tiny_workspace, _export_once):
    """The export's outputs copied into this test's workspace (``e/``)."""
    shutil.copytree(_export_once, tiny_workspace / "e")
    return tiny_models, tiny_workspace


def _build(models: dict, tmp: Path, src: Path, out: str, precision: str = "fp32") -> dict:
    """The build stage (onnxruntime) on ``src``; returns its sidecar."""
    return run_stage("build", models, MODEL, {"onnx": src},
                     {"engine": tmp / out / "engine.onnx", "sidecar": tmp / out / "build.json"},
                     tmp, backend="onnxruntime", precision=precision, profile=PROFILE)


def _audit(models: dict, tmp: Path, engine: Path, precision: str) -> dict:
    """The audit stage with the audit rule's inputs; returns its sidecar."""
    return run_stage("audit", models, MODEL,
                     {"engine": engine, "reference": tmp / "e/reference.npz",
                      "evaluation": tmp / "eval.npz"},
                     {"sidecar": tmp / "a" / f"{precision}.json"}, tmp,
                     backend="onnxruntime", precision=precision)


def _drift(models: dict, tmp: Path, audits: list[Path]) -> dict:
    """The drift stage (audit sidecars as unnamed inputs, like the rule's); its JSON."""
    job = stage_job("drift", models, MODEL, {},
                    {"json": tmp / "a/drift.json", "md": tmp / "a/drift.md"}, tmp)
    job = replace(job, extra_inputs=[Path(p) for p in audits])
    run_job(job)
    return read_json(tmp / "a/drift.json")


def _perturb(src: Path, dst: Path, scale: float) -> Path:
    model = onnx.load(str(src))
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype == np.float32 and arr.ndim >= 2:
            init.CopyFrom(numpy_helper.from_array(arr * scale, init.name))
            break
    onnx.save(model, str(dst))
    return dst


def test_settings_slice_from_the_model_config(tiny_models):
    # execute
    cls = audit.settings(tiny_models["tinycls"], {"backend": "onnxruntime", "precision": "fp16"})
    fcn = audit.settings(tiny_models["tinyfcn"], {"backend": "onnxruntime", "precision": "fp32"})
    # assert: labelled classifier -> task accuracy on the first profile's max batch
    assert cls.backend == "onnxruntime" and cls.precision == "fp16"
    assert cls.task == "classification" and cls.labels == "labels" and cls.eval_batch == 8
    assert cls.tolerance == Tolerance(**tiny_models["tinycls"]["tolerances"]["fp16"])
    assert fcn.task == "regression" and fcn.labels is None and fcn.eval_batch == 2


def test_exact_variant_passes_with_task_accuracy(exported):
    # setup
    models, tmp = exported
    _build(models, tmp, tmp / "e/model.onnx", "b")
    # execute
    side = _audit(models, tmp, tmp / "b/engine.onnx", "fp32")
    # assert
    r = side["result"]
    typed = AuditResult.model_validate(r)
    assert typed.backend == "onnxruntime" and typed.precision == "fp32"
    assert typed.tolerance == models[MODEL]["tolerances"]["fp32"]
    assert r["status"] == "pass", r.get("failures")
    (out,) = r["outputs"].values()
    assert out["max_abs"] < 1e-4 and out["cosine"] > 0.99999 and out["top1_agreement"] == 1.0
    assert 0.0 <= out["p99_abs"] <= out["max_abs"]
    assert r["task"]["accuracy"] == r["task"]["reference_accuracy"] == pytest.approx(30 / 32)
    assert r["task"]["samples"] == 32 and r["emulated"] is None
    # the evaluation data is a named input: its content is part of the fingerprint
    assert set(side["inputs"]) == {"engine", "reference", "evaluation"}
    assert side["stage"] == "audit" and side["config"]["labels"] == "labels"


def test_drifted_variant_fails_and_says_why(exported):
    # setup: scale the first conv's weights — a large, measurable drift
    models, tmp = exported
    _perturb(tmp / "e/model.onnx", tmp / "drift.onnx", 1.5)
    _build(models, tmp, tmp / "drift.onnx", "b")
    # execute
    side = _audit(models, tmp, tmp / "b/engine.onnx", "fp32")
    # assert
    r = side["result"]
    assert r["status"] == "fail"
    assert any("max_abs" in f for f in r["failures"])
    (out,) = r["outputs"].values()
    assert out["max_abs"] > 1e-3


def test_unloadable_variant_is_not_runnable_result(exported):
    # setup: a bf16 Conv, which ORT's CPU provider has no kernel for
    models, tmp = exported
    bad = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Conv", ["x", "w"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.BFLOAT16, [1, 3, 8, 8])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.BFLOAT16, None)],
        [onnx.helper.make_tensor("w", onnx.TensorProto.BFLOAT16, [5, 3, 1, 1],
                                 np.ones(15, dtype=np.float32).tolist())]),
        opset_imports=[onnx.helper.make_opsetid("", 17)])
    onnx.save(bad, str(tmp / "bad.onnx"))
    build = _build(models, tmp, tmp / "bad.onnx", "b", "bf16")["result"]
    # execute
    side = _audit(models, tmp, tmp / "b/engine.onnx", "bf16")
    # assert
    assert BuildResult.model_validate(build).status == "not_runnable"
    assert "onnxruntime" in build["reason"]
    assert side["result"]["status"] == "not_runnable"
    assert side["result"]["reason"].startswith("not runnable on onnxruntime:")
    AuditResult.model_validate(side["result"])


def test_bf16_variant_is_audited_by_onnx_reference_when_ort_cannot_run_it(exported):
    # setup: a real bf16 variant (ModelOpt AutoCast); ORT's CPU provider has no bf16 Conv
    models, tmp = exported
    run_stage("precision", models, MODEL, {"onnx": tmp / "e/model.onnx"},
              {"onnx": tmp / "p/model.onnx", "sidecar": tmp / "p/precision.json"}, tmp,
              precision="bf16")
    build = _build(models, tmp, tmp / "p/model.onnx", "b", "bf16")["result"]
    # execute
    side = _audit(models, tmp, tmp / "b/engine.onnx", "bf16")
    matrix = _drift(models, tmp, [tmp / "a/bf16.json"])
    # assert: ORT says why not; the emulated audit measures real bf16 drift
    r = side["result"]
    assert build["status"] == "not_runnable" and r["status"] == "not_runnable"
    emu = r["emulated"]
    (out,) = emu["outputs"].values()
    assert 0 < out["max_abs"] < 0.5 and out["cosine"] > 0.99
    assert emu["task"]["samples"] == 32 and emu["status"] in ("pass", "fail")
    backends = [row["backend"] for row in matrix["rows"]]
    assert backends == ["onnxruntime", "onnx-reference (emulated)"]
    assert backends[1] == drift.EMULATED


def test_drift_matrix_rows_and_markdown(exported):
    # setup
    models, tmp = exported
    _build(models, tmp, tmp / "e/model.onnx", "b")
    _audit(models, tmp, tmp / "b/engine.onnx", "fp32")
    _perturb(tmp / "e/model.onnx", tmp / "drift.onnx", 1.01)
    _build(models, tmp, tmp / "drift.onnx", "b2", "int8")
    _audit(models, tmp, tmp / "b2/engine.onnx", "int8")
    audits = [tmp / "a/int8.json", tmp / "a/fp32.json"]
    # execute
    matrix = _drift(models, tmp, audits)
    # assert
    assert [r["precision"] for r in matrix["rows"]] == ["fp32", "int8"]
    assert matrix["rows"][1]["max_abs"] > matrix["rows"][0]["max_abs"]
    assert matrix["model"] == MODEL and matrix["reference"] == "pytorch"
    md = (tmp / "a/drift.md").read_text()
    assert "| fp32 | onnxruntime | pass |" in md and "| int8 | onnxruntime |" in md
    # the stage's output is exactly what its functions give
    assert matrix["rows"] == drift.rows_of(audits)
    assert md == drift.markdown(MODEL, matrix["rows"])
    assert not list((tmp / "a").glob(".staging-*"))


def test_drift_markdown_numbers_not_runnable_reasons():
    # setup
    rows = [{"precision": "fp32", "backend": "onnxruntime", "status": "pass", "reason": None,
             "max_abs": 1e-6, "cosine": 0.9999991},
            {"precision": "fp16", "backend": "tensorrt-rtx", "status": "not_runnable",
             "reason": "not runnable on tensorrt-rtx: no GPU"},
            {"precision": "bf16", "backend": "tensorrt-rtx", "status": "not_runnable",
             "reason": "not runnable on tensorrt-rtx: no GPU"}]
    # execute
    md = drift.markdown("m", rows)
    # assert
    assert "| fp32 | onnxruntime | pass | 1e-06 | — | — | 0.999999 |" in md
    assert md.count("not runnable [1]") == 2 and "1. not runnable on tensorrt-rtx: no GPU" in md


@pytest.mark.parametrize("tol, status", [
    (Tolerance(max_abs=10.0), True), (Tolerance(max_abs=0.0), False),
    (Tolerance(max_abs=10.0, cosine_min=0.999), False),
    (Tolerance(max_abs=10.0, top1_min=1.0), True)])
def test_verdict_limits(tol, status):
    metrics = {"outputs": {"y": {"max_abs": 0.5, "cosine": 0.99, "top1_agreement": 1.0}}}
    passed, failures = audit.verdict(metrics, tol, "classification")
    assert passed is status and bool(failures) is not status


def test_verdict_lists_every_violated_limit():
    metrics = {"outputs": {"y": {"max_abs": 0.5, "cosine": 0.9, "top1_agreement": 0.5}},
               "task": {"accuracy_drop": 0.1}}
    passed, failures = audit.verdict(metrics, Tolerance(max_abs=0.1), "classification")
    assert passed is False and len(failures) == 4
    assert failures[0].startswith("y: max_abs 0.5 > 0.1") and "accuracy drop" in failures[3]
    # top-1 agreement is a classification limit only
    assert audit.verdict(metrics, Tolerance(max_abs=1, cosine_min=0, accuracy_drop_max=1),
                         "regression") == (True, [])
