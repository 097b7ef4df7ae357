"""TensorRT-RTX builds real engines on this CPU-only machine; the full builder is absent.

Tiny ONNX models are made here with onnx.helper: a conv net in fp32 and in fp16, and an
int8 Q/DQ conv (what ModelOpt's explicit quantization produces). The backends are tested
directly (``BuildRequest`` in, facts out) and through the build stage and the real runner
(typed :class:`~engineforge.results.BuildResult` in the sidecar).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from conftest import run_stage
from engineforge.backends import backend_class, get_backend
from engineforge.backends.base import BuildRequest, gpu_device
from engineforge.backends.tensorrt import TensorRTBackend, TensorRTRTXBackend, _profile_for
from engineforge.errors import BenchError, BuildError
from engineforge.layout import Layout
from engineforge.results import BuildResult
from engineforge.runner import StageFailed
from engineforge.stages import audit
from onnx import TensorProto, helper, numpy_helper
from polygraphy.exception import PolygraphyException

C, HW, K = 16, 16, 96          # channels in, spatial size, channels out (weights dominate size)
ONE = [{"x": {"min": [1, C, HW, HW], "opt": [4, C, HW, HW], "max": [8, C, HW, HW]}}]
TWO = ONE + [{"x": {"min": [8, C, HW, HW], "opt": [16, C, HW, HW], "max": [32, C, HW, HW]}}]


def conv_model(path: Path, dtype=np.float32) -> Path:
    """x[N,C,H,W] -> Conv(3x3) -> Relu -> Conv(3x3) -> y, every tensor in ``dtype``."""
    rng = np.random.default_rng(0)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.05).astype(dtype), n)
             for n, s in (("w1", (K, C, 3, 3)), ("b1", (K,)), ("w2", (K, K, 3, 3)), ("b2", (K,)))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "w2", "b2"], ["y"], pads=[1, 1, 1, 1])]
    return _save(path, nodes, inits, elem)


def qdq_model(path: Path) -> Path:
    """int8 explicit quantization: Q/DQ on the activation, int8 per-channel weights + DQ."""
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (K, C, 3, 3), dtype=np.int8)
    inits = [numpy_helper.from_array(np.array(0.02, np.float32), "x_scale"),
             numpy_helper.from_array(np.array(0, np.int8), "x_zp"),
             numpy_helper.from_array(w, "w_q"),
             numpy_helper.from_array(np.full(K, 0.001, np.float32), "w_scale"),
             numpy_helper.from_array(np.zeros(K, np.int8), "w_zp"),
             numpy_helper.from_array(np.zeros(K, np.float32), "b")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"])]
    return _save(path, nodes, inits, TensorProto.FLOAT)


def _save(path: Path, nodes, inits, elem, opset: int = 17) -> Path:
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", elem, ["N", C, HW, HW])],
        [helper.make_tensor_value_info("y", elem, ["N", K, HW, HW])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def request(tmp_path: Path, onnx_path: Path, precision: str = "fp32", profiles=ONE,
            **kw) -> BuildRequest:
    return BuildRequest(model="tiny", precision=precision, onnx_path=onnx_path,
                        engine_path=tmp_path / "out" / f"{precision}.engine",
                        work_dir=tmp_path / "work" / precision, profiles=profiles,
                        settings={"precision_mode": "graph", "workspace_mib": 256,
                                  "builder_optimization_level": 3}, **kw)


@pytest.fixture(scope="module")
def rtx() -> TensorRTRTXBackend:
    return get_backend("tensorrt-rtx")


def test_fp32_dynamic_batch_builds_engine_and_layer_info(rtx, tmp_path):
    # setup
    req = request(tmp_path, conv_model(tmp_path / "fp32.onnx"),
                  timing_cache=tmp_path / "cache" / "timing.cache")
    # execute
    res = rtx.build(req)
    # assert
    assert req.engine_path.stat().st_size == res["engine_bytes"] > 0
    assert not list(req.engine_path.parent.glob(".*.tmp"))          # atomic write left nothing
    assert res["build_time_s"] > 0 and res["flavour"] == "tensorrt-rtx"
    assert res["strongly_typed"] is True and res["profiles"] == 1
    assert res["trt_version"].startswith("1.")
    assert res["runs_on"] == "compute capability 8.0/8.6/8.9/12.x"
    layers = json.loads(Path(res["layer_info"]).read_text())["layers"]
    assert res["num_layers"] == len(layers) >= 1
    assert {"CONVOLUTION", "ACTIVATION"} <= {lyr["type"].split(".")[-1] for lyr in layers}
    # No CUDA device here: the cache is skipped (and said so), never half-written.
    assert res["timing_cache"]["used"] is False and "skipped" in res["timing_cache"]["note"]
    assert not (tmp_path / "cache" / "timing.cache").exists()
    assert Path(res["log"]).read_text()


def test_two_profiles_in_one_engine(rtx, tmp_path):
    # setup
    model = conv_model(tmp_path / "fp32.onnx")
    one = rtx.build(request(tmp_path / "one", model))
    # execute
    req = request(tmp_path / "two", model, profiles=TWO)
    two = rtx.build(req)
    # assert: TensorRT's config held both profiles, and the plan carries code for both
    assert two["profiles"] == 2 and one["profiles"] == 1
    assert two["engine_bytes"] > 1.3 * one["engine_bytes"]
    # Deserializing needs a CUDA driver, which this machine lacks: the runtime refuses
    # (returns None) instead of crashing, so the engine cannot be inspected here.
    import tensorrt_rtx_bindings as trt

    runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
    engine = runtime.deserialize_cuda_engine(req.engine_path.read_bytes())
    if engine is not None:                          # an RTX-class GPU is present
        assert engine.num_optimization_profiles == 2
    else:
        assert "network" in two["layer_info_source"]


def test_fp16_graph_builds_smaller_engine(rtx, tmp_path):
    # setup
    fp32 = rtx.build(request(tmp_path, conv_model(tmp_path / "fp32.onnx")))
    # execute
    fp16 = rtx.build(request(tmp_path, conv_model(tmp_path / "fp16.onnx", np.float16), "fp16"))
    # assert: strongly typed, the fp16 graph gives fp16 tensors and a smaller plan
    assert fp16["engine_bytes"] < fp32["engine_bytes"]
    layers = json.loads(Path(fp16["layer_info"]).read_text())["layers"]
    assert {t["dtype"] for lyr in layers for t in lyr["outputs"]} == {"DataType.HALF"}


def test_int8_qdq_graph_builds(rtx, tmp_path):
    # execute
    res = rtx.build(request(tmp_path, qdq_model(tmp_path / "int8.onnx"), "int8"))
    # assert
    assert res["engine_bytes"] > 0
    kinds = {lyr["type"].split(".")[-1] for lyr in
             json.loads(Path(res["layer_info"]).read_text())["layers"]}
    assert {"QUANTIZE", "DEQUANTIZE", "CONVOLUTION"} <= kinds


def test_self_description():
    # execute
    rtx_cls, full_cls = backend_class("tensorrt-rtx"), backend_class("tensorrt")
    # assert: what the registry, layout, rules and fingerprints read without instantiating
    assert (rtx_cls, full_cls) == (TensorRTRTXBackend, TensorRTBackend)
    assert rtx_cls.name == "tensorrt-rtx" and full_cls.name == "tensorrt"
    assert rtx_cls.artifact == full_cls.artifact == "engine.plan"
    assert rtx_cls.settings_section == full_cls.settings_section == "tensorrt"
    assert rtx_cls.builds_from == full_cls.builds_from == "onnx"
    assert rtx_cls.device_class.startswith("rtx:") and full_cls.device_class == "gpu"
    assert rtx_cls.tools == ("tensorrt_rtx_cu13_bindings", "polygraphy")
    assert full_cls.tools[0] == "tensorrt" and "polygraphy" in full_cls.tools
    assert (rtx_cls.timing_cache, rtx_cls.multi_profile, rtx_cls.flags_mode) == (
        False, True, False)
    assert (full_cls.timing_cache, full_cls.multi_profile, full_cls.flags_mode) == (
        True, True, True)
    # an RTX engine targets a GPU class, not the build machine; the full builder the GPU here
    assert TensorRTRTXBackend().device() == rtx_cls.device_class
    assert TensorRTBackend().device() == gpu_device()


def test_availability_and_runnable_on_cpu(rtx):
    # execute
    avail, full = rtx.availability(), TensorRTBackend().availability()
    ok, why = rtx.runnable("fp16")
    # assert: the version comes from package metadata (no import of the bindings)
    assert avail.ok and avail.version.startswith("1.")
    assert avail.version == metadata.version("tensorrt_rtx_cu13_bindings")
    assert not full.ok
    assert full.reason == "the tensorrt Python package (full builder) is not installed"
    assert full.how.startswith("run inside nvcr.io/nvidia/tensorrt:<tag>")
    assert "skipped: the tensorrt Python package" in full.line("tensorrt")
    assert ok is False
    assert why.startswith("TensorRT-RTX engines run only on compute capability "
                          "8.0/8.6/8.9/12.x GPUs; this machine has ")
    assert TensorRTBackend().runnable("fp32")[0] is False


@pytest.mark.parametrize("kind", ["garbage", "unsupported_op"])
def test_broken_onnx_is_a_build_error(rtx, tmp_path, kind):
    # setup
    path = tmp_path / f"{kind}.onnx"
    if kind == "garbage":
        path.write_bytes(b"this is not an ONNX model")
    else:
        node = helper.make_node("NoSuchOp", ["x"], ["y"], domain="engineforge.test")
        graph = helper.make_graph(
            [node], "bad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
        onnx.save(helper.make_model(graph, opset_imports=[
            helper.make_opsetid("", 17), helper.make_opsetid("engineforge.test", 1)]), path)
    req = request(tmp_path, path, profiles=[{}])
    # execute
    with pytest.raises(BuildError) as err:
        rtx.build(req)
    # assert: names the model and precision, and carries TensorRT's own reason
    text = str(err.value)
    assert "model=tiny" in text and "stage=build" in text and "fp32 engine" in text
    if kind == "unsupported_op":
        assert "NoSuchOp" in text
    assert not req.engine_path.exists()


def test_flags_mode_is_refused_for_rtx(rtx, tmp_path):
    # setup
    req = request(tmp_path, conv_model(tmp_path / "fp32.onnx"), "fp16")
    req.settings["precision_mode"] = "flags"
    # execute / assert
    with pytest.raises(BuildError, match="precision_mode"):
        rtx.build(req)


def test_full_tensorrt_refuses_when_polygraphy_is_bound_to_rtx(rtx, tmp_path):
    # setup: the RTX builds above bound polygraphy.backend.trt to tensorrt_rtx
    rtx.build(request(tmp_path, conv_model(tmp_path / "fp32.onnx")))
    # execute / assert: never a silent build with the wrong library
    with pytest.raises(BuildError, match="already bound to tensorrt-rtx"):
        TensorRTBackend().build(request(tmp_path, tmp_path / "fp32.onnx"))


def test_bench_and_runner_need_an_rtx_gpu(rtx, tmp_path):
    # setup
    req = request(tmp_path, conv_model(tmp_path / "fp32.onnx"))
    rtx.build(req)
    settings = {"warmup": 1, "iterations": 2, "threads": 1}
    # execute / assert: the bench says why it cannot time the engine here
    with pytest.raises(BenchError, match="compute capability 8.0/8.6/8.9/12.x"):
        rtx.bench(req.engine_path, {"x": [1, C, HW, HW]}, settings, tmp_path)
    # the audit's runner is lazy; activating it here fails at deserialization, not a crash:
    # Polygraphy's own error (TensorRT's CUDA error is in the log it prints) ...
    runner = rtx.runner(req.engine_path)
    assert type(runner).__name__ == "TrtRunner"
    with pytest.raises(PolygraphyException) as raw:
        runner.activate()
    assert type(raw.value) is PolygraphyException
    assert str(raw.value) == "Could not deserialize engine. See log for details."
    # ... which the audit turns into its "not runnable" cause, one line
    with pytest.raises(audit.NotRunnable) as cause:
        audit.infer_all(rtx.runner(req.engine_path), {"x": np.zeros((1, C, HW, HW), np.float32)},
                        1, "tiny", req.engine_path)
    assert str(cause.value) == "Could not deserialize engine. See log for details."


def test_profile_for_picks_the_profile_covering_the_shapes():
    # setup: an engine's profile ranges, as get_tensor_profile_shape returns them
    class Engine:
        num_optimization_profiles = 2

        def get_tensor_profile_shape(self, name, idx):
            return [p["min"], p["opt"], p["max"]] if (p := TWO[idx][name]) else None

    # execute / assert
    assert _profile_for(Engine(), {"x": [8, C, HW, HW]}) == 0
    assert _profile_for(Engine(), {"x": [20, C, HW, HW]}) == 1
    with pytest.raises(BenchError, match="no optimization profile"):
        _profile_for(Engine(), {"x": [64, C, HW, HW]})


@pytest.mark.parametrize(("version", "precision", "expect"), [
    ("10.13.0", "fp16", (False, {"fp16": True})),
    ("10.13.0", "fp32", (False, {})),
    ("10.13.0", "int8", "needs calibration data"),
    ("11.0.0", "fp16", "no builder precision flags"),
])
def test_full_tensorrt_flags_mode(tmp_path, version, precision, expect):
    # setup: a stand-in for the tensorrt module (the full builder is absent here)
    trt = SimpleNamespace(__version__=version)
    req = request(tmp_path, tmp_path / "fp32.onnx", precision)
    req.settings["precision_mode"] = "flags"
    # execute / assert
    if isinstance(expect, str):
        with pytest.raises(BuildError, match=expect):
            TensorRTBackend()._mode(req, trt)
    else:
        assert TensorRTBackend()._mode(req, trt) == expect


def test_flags_int8_calibration_data_comes_from_the_request(tmp_path):
    # setup: the old settings["calib_npz"] no longer counts; BuildRequest.calib_npz does
    np.savez(tmp_path / "calib.npz", x=np.zeros((4, C, HW, HW), np.float32))
    req = request(tmp_path, tmp_path / "fp32.onnx", "int8")
    req.settings.update(precision_mode="flags", calib_npz=str(tmp_path / "calib.npz"))
    # execute
    with pytest.raises(BuildError) as err:
        TensorRTBackend()._mode(req, SimpleNamespace(__version__="10.13.0"))
    # assert: names the model's calibration key and both ways out
    assert "flags-mode int8 needs calibration data" in str(err.value)
    assert err.value.key == "models.tiny.calibration" and err.value.model == "tiny"
    assert "int8_calibration_cache" in err.value.fix and "precision_mode: graph" in err.value.fix
    assert request(tmp_path, tmp_path / "fp32.onnx", "int8").calib_npz is None


def test_flags_int8_calibrator_batches_from_calib_npz(tmp_path):
    """Needs the full TensorRT (Polygraphy's Calibrator subclasses its calibrator class)."""
    pytest.importorskip("tensorrt")
    # setup: 10 samples, the calibration profile's opt batch is 4
    np.savez(tmp_path / "calib.npz", x=np.arange(10 * 2, dtype=np.float32).reshape(10, 2))
    req = request(tmp_path, tmp_path / "fp32.onnx", "int8",
                  calib_npz=tmp_path / "calib.npz")
    req.settings["precision_mode"] = "flags"
    # execute
    strongly_typed, kwargs = TensorRTBackend()._mode(req, SimpleNamespace(__version__="10.13.0"))
    # assert
    assert strongly_typed is False and kwargs["int8"] is True
    batches = list(kwargs["calibrator"].data_loader)
    assert [len(b["x"]) for b in batches] == [4, 4, 2]


def test_rtx_builds_when_polygraphy_was_imported_without_the_env(tmp_path):
    # setup: a fresh process that imports polygraphy (USE_TENSORRT_RTX read as False) first
    conv_model(tmp_path / "fp32.onnx")
    script = f"""
import os, sys
os.environ.pop("POLYGRAPHY_USE_TENSORRT_RTX", None)
import engineforge.backends.tensorrt as t
HEAVY = ("tensorrt", "tensorrt_rtx_bindings", "polygraphy.backend.trt")
heavy = [m for m in HEAVY if m in sys.modules]
assert not heavy, heavy                          # importing the backend stays light
assert t.TensorRTRTXBackend().availability().ok and not t.TensorRTBackend().availability().ok
heavy = [m for m in HEAVY if m in sys.modules]
assert not heavy, heavy                          # availability reads package metadata only
import polygraphy.config
assert polygraphy.config.USE_TENSORRT_RTX is False
sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(Path(__file__).parent.parent)!r}]
from test_tensorrt import request
from pathlib import Path
res = t.TensorRTRTXBackend().build(request(Path({str(tmp_path)!r}),
                                           Path({str(tmp_path / "fp32.onnx")!r})))
print("BYTES", res["engine_bytes"])
"""
    # execute
    out = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True,
                         text=True, timeout=120)
    # assert
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split("BYTES")[-1]) > 0


# --------------------------------------------------------------------- the build stage
def _tiny_models(tiny_models, tmp_path: Path, **tensorrt) -> dict:
    """A resolved model config whose one profile fits conv_model's input ``x``."""
    m = copy.deepcopy(tiny_models["tinyfcn"])
    m["inputs"] = {"x": {"dtype": "float32", "shape": ["N", C, HW, HW]}}
    m["profiles"] = {"p": ONE[0]}
    m["tensorrt"].update(tensorrt)
    return {"tiny": m}


@pytest.mark.slow
def test_build_stage_writes_typed_result(tiny_models, tiny_workspace, monkeypatch):
    # setup
    monkeypatch.setenv("ENGINEFORGE_CACHE", "0")  # no MLflow build cache here
    tmp = tiny_workspace
    models = _tiny_models(tiny_models, tmp)
    src = conv_model(tmp / "fp32.onnx")
    out = tmp / "artifacts/tiny/build/tensorrt-rtx/fp32/p"
    # execute: the build stage in the runner's worker process
    side = run_stage("build", models, "tiny", {"onnx": src},
                     {"engine": out / "engine.plan", "sidecar": out / "build.json"}, tmp,
                     backend="tensorrt-rtx", precision="fp32", profile="p")
    # assert
    r = BuildResult.model_validate(side["result"])
    assert (r.status, r.backend, r.precision, r.profile) == ("ok", "tensorrt-rtx", "fp32", "p")
    assert r.precision_mode == "graph" and r.build_time_s > 0
    assert r.backend_version == metadata.version("tensorrt_rtx_cu13_bindings")
    assert r.engine_bytes == (out / "engine.plan").stat().st_size > 0
    assert side["outputs"]["engine"]["path"] == str(out / "engine.plan")
    assert r.extra["flavour"] == "tensorrt-rtx" and r.extra["profiles"] == 1
    assert "engine_bytes" not in r.extra and r.extra["timing_cache"]["path"] is None
    assert side["device"] == TensorRTRTXBackend.device_class
    assert side["config"]["profiles"] == [ONE[0]] and side["config"]["backend"] == "tensorrt-rtx"
    assert not list(out.glob(".staging-*")) and not list(out.glob(".*.tmp"))
    # logs and layer info go to the layout's build directory (here: beside the engine)
    work = Path(Layout(str(tmp / "artifacts")).build_dir("tensorrt-rtx", "tiny", "fp32", "p"))
    assert work == out and Path(r.extra["log"]) == work / "tensorrt-rtx-build.log"
    assert json.loads(Path(r.extra["layer_info"]).read_text())["layers"]


def test_build_stage_error_is_a_recorded_failure(tiny_models, tiny_workspace, monkeypatch):
    # setup: an ONNX file TensorRT-RTX cannot parse
    monkeypatch.setenv("ENGINEFORGE_CACHE", "0")
    tmp = tiny_workspace
    (tmp / "garbage.onnx").write_bytes(b"this is not an ONNX model")
    out = tmp / "out"
    # execute
    with pytest.raises(StageFailed) as err:
        run_stage("build", _tiny_models(tiny_models, tmp), "tiny", {"onnx": tmp / "garbage.onnx"},
                  {"engine": out / "engine.plan", "sidecar": out / "build.json"}, tmp,
                  backend="tensorrt-rtx", precision="fp32", profile="p")
    # assert: the BuildError's text, recorded for the end-of-run list; nothing published
    text = str(err.value)
    assert text.startswith("[model=tiny stage=build] tensorrt-rtx could not build the fp32 "
                           "engine from garbage.onnx")
    failures = list((tmp / "artifacts/_failures").glob("*.json"))
    assert [json.loads(f.read_text())["reason"] for f in failures] == [text]
    assert not out.exists() or not any(out.iterdir())
