"""Localise and repair stages on tiny models that really drift (tests/fixtures/driftnets.py):
real export, ModelOpt AutoCast, ONNX Runtime audits, through the real runner."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import FIXTURES, run_stage, stage_job
from engineforge import config
from engineforge.modelio import load_npz
from engineforge.results import Localisation, PrecisionResult
from engineforge.runner import run_job
from engineforge.sidecar import read_json, sha256_file
from engineforge.stages.repair import candidates

PROFILE = "b1-8"


def drift_raw_config(repair) -> dict:
    net = lambda arch: {
        "checkpoint": {"kind": "state_dict", "arch": f"driftnets:{arch}"},
        "inputs": {"x": {"shape": ["batch", 3, 8, 8]}},
        "profiles": {PROFILE: {"x": {"min": [1, 3, 8, 8], "opt": [4, 3, 8, 8],
                                     "max": [8, 3, 8, 8]}}}}
    return {"defaults": {"precisions": ["fp32", "fp16"], "backends": ["onnxruntime"],
                         "export": {"exporter": "torchscript"}, "audit": {"samples": 8},
                         "bench": {"warmup": 1, "iterations": 3, "threads": 1},
                         "repair": repair},
            "models": {"cancel": net("Cancellation"), "smooth": net("Smooth")}}


def _stages(models: dict, root: Path, model: str) -> Path:
    """export -> fp16 (AutoCast) -> onnxruntime audit of the fp16 ONNX; the model's dir."""
    d = root / model
    run_stage("export", models, model, {"arch_source": str(FIXTURES / "driftnets.py")},
              {"onnx": d / "e/model.onnx", "reference": d / "e/reference.npz",
               "sidecar": d / "e/export.json"}, root)
    run_stage("precision", models, model, {"onnx": d / "e/model.onnx"},
              {"onnx": d / "fp16/model.onnx", "sidecar": d / "fp16/precision.json"}, root,
              precision="fp16")
    run_stage("audit", models, model, {"engine": d / "fp16/model.onnx",
                                       "reference": d / "e/reference.npz"},
              {"sidecar": d / "audit/fp16.json"}, root, backend="onnxruntime",
              precision="fp16")
    return d


def _localise(models: dict, root: Path, d: Path, model: str, variant: str) -> Localisation:
    job = stage_job("localise", models, model,
                    {"fp32": d / "e/model.onnx", "variant": d / variant / "model.onnx",
                     "reference": d / "e/reference.npz"},
                    {"sidecar": d / f"localise/{variant}.json"}, root, precision=variant)
    run_job(replace(job, extra_inputs=[d / f"audit/{variant}.json"]))
    return Localisation.model_validate(read_json(d / f"localise/{variant}.json")["result"])


def _repair(models: dict, root: Path, d: Path, model: str, out: str = "fp16-repaired"):
    run_stage("repair", models, model,
              {"onnx": d / "e/model.onnx", "variant": d / "fp16/model.onnx",
               "localise": d / "localise/fp16.json", "reference": d / "e/reference.npz"},
              {"onnx": d / out / "model.onnx", "sidecar": d / out / "precision.json"}, root,
              precision="fp16-repaired")
    return PrecisionResult.model_validate(read_json(d / out / "precision.json")["result"])


@pytest.fixture(scope="module")
def drifted(tmp_path_factory):
    """Both drift nets exported, made fp16, audited and localised once."""
    root = tmp_path_factory.mktemp("drift")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("ENGINEFORGE_CACHE", "0")
        mp.syspath_prepend(str(FIXTURES))
        models = config.resolve(drift_raw_config({"max_rounds": 4, "nodes_per_round": 2}),
                                root)["models"]
        locs = {}
        for model in ("cancel", "smooth"):
            d = _stages(models, root, model)
            locs[model] = _localise(models, root, d, model, "fp16")
        yield models, root, locs


def _node(onnx_path: Path, op_type: str) -> str:
    names = [n.name for n in onnx.load(str(onnx_path)).graph.node if n.op_type == op_type]
    assert len(names) == 1, names
    return names[0]


def _max_abs(onnx_path: Path, reference: Path) -> float:
    import onnxruntime as ort

    ref = load_npz(reference)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": ref["in:x"]})[0]
    (expected,) = [v for k, v in ref.items() if k.startswith("out:")]
    return float(np.abs(y - expected).max())


def test_failing_fp16_is_localised_to_the_cancelling_sub(drifted):
    models, root, locs = drifted
    loc, d = locs["cancel"], root / "cancel"
    sub = _node(d / "e/model.onnx", "Sub")
    assert loc.status == "localised" and loc.precision == "fp16"
    assert loc.audits == {"onnxruntime": "fail"}
    assert loc.trigger and all(t.startswith("onnxruntime: ") for t in loc.trigger)
    assert (loc.first.node, loc.first.op_type) == (sub, "Sub")
    assert loc.worst[0].node == sub and loc.first.drop_db > 30


def test_passing_fp16_is_recorded_without_localisation(drifted):
    models, root, locs = drifted
    loc = locs["smooth"]
    audit = read_json(root / "smooth/audit/fp16.json")["result"]
    assert audit["status"] == "pass"  # the control: really audited, really passing
    assert loc.status == "passes" and loc.audits == {"onnxruntime": "pass"}
    assert loc.first is None and loc.compared == 0 and not loc.trigger


def test_repair_excludes_the_sub_then_its_producer_and_passes(drifted):
    models, root, _ = drifted
    d = root / "cancel"
    sub = _node(d / "e/model.onnx", "Sub")
    conv1 = [n.name for n in onnx.load(str(d / "e/model.onnx")).graph.node
             if n.op_type == "Conv"][0]
    r = _repair(models, root, d, "cancel")
    rep = r.extra["repair"]
    assert r.precision == "fp16-repaired" and rep["from"] == "fp16"
    assert rep["status"] == "repaired"
    rounds = rep["rounds"]
    assert rounds[0]["round"] == 0 and not rounds[0]["passed"]  # the plain variant fails
    assert rounds[1]["excluded"] == [sub]  # the Sub alone: its input is already rounded
    assert rounds[-1]["passed"] and conv1 in rounds[-1]["excluded"]
    assert rep["excluded_nodes"] == [sub, conv1]
    (out,) = rounds[0]["metrics"]  # the model's one output
    m = rounds[-1]["metrics"][out]
    assert m["cosine"] > 0.999 and m["max_abs"] < 0.05 < rounds[0]["metrics"][out]["max_abs"]
    # independent check of the published file: closer to PyTorch than the plain variant
    ref = d / "e/reference.npz"
    assert _max_abs(d / "fp16-repaired/model.onnx", ref) < 0.05 < _max_abs(
        d / "fp16/model.onnx", ref)
    # kept in fp32: their outputs are float32 in the repaired graph, fp16 in the plain one
    types = {v.name: v.type.tensor_type.elem_type for v in onnx.shape_inference.infer_shapes(
        onnx.load(str(d / "fp16-repaired/model.onnx"))).graph.value_info}
    sub_out = next(n.output[0] for n in onnx.load(str(d / "e/model.onnx")).graph.node
                   if n.name == sub)
    assert types[sub_out] == onnx.TensorProto.FLOAT
    # a repaired variant is audited like the others (fp16 tolerances via its base precision)
    side = run_stage("audit", models, "cancel",
                     {"engine": d / "fp16-repaired/model.onnx", "reference": ref},
                     {"sidecar": d / "audit/fp16-repaired.json"}, root, backend="onnxruntime",
                     precision="fp16-repaired")
    assert side["result"]["status"] == "pass"
    assert side["result"]["tolerance"] == models["cancel"]["tolerances"]["fp16"]


def test_repair_of_a_passing_variant_is_the_plain_one(drifted):
    models, root, _ = drifted
    d = root / "smooth"
    r = _repair(models, root, d, "smooth")
    rep = r.extra["repair"]
    assert rep["status"] == "not_needed" and rep["excluded_nodes"] == [] and not rep["rounds"]
    assert sha256_file(d / "fp16-repaired/model.onnx") == sha256_file(d / "fp16/model.onnx")


def test_repair_without_rounds_is_unrepaired_and_honest(drifted):
    models, root, _ = drifted
    d = root / "cancel"
    zero = copy.deepcopy(models)
    zero["cancel"]["repair"] = {"max_rounds": 0}
    r = _repair(zero, root, d, "cancel", out="zero")
    rep = r.extra["repair"]
    assert rep["status"] == "unrepaired" and rep["excluded_nodes"] == []
    assert "max_rounds is 0" in rep["reason"]
    assert [x["passed"] for x in rep["rounds"]] == [False]  # round 0: the plain variant
    assert sha256_file(d / "zero/model.onnx") == sha256_file(d / "fp16/model.onnx")
    side = run_stage("audit", zero, "cancel",
                     {"engine": d / "zero/model.onnx", "reference": d / "e/reference.npz"},
                     {"sidecar": d / "audit/zero.json"}, root, backend="onnxruntime",
                     precision="fp16-repaired")
    assert side["result"]["status"] == "fail"


def test_candidates_pass_the_blame_of_an_excluded_node_to_its_producers():
    from engineforge.results import NodeDrift

    drift = lambda node, drop: NodeDrift(node=node, op_type="X", output=node, snr_in_db=70,
                                         snr_out_db=70 - drop, drop_db=drop, cosine=1.0,
                                         fp32_peak_abs=1.0)
    loc = Localisation(status="localised", first=drift("sub", 50),
                       worst=[drift("sub", 50), drift("mul", 5), drift("conv", 0)])
    producers = {"sub": ["conv", "const"], "mul": ["sub"]}
    assert candidates(loc, [], producers, 2) == ["sub", "mul"]
    assert candidates(loc, ["sub"], producers, 2) == ["conv", "const"]
    assert candidates(loc, ["sub", "conv", "const", "mul"], producers, 2) == []


def test_variants_and_the_repair_key(tmp_path):
    from engineforge.errors import ConfigError
    from engineforge.settings import base_precision, variants

    on = config.resolve(drift_raw_config(True), tmp_path)["models"]["cancel"]
    off = config.resolve(drift_raw_config(False), tmp_path)["models"]["cancel"]
    assert variants(on) == ["fp32", "fp16", "fp16-repaired"]
    assert variants(off) == ["fp32", "fp16"]
    assert base_precision("int8-repaired") == "int8" and base_precision("fp16") == "fp16"
    raw = drift_raw_config({"precisions": ["int8"], "max_rounds": 2})
    raw["defaults"]["precisions"] = ["fp32", "fp16", "int8"]
    for m in raw["models"].values():
        m["calibration"] = {"path": "calib.npz"}
    np.savez(tmp_path / "calib.npz", x=np.zeros((4, 3, 8, 8), np.float32))
    only_int8 = config.resolve(raw, tmp_path)["models"]["cancel"]
    assert variants(only_int8) == ["fp32", "fp16", "int8", "int8-repaired"]
    bad = drift_raw_config({"precisions": ["bf16"]})
    with pytest.raises(ConfigError) as info:
        config.resolve(bad, tmp_path)
    assert str(info.value).startswith("[model=cancel stage=config key=models.cancel.repair] "
                                      "repair.precisions ['bf16'] are not among")
    with pytest.raises(ConfigError, match="defaults.repair"):  # fp32 is never repaired
        config.resolve(drift_raw_config({"precisions": ["fp32"]}), tmp_path)


def test_a_variant_no_audit_measured_is_not_localised_nor_repaired(drifted, tmp_path):
    from engineforge.results import AuditResult
    from engineforge.sidecar import write_json

    models, root, _ = drifted
    d = root / "cancel"
    audit = AuditResult(status="not_runnable", reason="not runnable on onnxruntime: no kernel",
                        backend="onnxruntime", precision="fp16", tolerance={})
    side = tmp_path / "audit.json"
    write_json(side, {"result": audit.model_dump()})  # an audit sidecar's result, as input
    job = stage_job("localise", models, "cancel",
                    {"fp32": d / "e/model.onnx", "variant": d / "fp16/model.onnx",
                     "reference": d / "e/reference.npz"},
                    {"sidecar": tmp_path / "loc.json"}, root, precision="fp16")
    run_job(replace(job, extra_inputs=[side]))
    loc = Localisation.model_validate(read_json(tmp_path / "loc.json")["result"])
    assert loc.status == "not_localisable" and loc.compared == 0
    assert loc.audits == {"onnxruntime": "not_runnable"}
    assert "no audit measured this variant" in loc.reason
    run_stage("repair", models, "cancel",
              {"onnx": d / "e/model.onnx", "variant": d / "fp16/model.onnx",
               "localise": tmp_path / "loc.json", "reference": d / "e/reference.npz"},
              {"onnx": tmp_path / "r/model.onnx", "sidecar": tmp_path / "r/precision.json"},
              root, precision="fp16-repaired")
    rep = read_json(tmp_path / "r/precision.json")["result"]["extra"]["repair"]
    assert rep["status"] == "unrepaired" and not rep["rounds"]
    assert rep["reason"].startswith("not localisable: no audit measured")


def test_a_variant_only_pytorch_backends_audited_is_left_out_of_the_summary(drifted, tmp_path):
    """No backend runs the ONNX variant (torch-inductor only, as on the H100): the localise
    job says so, and the summary's localisation table leaves the variant out."""
    from engineforge.layout import Layout
    from engineforge.stages import summary

    models, root, _ = drifted
    d = root / "cancel"
    L = Layout(str(tmp_path / "artifacts"))
    out = Path(L.localise("cancel", "fp16"))
    job = stage_job("localise", models, "cancel",
                    {"fp32": d / "e/model.onnx", "variant": d / "fp16/model.onnx",
                     "reference": d / "e/reference.npz"}, {"sidecar": out}, root,
                    precision="fp16")
    run_job(replace(job, extra_inputs=[]))
    loc = Localisation.model_validate(read_json(out)["result"])
    assert loc.status == "not_localisable" and loc.audits == {}
    assert "no backend that runs the ONNX variant audited it" in loc.reason
    s = summary.Settings(models={"cancel": {"precisions": ["fp32", "fp16"], "backends": [],
                                            "profile": "p"}}, skipped_backends={})
    assert summary.localisations(L, s) == []
    # positive control: the same record with an audit it could not measure is listed
    side = read_json(out)
    side["result"]["audits"] = {"onnxruntime": "not_runnable"}
    out.write_text(json.dumps(side))
    assert [r["precision"] for r in summary.localisations(L, s)] == ["fp16"]


def test_int8_outlier_channels_localised_to_their_conv_and_repaired(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ENGINEFORGE_CACHE", "0")
    np.savez(tmp_path / "calib.npz",
             x=np.random.default_rng(0).random((16, 3, 8, 8), dtype=np.float32))
    raw = drift_raw_config(True)
    raw["defaults"]["precisions"] = ["fp32", "int8"]
    raw["defaults"]["precision"] = {"int8": {"calib_size": 16}}
    raw["models"] = {"outliers": dict(raw["models"]["cancel"], calibration={"path": "calib.npz"},
                                      checkpoint={"kind": "state_dict",
                                                  "arch": "driftnets:Outliers"})}
    models = config.resolve(raw, tmp_path)["models"]
    d, calib = tmp_path / "outliers", {"calibration": tmp_path / "calib.npz"}
    run_stage("export", models, "outliers", {"arch_source": str(FIXTURES / "driftnets.py"),
                                             **calib},
              {"onnx": d / "e/model.onnx", "reference": d / "e/reference.npz",
               "sidecar": d / "e/export.json"}, tmp_path)
    run_stage("precision", models, "outliers", {"onnx": d / "e/model.onnx", **calib},
              {"onnx": d / "int8/model.onnx", "sidecar": d / "int8/precision.json"}, tmp_path,
              precision="int8")
    run_stage("audit", models, "outliers", {"engine": d / "int8/model.onnx",
                                            "reference": d / "e/reference.npz"},
              {"sidecar": d / "audit/int8.json"}, tmp_path, backend="onnxruntime",
              precision="int8")
    loc = _localise(models, tmp_path, d, "outliers", "int8")
    conv_b = next(n.name for n in onnx.load(str(d / "e/model.onnx")).graph.node
                  if n.op_type == "Conv" and "conv_b" in n.input[1])
    assert loc.status == "localised" and loc.audits == {"onnxruntime": "fail"}
    assert (loc.first.node, loc.first.op_type) == (conv_b, "Conv")

    run_stage("repair", models, "outliers",
              {"onnx": d / "e/model.onnx", "variant": d / "int8/model.onnx",
               "localise": d / "localise/int8.json", "reference": d / "e/reference.npz",
               **calib},
              {"onnx": d / "int8-repaired/model.onnx",
               "sidecar": d / "int8-repaired/precision.json"}, tmp_path,
              precision="int8-repaired")
    r = PrecisionResult.model_validate(
        read_json(d / "int8-repaired/precision.json")["result"])
    rep = r.extra["repair"]
    assert rep["status"] == "repaired" and rep["excluded_nodes"] == [conv_b]
    plain = PrecisionResult.model_validate(read_json(d / "int8/precision.json")["result"])
    assert 0 < r.quantize_linear < plain.quantize_linear  # conv_b's inputs stay unquantized
    assert r.extra["calibration_samples"] == 16


@pytest.fixture(scope="module")
def bf16_audited(drifted) -> dict:
    """The Cancellation net's bf16 variant and its onnxruntime audit (emulated)."""
    models, root, _ = drifted
    d = root / "cancel"
    run_stage("precision", models, "cancel", {"onnx": d / "e/model.onnx"},
              {"onnx": d / "bf16/model.onnx", "sidecar": d / "bf16/precision.json"}, root,
              precision="bf16")
    return run_stage("audit", models, "cancel", {"engine": d / "bf16/model.onnx",
                                                 "reference": d / "e/reference.npz"},
                     {"sidecar": d / "audit/bf16.json"}, root, backend="onnxruntime",
                     precision="bf16")["result"]


def test_bf16_is_localised_and_repaired_on_the_onnx_reference_evaluator(drifted,
                                                                         bf16_audited):
    """ORT's CPU provider has no bf16 kernels: the audit, the localisation and the repair's
    round 0 run on onnx.reference (the emulated path)."""
    models, root, _ = drifted
    d, ref = root / "cancel", root / "cancel/e/reference.npz"
    audit = bf16_audited
    assert audit["status"] == "not_runnable" and audit["emulated"]["status"] == "fail"
    loc = _localise(models, root, d, "cancel", "bf16")
    assert loc.status == "localised" and loc.runtime == "onnx-reference"
    assert loc.audits == {"onnxruntime (emulated)": "fail"}
    assert (loc.first.node, loc.first.op_type) == (_node(d / "e/model.onnx", "Sub"), "Sub")
    run_stage("repair", models, "cancel",
              {"onnx": d / "e/model.onnx", "variant": d / "bf16/model.onnx",
               "localise": d / "localise/bf16.json", "reference": ref},
              {"onnx": d / "bf16-repaired/model.onnx",
               "sidecar": d / "bf16-repaired/precision.json"}, root, precision="bf16-repaired")
    rep = read_json(d / "bf16-repaired/precision.json")["result"]["extra"]["repair"]
    assert rep["status"] == "repaired", rep
    assert rep["rounds"][0]["runtime"] == "onnx-reference" and not rep["rounds"][0]["passed"]
    assert {_node(d / "e/model.onnx", "Sub"), "/conv1/Conv"} <= set(rep["excluded_nodes"])


def test_an_emulated_localisation_past_its_time_limit_is_not_localisable(drifted, bf16_audited,
                                                                         tmp_path):
    models, root, _ = drifted
    d = root / "cancel"
    job = stage_job("localise", models, "cancel",
                    {"fp32": d / "e/model.onnx", "variant": d / "bf16/model.onnx",
                     "reference": d / "e/reference.npz"},
                    {"sidecar": tmp_path / "loc.json"}, root, precision="bf16")
    run_job(replace(job, extra_inputs=[d / "audit/bf16.json"],
                    limits={"emulated_audit": 0.001}))
    loc = Localisation.model_validate(read_json(tmp_path / "loc.json")["result"])
    assert loc.status == "not_localisable" and "emulation stopped after 0.001 s" in loc.reason
    assert loc.trigger  # what triggered it is kept
