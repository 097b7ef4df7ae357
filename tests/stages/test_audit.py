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
from engineforge.runner import StageFailed, run_job
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
    # assert: labelled classifier; batches of audit.samples (8 here) within the profile
    assert cls.backend == "onnxruntime" and cls.precision == "fp16"
    assert cls.task == "classification" and cls.labels == "labels" and cls.batch == 8
    assert cls.tolerance == Tolerance(**tiny_models["tinycls"]["tolerances"]["fp16"])
    assert fcn.task == "regression" and fcn.labels is None and fcn.batch == 2


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
    assert any(": snr " in f for f in r["failures"]), r["failures"]
    (out,) = r["outputs"].values()
    assert out["max_abs"] > 1e-3 and out["snr_db"] < 60


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
    # bf16 keeps ~59 dB a value; this two-layer net loses little of it (measured: 47 dB,
    # cosine 0.99999, no top-1 flip in 8 samples, no accuracy lost on 32): within every
    # bf16 limit (30 dB, 0.999, 0.95, 0.02 drop), so the verdict is pass
    assert emu["status"] == "pass" and emu["failures"] == [] and emu["reason"] is None
    assert out["snr_db"] > 40 and out["top1_agreement"] == 1.0
    assert emu["task"]["samples"] == 32 and emu["task"]["accuracy_drop"] == 0.0
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


# --- integrity: non-finite outputs, enough samples in profile-sized batches, feeds, limits


def _data_nets_models(root: Path, arch: str, inputs: dict | None = None,
                      profiles: dict | None = None, task: str = "classification",
                      samples: int | None = None) -> dict:
    """A one-model config ('net') on a tests/fixtures/data_nets.py module, with tinycls'
    calibration and labelled evaluation data; ``samples=None``: the default audit.samples."""
    shutil.copy(Path(__file__).parent.parent / "fixtures" / "data_nets.py", root)
    raw = tiny_raw_config()
    if samples is None:
        del raw["defaults"]["audit"]
    else:
        raw["defaults"]["audit"] = {"samples": samples}
    net = dict(raw["models"]["tinycls"], task=task,
               checkpoint={"kind": "state_dict", "arch": f"data_nets:{arch}"})
    if inputs:
        net.update(inputs=inputs, profiles=profiles)
        net.pop("evaluation")
        net["calibration"] = {"path": "calib_fcn.npz"}
    raw["models"] = {"net": net}
    return config.resolve(raw, root)["models"]


def _pipeline(models: dict, tmp: Path, precision: str = "fp32", variant: Path | None = None,
              limits: dict | None = None) -> dict:
    """export -> (precision) -> onnxruntime build -> audit of model 'net'; the audit's
    sidecar. ``variant``: build this ONNX instead of the export's."""
    m = models["net"]
    data = {s: m[s]["path"] for s in ("evaluation", "calibration") if s in m}
    run_stage("export", models, "net", {"arch_source": "data_nets.py", **data},
              {"onnx": tmp / "e/model.onnx", "reference": tmp / "e/reference.npz",
               "sidecar": tmp / "e/export.json"}, tmp)
    src = variant or tmp / "e/model.onnx"
    if precision != "fp32" and variant is None:
        run_stage("precision", models, "net", {"onnx": src},
                  {"onnx": tmp / "p/model.onnx", "sidecar": tmp / "p/precision.json"}, tmp,
                  precision=precision)
        src = tmp / "p/model.onnx"
    profile = next(iter(m["profiles"]))
    run_stage("build", models, "net", {"onnx": src},
              {"engine": tmp / "b/engine.onnx", "sidecar": tmp / "b/build.json"}, tmp,
              backend="onnxruntime", precision=precision, profile=profile)
    job = stage_job("audit", models, "net",
                    {"engine": tmp / "b/engine.onnx", "reference": tmp / "e/reference.npz",
                     **({"evaluation": m["evaluation"]["path"]} if "evaluation" in m else {})},
                    {"sidecar": tmp / "a" / f"{precision}.json"}, tmp,
                    backend="onnxruntime", precision=precision)
    run_job(replace(job, limits=limits or {}))
    return read_json(tmp / "a" / f"{precision}.json")


def test_nan_outputs_fail_with_reason_in_the_drift_matrix(tiny_workspace):
    # setup: a model whose every output is NaN, in PyTorch and in its ONNX alike
    models = _data_nets_models(tiny_workspace, "NanClassifier", samples=8)
    # execute
    side = _pipeline(models, tiny_workspace)
    job = stage_job("drift", models, "net", {}, {"json": tiny_workspace / "a/drift.json",
                                                  "md": tiny_workspace / "a/drift.md"},
                    tiny_workspace)
    run_job(replace(job, extra_inputs=[tiny_workspace / "a/fp32.json"]))
    # assert: fail, saying which output, how many NaN of how many values, on which side
    r = AuditResult.model_validate(side["result"])
    (out,) = r.outputs
    assert r.status == "fail" and r.samples == 8
    assert f"reference (PyTorch) output '{out}' is not finite: 40 NaN and 0 Inf of 40 " \
           "values" in r.failures
    assert f"variant output '{out}' is not finite: 40 NaN and 0 Inf of 40 values" in r.failures
    assert any("max_abs is nan (not finite)" in f for f in r.failures)
    assert r.reason == "; ".join(r.failures)
    (row,) = read_json(tiny_workspace / "a/drift.json")["rows"]
    assert row["status"] == "fail" and row["reason"] == r.reason and row["samples"] == 8
    md = (tiny_workspace / "a/drift.md").read_text()
    assert "| fp32 | onnxruntime | fail [1] | nan |" in md and f"1. {r.reason}" in md


def test_a_constant_reference_fails_the_audit(tiny_workspace):
    """A seeded torchvision ViT's head starts at zero: every variant, int8 or not, "agrees"
    with its all-zero outputs. No pass on a reference that cannot tell drift."""
    # setup / execute
    models = _data_nets_models(tiny_workspace, "ZeroHeadClassifier", samples=8)
    side = _pipeline(models, tiny_workspace)
    # assert: the metrics are perfect, the verdict is not
    r = AuditResult.model_validate(side["result"])
    (out,) = r.outputs
    assert r.outputs[out].max_abs == 0 and r.outputs[out].top1_agreement == 1.0
    assert r.status == "fail"
    assert f"the PyTorch reference is constant ('{out}' is 0.0 everywhere)" in r.reason
    # and the localisation does not rank nodes for a drift nobody measured
    job = stage_job("localise", models, "net",
                    {"fp32": tiny_workspace / "e/model.onnx",
                     "variant": tiny_workspace / "e/model.onnx",
                     "reference": tiny_workspace / "e/reference.npz"},
                    {"sidecar": tiny_workspace / "l/fp16.json"}, tiny_workspace,
                    precision="fp16")
    run_job(replace(job, extra_inputs=[tiny_workspace / "a/fp32.json"]))
    loc = read_json(tiny_workspace / "l/fp16.json")["result"]
    assert loc["status"] == "not_localisable" and "constant" in loc["reason"]
    assert loc["first"] is None and loc["worst"] == []


def test_compare_flags_a_constant_reference_only_when_every_output_is():
    ref = {"a": np.zeros((4, 3), np.float32), "b": np.arange(12, dtype=np.float32)}
    _, failures = audit.compare(ref, dict(ref), "regression")
    assert failures == []  # 'b' varies: the audit can tell drift
    _, failures = audit.compare({"a": ref["a"]}, {"a": ref["a"]}, "regression")
    assert len(failures) == 1 and "'a' is 0.0 everywhere" in failures[0]


def test_inf_in_the_variant_only_fails(exported):
    # setup: the last layer's bias set to +Inf: every variant logit is Inf, the reference not
    models, tmp = exported
    model = onnx.load(str(tmp / "e/model.onnx"))
    bias = next(i for i in model.graph.initializer if numpy_helper.to_array(i).shape == (5,))
    bias.CopyFrom(numpy_helper.from_array(np.full(5, np.inf, np.float32), bias.name))
    onnx.save(model, str(tmp / "inf.onnx"))
    _build(models, tmp, tmp / "inf.onnx", "b")
    # execute
    r = _audit(models, tmp, tmp / "b/engine.onnx", "fp32")["result"]
    # assert: the variant's 8 x 5 logits (and its 32 x 5 on the evaluation data) are named
    (out,) = r["outputs"]
    assert r["status"] == "fail"
    assert f"variant output '{out}' is not finite: 0 NaN and 40 Inf of 40 values" in r["failures"]
    assert (f"variant output '{out}' on the evaluation data is not finite: 0 NaN and 160 Inf "
            "of 160 values") in r["failures"]
    assert not any("reference" in f for f in r["failures"])


@pytest.mark.parametrize("metric", ["max_abs", "cosine", "top1_agreement"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_verdict_fails_on_a_metric_that_is_not_finite(metric, value):
    # setup: metrics within every limit (positive control), then one made non-finite
    good = {"outputs": {"y": {"max_abs": 0.5, "cosine": 0.999, "top1_agreement": 1.0}}}
    assert audit.verdict(good, Tolerance(), "classification") == (True, [])
    bad = {"outputs": {"y": dict(good["outputs"]["y"], **{metric: value})}}
    # execute
    passed, failures = audit.verdict(bad, Tolerance(), "classification")
    # assert
    assert passed is False and failures == [f"y: {metric} is {value} (not finite)"]


def test_verdict_fails_on_non_finite_accuracy_drop_and_on_nothing_compared():
    metrics = {"outputs": {"y": {"max_abs": 0.0, "cosine": 1.0}},
               "task": {"accuracy_drop": float("nan")}}
    assert audit.verdict(metrics, Tolerance(), "regression") == (
        False, ["accuracy drop is nan (not finite)"])
    assert audit.verdict({"outputs": {}}, Tolerance(), "regression") == (
        False, ["no output was compared"])


@pytest.mark.parametrize("shape, profile, batch", [
    (["batch", 3, 8, 8], {"min": [1, 3, 8, 8], "opt": [4, 3, 8, 8], "max": [8, 3, 8, 8]}, 8),
    ([4, 3, 8, 8], {"min": [4, 3, 8, 8], "opt": [4, 3, 8, 8], "max": [4, 3, 8, 8]}, 4)])
def test_audit_compares_32_samples_in_batches_within_the_profile(tiny_workspace, monkeypatch,
                                                                 shape, profile, batch):
    """A model whose outputs depend on the batch (logits minus the batch mean) passes fp32
    only if the PyTorch reference ran in the audit's batches. A spy on the ONNX Runtime
    runner's infer (in-process: ENGINEFORGE_ISOLATION=0) records every batch it ran."""
    # setup: default audit.samples; a dynamic batch of 1..8, or a static batch of 4
    from polygraphy.backend.onnxrt import OnnxrtRunner

    models = _data_nets_models(tiny_workspace, "BatchCentred")
    models["net"]["inputs"] = {"x": {"dtype": "float32", "shape": shape}}
    models["net"]["profiles"] = {"p": {"x": profile}}
    batches = []
    real_infer = OnnxrtRunner.infer

    def spy(self, feed_dict, *args, **kwargs):
        batches.append(len(feed_dict["x"]))
        return real_infer(self, feed_dict, *args, **kwargs)

    monkeypatch.setattr(OnnxrtRunner, "infer", spy)
    monkeypatch.setenv("ENGINEFORGE_ISOLATION", "0")
    # execute
    side = _pipeline(models, tiny_workspace)
    # assert: 32 samples (and the 32 labelled ones) in full batches within the profile
    r = AuditResult.model_validate(side["result"])
    assert r.samples == 32 and r.task.samples == 32
    assert batches == [batch] * (64 // batch)
    assert r.status == "pass", r.failures
    assert max(o.max_abs for o in r.outputs.values()) < 1e-5
    # control: the reference run as one batch of 32 differs (batches matter for this model)
    ref = np.load(tiny_workspace / "e/reference.npz")
    import data_nets
    import torch

    torch.manual_seed(0)
    whole = data_nets.BatchCentred()(torch.from_numpy(ref["in:x"])).detach().numpy()
    (out,) = [k for k in ref.files if k.startswith("out:")]
    assert np.abs(whole - ref[out]).max() > 1e-3
    export = read_json(tiny_workspace / "e/export.json")["result"]
    assert export["reference_samples"] == len(ref["in:x"]) == 32
    assert export["reference_inputs"] == "evaluation data"


def test_input_mismatch_is_one_audit_error_line(exported):
    # setup: a variant with no inputs (an exporter folded its input away)
    models, tmp = exported
    out = onnx.load(str(tmp / "e/model.onnx")).graph.output[0].name
    folded = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Constant", [], [out], value=numpy_helper.from_array(
            np.zeros((8, 5), np.float32)))], "g", [],
        [onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, [8, 5])]),
        opset_imports=[onnx.helper.make_opsetid("", 17)])
    onnx.save(folded, str(tmp / "folded.onnx"))
    _build(models, tmp, tmp / "folded.onnx", "b")
    # execute
    with pytest.raises(StageFailed) as failed:
        _audit(models, tmp, tmp / "b/engine.onnx", "fp32")
    # assert
    msg = str(failed.value)
    assert msg.startswith("[model=tinycls stage=audit key=models.tinycls.inputs] input "
                          "mismatch: the reference feeds ['x'], the variant ")
    assert msg.count("takes []") == 1 and "Fix:" in msg and "unexpected" not in msg
    assert not (tmp / "a/fp32.json").exists()


@pytest.mark.slow
def test_emulated_audit_stops_at_its_time_limit(tiny_workspace):
    """bf16 (ModelOpt AutoCast) is not runnable on ORT's CPU provider, so the ONNX reference
    evaluator emulates it; its bilinear Resize takes seconds in pure Python."""
    # setup
    models = _data_nets_models(
        tiny_workspace, "Upsampler", task="regression", samples=8,
        inputs={"img": {"shape": ["batch", 1, 8, 8]}},
        profiles={"p": {"img": {"min": [1, 1, 8, 8], "opt": [2, 1, 8, 8],
                                "max": [2, 1, 8, 8]}}})
    np.savez(tiny_workspace / "calib_fcn.npz",
             img=np.random.default_rng(0).random((8, 1, 8, 8), dtype=np.float32))
    # execute: a 0.2 s limit
    side = _pipeline(models, tiny_workspace, "bf16", limits={"emulated_audit": 0.2})
    # assert: stopped, as a result; the job's own result is written
    r = AuditResult.model_validate(side["result"])
    assert r.status == "not_runnable" and r.reason.startswith("not runnable on onnxruntime")
    assert r.emulated.status == "not_runnable" and not r.emulated.outputs
    assert r.emulated.reason.startswith(
        "emulation stopped after 0.2 s (models.net.time_limits.emulated_audit)")
    assert r.time_s < 5
    # control: a generous limit lets the same emulation finish and measure
    again = _pipeline(models, tiny_workspace, "bf16", limits={"emulated_audit": 300})
    emu = AuditResult.model_validate(again["result"]).emulated
    assert emu.samples == 8 and list(emu.outputs) == ["upsample_bilinear2d"]
    # a bilinear upsampler in bf16 (measured: 51 dB, cosine 0.999997) is well within the
    # bf16 limits (30 dB, 0.999; a regression has no top-1): the verdict is pass
    (out,) = emu.outputs.values()
    assert emu.status == "pass" and emu.failures == [] and emu.reason is None
    assert out.snr_db > 40 and out.top1_agreement is None and emu.task is None


def test_snr_and_top5_agreement():
    """SNR in dB against hand-computed values (bounded for identical outputs); top-5 overlap
    of a crafted pair; both reported by compare() for classifiers."""
    from engineforge.stages import audit

    a = np.array([[3.0, 4.0]])
    # signal 25, error (0.5^2 + 0^2) = 0.25: 10 log10(100) = 20 dB
    assert audit.snr_db(a, np.array([[3.5, 4.0]])) == pytest.approx(20.0)
    assert audit.snr_db(a, a) == audit.SNR_BOUND_DB
    assert audit.snr_db(np.zeros((1, 2)), a) == -audit.SNR_BOUND_DB
    ref = np.array([[9, 8, 7, 6, 5, 0, 0, 0], [1, 2, 3, 4, 5, 6, 7, 8]], dtype=np.float32)
    var = ref.copy()
    var[0, 4], var[0, 7] = -1, 10  # sample 0: class 4 leaves the top five, class 7 enters
    assert audit.top5_agreement(ref, var) == pytest.approx((4 / 5 + 1) / 2)
    assert audit.top5_agreement(ref[:, :4], var[:, :4]) is None  # fewer than five classes
    outputs, failures = audit.compare({"y": ref}, {"y": var}, "classification")
    assert not failures
    assert outputs["y"]["top5_agreement"] == pytest.approx(0.9)
    assert outputs["y"]["top1_agreement"] == 0.5  # sample 0's top-1 became class 7
    assert -audit.SNR_BOUND_DB < outputs["y"]["snr_db"] < audit.SNR_BOUND_DB
