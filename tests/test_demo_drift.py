"""The demo zoo's drifting models (config.yaml): each plain variant fails its default
tolerance, localisation names the node the model was built to drift at, and the variant
re-made with that node in ``nodes_to_exclude`` passes.

Real stages (export, simplify, precision through the runner), the audit's own comparison
and verdict on ONNX Runtime's CPU provider, and ``localise`` on the same reference inputs.
The stages run in a copy of the project (``project_copy``, from tests/checkout_guard.py):
config.yaml's arch and data paths are relative to the project directory, and a stage run with
the checkout as its working directory could write there.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from conftest import ROOT, run_stage
from engineforge import config
from engineforge.backends import get_backend
from engineforge.localise import localise
from engineforge.settings import Tolerance, Tolerances
from engineforge.stages import audit

BATCH = 8  # within both models' first profile


@pytest.fixture(scope="module")
def exported(tmp_path_factory, project_copy) -> dict:
    """Each drift model exported and simplified once; configs resolved from config.yaml."""
    root = project_copy
    raw = yaml.safe_load((root / "config.yaml").read_text())
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # the arch and data paths in config.yaml are relative to the project
        mp.setenv("ENGINEFORGE_CACHE", "0")
        for model in ("thermal_hotspot", "outlier_cnn"):
            ws = tmp_path_factory.mktemp(model)
            one = dict(raw, models={model: raw["models"][model]})
            models = config.resolve(one, root)["models"]
            arch = models[model]["checkpoint"]["arch"].split(":")[0].replace(".", "/") + ".py"
            run_stage("export", models, model,
                      {"arch_source": arch, "calibration": models[model]["calibration"]["path"]},
                      {"onnx": ws / "e/model.onnx", "reference": ws / "e/reference.npz",
                       "sidecar": ws / "e/export.json"}, ws)
            run_stage("simplify", models, model, {"onnx": ws / "e/model.onnx"},
                      {"onnx": ws / "s/model.onnx", "sidecar": ws / "s/simplify.json"}, ws)
            out[model] = {"raw": one, "ws": ws, "fp32": ws / "s/model.onnx", "root": root}
    return out


@pytest.fixture(autouse=True)
def in_project_copy(project_copy, monkeypatch):
    """Every test's stages run with the project copy as working directory."""
    monkeypatch.chdir(project_copy)


def make_variant(m: dict, model: str, precision: str, exclude: tuple[str, ...] = ()) -> Path:
    """The precision stage's variant, with ``exclude`` as
    ``models.<model>.precision.<precision>.nodes_to_exclude``."""
    raw = copy.deepcopy(m["raw"])
    if exclude:
        raw["models"][model].setdefault("precision", {})[precision] = {
            "nodes_to_exclude": list(exclude)}
    models = config.resolve(raw, m["root"])["models"]
    out = m["ws"] / f"{precision}{'-x' if exclude else ''}"
    run_stage("precision", models, model,
              {"onnx": m["fp32"], "calibration": m["root"] / models[model]["calibration"]["path"]},
              {"onnx": out / "model.onnx", "sidecar": out / "precision.json"}, m["ws"],
              precision=precision)
    return out / "model.onnx"


def audited(m: dict, model: str, variant: Path, precision: str) -> tuple[dict, list[str]]:
    """The audit's metrics and failures for ``variant`` (ONNX Runtime CPU) against the
    PyTorch reference, under the model's default tolerance for ``precision``."""
    resolved = config.resolve(m["raw"], m["root"])["models"][model]
    feed, ref, _ = audit._reference(m["ws"] / "e/reference.npz")
    produced = audit.infer_all(get_backend("onnxruntime").runner(variant), feed, BATCH,
                               model, variant)
    outputs, missing = audit.compare(ref, produced, resolved["task"])
    tol = Tolerance(**resolved["tolerances"][precision])
    return outputs, missing + audit.verdict({"outputs": outputs}, tol, resolved["task"])[1]


def feed_of(m: dict) -> dict[str, np.ndarray]:
    return audit._reference(m["ws"] / "e/reference.npz")[0]


def node(path: Path, name: str) -> onnx.NodeProto:
    return next(n for n in onnx.load(str(path)).graph.node if n.name == name)


def test_thermal_fp16_drifts_at_its_input_standardisation(exported):
    m = exported["thermal_hotspot"]
    sub = node(m["fp32"], "node_sub")  # (x - mean): the node the model is built to drift at
    assert sub.op_type == "Sub" and "mean" in sub.input
    plain = make_variant(m, "thermal_hotspot", "fp16")
    assert node(plain, "node_sub").op_type == "Sub"  # AutoCast left it in fp16 (< data_max)

    outputs, failures = audited(m, "thermal_hotspot", plain, "fp16")
    # (i) the score map fails the fp16 SNR floor; the peak temperature (ReduceMax) does not
    score, peak = outputs["conv2d_2"], outputs["amax"]
    assert score["snr_db"] < 35 and peak["snr_db"] > 60
    assert any(f.startswith("conv2d_2: snr ") for f in failures), failures

    # (ii) localisation: the error enters at the subtraction, not where it shows
    found = localise(m["fp32"], plain, feed_of(m), batch=BATCH)
    assert found.status == "localised"
    assert (found.first.node, found.first.op_type) == ("node_sub", "Sub")
    assert found.worst[0].node == "node_sub" and found.first.drop_db > 30

    # (iii) the subtraction kept in fp32: the variant passes, and with margin
    repaired = make_variant(m, "thermal_hotspot", "fp16", exclude=("node_sub",))
    outputs, failures = audited(m, "thermal_hotspot", repaired, "fp16")
    assert failures == [] and outputs["conv2d_2"]["snr_db"] > 60


def test_thermal_fp32_passes(exported):
    """The positive control: the same model and data, fp32, under fp32's tighter limits."""
    m = exported["thermal_hotspot"]
    outputs, failures = audited(m, "thermal_hotspot", make_variant(m, "thermal_hotspot", "fp32"),
                                "fp32")
    assert failures == [] and outputs["conv2d_2"]["snr_db"] > 100


def test_outlier_int8_drifts_at_the_conv_reading_the_outliers(exported):
    m = exported["outlier_cnn"]
    mix = node(m["fp32"], "node_conv2d_1")  # the conv whose input holds the outlier channels
    assert mix.op_type == "Conv" and mix.input[1] == "mix.weight"
    plain = make_variant(m, "outlier_cnn", "int8")
    assert any(n.op_type == "QuantizeLinear" and n.output[0] in
               {i for n2 in onnx.load(str(plain)).graph.node for i in n2.input}
               for n in onnx.load(str(plain)).graph.node)

    outputs, failures = audited(m, "outlier_cnn", plain, "int8")
    # (i) int8's limits are scale-free: SNR, cosine and top-1 agreement all fail
    (logits,) = outputs.values()
    assert logits["snr_db"] < 20 and logits["top1_agreement"] < 0.9
    assert any(": snr " in f for f in failures) and any(": top1 " in f for f in failures)

    # (ii) the conv that reads the crushed channels takes the blame (its input is compared
    # before its Q/DQ pair), not the stem that makes the outliers
    found = localise(m["fp32"], plain, feed_of(m), batch=BATCH)
    assert (found.first.node, found.first.op_type) == ("node_conv2d_1", "Conv")
    assert found.worst[0].node == "node_conv2d_1"
    assert found.first.snr_in_db > found.first.snr_out_db + 30

    # (iii) that conv left unquantized: the variant passes, the other convs stay int8
    repaired = make_variant(m, "outlier_cnn", "int8", exclude=("node_conv2d_1",))
    outputs, failures = audited(m, "outlier_cnn", repaired, "int8")
    (logits,) = outputs.values()
    assert failures == [] and logits["snr_db"] > 40 and logits["top1_agreement"] == 1.0
    consumers = {n.input[0] for n in onnx.load(str(repaired)).graph.node if n.op_type == "Conv"}
    dq = {n.output[0] for n in onnx.load(str(repaired)).graph.node
          if n.op_type == "DequantizeLinear"}
    assert len(consumers & dq) == 2  # stem and down conv still read quantized inputs


def test_outlier_int8_repaired_on_onnxruntime_is_ort_graph_with_the_conv_unquantized(exported):
    """onnxruntime's int8-repaired: ORT quantize_static's graph with the repair's node kept
    in float. The repair record is written here (the repair stage names node_conv2d_1, see
    above); ort_quantize, the graph and the audit are real."""
    from engineforge.results import PrecisionResult

    m, model = exported["outlier_cnn"], "outlier_cnn"
    models = config.resolve(m["raw"], m["root"])["models"]
    record = m["ws"] / "int8-repaired" / "precision.json"
    record.parent.mkdir(exist_ok=True)
    record.write_text(json.dumps({"result": PrecisionResult(
        precision="int8-repaired", method="qdq", time_s=0.0, bytes=0, nodes=0, cast=0,
        quantize_linear=0, dequantize_linear=0, op_types={}, initializer_dtypes={},
        extra={"repair": {"status": "repaired", "from": "int8",
                          "excluded_nodes": ["node_conv2d_1"]}}).model_dump()}))
    calibration = m["root"] / models[model]["calibration"]["path"]
    graphs = {}
    for variant in ("int8", "int8-repaired"):
        out = m["ws"] / f"ort-{variant}"
        run_stage("ort_quantize", models, model, {"onnx": m["fp32"], "calibration": calibration}
                  | ({"repair": record} if variant == "int8-repaired" else {}),
                  {"onnx": out / "model.onnx", "sidecar": out / "precision.json"}, m["ws"],
                  precision=variant)
        graphs[variant] = out / "model.onnx"

    def dq_fed(path: Path) -> dict[str, bool]:  # conv -> reads a Q/DQ'd activation
        g = onnx.load(str(path)).graph
        made = {o: n for n in g.node for o in n.output}
        return {n.name: made.get(n.input[0]) is not None
                and made[n.input[0]].op_type == "DequantizeLinear"
                for n in g.node if n.op_type == "Conv"}

    # the plain ORT graph quantizes the conv's input (and fails); the repaired one does not,
    # the down conv stays int8, and the audit passes
    assert dq_fed(graphs["int8"])["node_conv2d_1"]
    fed = dq_fed(graphs["int8-repaired"])
    assert not fed["node_conv2d_1"] and fed["node_conv2d_2"]
    outputs, failures = audited(m, model, graphs["int8"], "int8")
    (plain,) = outputs.values()
    assert failures
    outputs, failures = audited(m, model, graphs["int8-repaired"], "int8")
    (logits,) = outputs.values()
    assert failures == [] and logits["snr_db"] > plain["snr_db"] + 15


def test_outlier_fp16_passes(exported):
    """The control: fp16 keeps the outliers' range and the small channels' resolution."""
    m = exported["outlier_cnn"]
    outputs, failures = audited(m, "outlier_cnn", make_variant(m, "outlier_cnn", "fp16"),
                                "fp16")
    assert failures == [] and next(iter(outputs.values()))["snr_db"] > 60


# --- the default tolerances and the SNR floor in the verdict


def test_default_floors_follow_each_precisions_rounding():
    t = Tolerances()
    floors = [getattr(t, p).snr_min_db for p in ("fp32", "fp16", "bf16", "int8")]
    assert floors == sorted(floors, reverse=True) and t.fp8 == t.int8
    assert all(getattr(t, p).max_abs is None for p in type(t).model_fields)  # scale-free defaults


def fp16_limits() -> Tolerance:
    return Tolerances().fp16


@pytest.mark.parametrize("snr, passed", [(40.0, True), (39.9, False), (200.0, True)])
def test_verdict_snr_floor(snr, passed):
    tol = fp16_limits()
    metrics = {"outputs": {"y": {"max_abs": 123.0, "cosine": 1.0, "snr_db": snr}}}
    ok, failures = audit.verdict(metrics, tol, "regression")
    assert ok is passed
    assert failures == ([] if passed else [f"y: snr {snr:.1f} < 40.0 dB"])


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_verdict_never_passes_a_non_finite_snr(value):
    metrics = {"outputs": {"y": {"cosine": 1.0, "snr_db": value}}}
    # even with every limit off
    tol = Tolerance(snr_min_db=-1e9, cosine_min=-1, top1_min=0, accuracy_drop_max=1)
    assert audit.verdict(metrics, tol, "regression") == (
        False, [f"y: snr_db is {value} (not finite)"])


def test_max_abs_is_checked_only_where_set():
    metrics = {"outputs": {"y": {"max_abs": 0.5, "cosine": 1.0, "snr_db": 80.0}}}
    assert audit.verdict(metrics, fp16_limits(), "regression") == (True, [])
    set_ = fp16_limits().model_copy(update={"max_abs": 0.1})
    assert audit.verdict(metrics, set_, "regression") == (False, ["y: max_abs 0.5 > 0.1"])


def test_a_model_overrides_one_limit_and_keeps_the_others():
    raw = yaml.safe_load((ROOT / "config.yaml").read_text())
    raw["models"] = {"thermal_hotspot": raw["models"]["thermal_hotspot"]}
    raw["models"]["thermal_hotspot"]["tolerances"] = {"fp16": {"max_abs": 0.01}}
    tol = config.resolve(raw, ROOT)["models"]["thermal_hotspot"]["tolerances"]
    assert tol["fp16"] == dict(fp16_limits().model_dump(), max_abs=0.01)
    assert tol["int8"]["max_abs"] is None and tol["int8"]["snr_min_db"] == 20


def test_shipped_drift_data_is_what_its_script_makes():
    from calib import make_drift_calib as make

    rng = np.random.default_rng(make.SEED)
    thermal, photos = make.thermal_frames(rng, make.COUNT), make.photo_crops(rng, make.COUNT)
    with np.load(ROOT / "calib/thermal_frames.npz") as f:
        np.testing.assert_array_equal(f["thermal"], thermal)
    with np.load(ROOT / "calib/photo_crops_32.npz") as f:
        np.testing.assert_array_equal(f["image"], photos)
    assert thermal.shape == (64, 1, 16, 16) and 290 < thermal.min() < thermal.max() < 320
    assert photos.shape == (64, 3, 32, 32) and np.isfinite(photos).all()
