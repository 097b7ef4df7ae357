"""ONNX Runtime's CUDA provider in this environment, checked without a GPU.

- Every shared library ``libonnxruntime_providers_cuda.so`` needs resolves after
  ``onnxruntime.preload_dlls()`` (``ldd`` with the directories of the libraries it loaded),
  the NVIDIA driver's ``libcuda.so.1`` excepted (no wheel provides it). With the CUDA 12
  build that ``nvidia-modelopt[onnx]`` pins (onnxruntime-gpu 1.24) beside torch's CUDA 13
  libraries this fails (libcublas.so.12, libcudart.so.12, ... not found); with
  onnxruntime-gpu >= 1.27 (CUDA 13, pyproject.toml) it passes.
- A requested CUDA provider that ORT replaced by the CPU one fails the bench with the
  reason. One test drives the real ORT fallback (ORT drops a CUDA provider it cannot
  create on a machine without a GPU); the unit test of ``check_providers`` feeds it the
  provider lists a session reports, with no session at all.
"""

from __future__ import annotations

import ctypes.util
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from engineforge.backends import onnxruntime as ortb
from engineforge.errors import BenchError

CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_every_cuda_provider_dependency_resolves():
    # run
    missing = ortb.cuda_provider_missing()
    # assert
    assert missing == [], (
        f"onnxruntime-gpu {ort.__version__}'s CUDA provider cannot load here: {missing} not "
        "found. The environment is older than pyproject.toml (onnxruntime-gpu>=1.27, CUDA 13): "
        "rerun `make env` in a fresh venv")


def test_the_check_reports_a_library_that_does_not_resolve():
    """Positive control: ORT's TensorRT provider, beside the CUDA one, needs TensorRT's
    libnvinfer, which this environment does not have: the same check names it."""
    # setup
    trt = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_tensorrt.so"
    if not trt.exists() or ctypes.util.find_library("nvinfer"):
        pytest.skip("no TensorRT provider library, or TensorRT is installed")
    # run / assert
    assert any(name.startswith("libnvinfer.so") for name in ortb.unresolved_libraries(trt))


def test_a_dropped_provider_fails_with_the_reason():
    # run / assert: what sessions report after creation
    ortb.check_providers(CUDA, CUDA)
    ortb.check_providers(["CPUExecutionProvider"], ["CPUExecutionProvider"])
    with pytest.raises(BenchError, match=r"CUDAExecutionProvider was requested but ONNX "
                                         r"Runtime ran on CPUExecutionProvider"):
        ortb.check_providers(CUDA, ["CPUExecutionProvider"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: CUDA would run")
@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                    reason="a CPU-only onnxruntime build")
def test_bench_asking_for_cuda_without_a_gpu_is_not_a_cpu_figure(tmp_path, monkeypatch):
    # setup: a tiny model; the backend asks for CUDA as it does where torch sees a GPU
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(net, (torch.randn(1, 3, 8, 8),), tmp_path / "m.onnx", dynamo=False,
                          input_names=["x"])
    knobs = {"threads": 1, "warmup": 1, "iterations": 2}
    backend = ortb.OnnxRuntimeBackend()
    stats = backend.bench(tmp_path / "m.onnx", {"x": [1, 3, 8, 8]}, knobs, tmp_path)
    assert stats["extra"]["providers"] == ["CPUExecutionProvider"]  # control: CPU asked, ran
    monkeypatch.setattr(ortb, "providers", lambda: list(CUDA))
    # run / assert: ORT falls back to CPU by itself; the bench refuses the figure
    with pytest.raises(BenchError, match="CUDAExecutionProvider was requested") as err:
        backend.bench(tmp_path / "m.onnx", {"x": [1, 3, 8, 8]}, knobs, tmp_path)
    assert "\n" not in err.value.message
    assert np.isfinite(stats["p50_ms"])


@pytest.mark.parametrize(("precision", "options"), [
    ("fp32", {"use_tf32": "0"}), ("fp32-repaired", {"use_tf32": "0"}), ("fp16", {}),
    ("int8", {})])
def test_only_fp32_engines_turn_tf32_off(precision, options):
    """ORT's use_tf32=0 also takes the tensor cores from fp16 convolutions (measured on the
    H100): only an engine whose layout place says fp32 gets it. No GPU needed: the options
    are what a session on the CUDA provider would be given."""
    from engineforge.layout import Layout

    # setup: the engine path the workflow gives the build
    engine = Layout("artifacts").engine("onnxruntime", "m", precision, "bs1-8")
    # run / assert (the build writes a temporary file beside the engine first)
    assert ortb.engine_cuda_options(engine) == options
    assert ortb.engine_cuda_options(Path(engine).with_name(".engine.onnx.1.tmp")) == options


def test_a_node_no_provider_takes_is_one_line_naming_it():
    """The error ORT 1.31 gave on the H100 for a bf16 graph whose MaxPool neither the CUDA
    nor the CPU provider has a kernel for (captured there; ORT's assertion text)."""
    # setup
    raw = ("[ONNXRuntimeError] : 1 : FAIL : Exception during initialization: /onnxruntime_src/"
           "onnxruntime/core/optimizer/transformer_memcpy.cc:253 bool onnxruntime::"
           "TransformerMemcpyImpl::IsNodeCompatibleWithProvider(const onnxruntime::Node&) "
           "const !node_provider_type.empty() was false. Provider type for MaxPool node with "
           "name 'node_max_pool2d' is not set.\n")
    # run
    line = ortb.runtime_error(RuntimeError(raw))
    # assert: the op and the node, no C++ source path; other errors keep their first line
    assert line == ("no provider here runs its MaxPool node 'node_max_pool2d' (no kernel for "
                    "that op in this graph's data type)")
    assert ortb.runtime_error(RuntimeError("first\nsecond")) == "first"


def test_a_graph_the_cpu_provider_cannot_load_is_a_result_with_its_reason(tmp_path):
    """A bf16 convolution: ORT's CPU provider has no kernel for it, so the offline
    optimization fails and the model is kept as is. With no GPU here, nothing runs it: the
    build says so, naming the providers it tried (on the H100 the CUDA provider ran such
    graphs: mobilenet_v3_small, outlier_cnn bf16)."""
    import onnx
    from engineforge.backends.base import BuildRequest
    from onnx import TensorProto, helper

    # setup
    w = helper.make_tensor("w", TensorProto.BFLOAT16, [2, 1, 1, 1], [0, 0])
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [1, 2, 4, 4])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]),
              tmp_path / "bf16.onnx")
    req = BuildRequest(model="m", precision="bf16", onnx_path=tmp_path / "bf16.onnx",
                       engine_path=tmp_path / "b" / "engine.onnx", work_dir=tmp_path,
                       profiles=[])
    # run
    facts = ortb.OnnxRuntimeBackend().build(req)
    # assert
    assert facts["status"] == "not_runnable" and "\n" not in facts["reason"]
    assert facts["reason"].startswith("not runnable on onnxruntime (CPUExecutionProvider): ")
    assert "Conv" in facts["reason"] and "Conv" in facts["offline_optimization_error"]
    assert facts["graph_optimization_level"] is None and facts["providers"] == []
    assert (tmp_path / "b" / "engine.onnx").read_bytes() == (tmp_path / "bf16.onnx").read_bytes()
