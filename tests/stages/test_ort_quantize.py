"""Tests for engineforge.stages.ort_quantize: ONNX Runtime's own int8 (quantize_static QDQ,
per-channel int8 weights, uint8 activations) on a tiny conv-BN net, through the real runner."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import run_stage
from engineforge.config import builtin_defaults, deep_merge
from engineforge.runner import StageFailed
from onnx import numpy_helper


class ConvBN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
            torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.BatchNorm2d(64), torch.nn.ReLU())
        self.fc = torch.nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).mean((2, 3)))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("zoo")
    torch.manual_seed(0)
    net = ConvBN().eval()
    for bn in (net.body[1], net.body[4]):  # non-trivial BN statistics to fold
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(net, (torch.randn(2, 3, 16, 16),), root / "fp32.onnx", dynamo=False,
                          opset_version=17, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    rng = np.random.default_rng(0)
    np.savez(root / "calib.npz", input=rng.standard_normal((16, 3, 16, 16)).astype(np.float32))
    m = deep_merge(builtin_defaults(), {
        "inputs": {"input": {"shape": ["batch", 3, 16, 16]}},
        "calibration": {"path": str(root / "calib.npz")},
    })
    m["precision"]["int8"]["calib_size"] = 16
    return {"root": root, "m": m, "x": rng.standard_normal((4, 3, 16, 16)).astype(np.float32)}


def _run(zoo, out_dir: Path, workspace: Path, m: dict | None = None) -> dict:
    m = m or zoo["m"]
    return run_stage("ort_quantize", {"tiny": m}, "tiny",
                     {"onnx": zoo["root"] / "fp32.onnx", "calibration": m["calibration"]["path"]},
                     {"onnx": out_dir / "model.onnx", "sidecar": out_dir / "precision.json"},
                     workspace, precision="int8")


def _infer(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0].ravel()


def test_int8_graph_is_ort_qdq_per_channel_u8s8_and_agrees_with_fp32(zoo, tmp_path):
    # run
    sidecar = _run(zoo, tmp_path / "out", tmp_path / "ws")
    out = tmp_path / "out" / "model.onnx"
    proto = onnx.load(str(out))
    inits = {t.name: t for t in proto.graph.initializer}
    # assert: the sidecar says who made it; BN folded away; every conv weight int8 per channel
    result = sidecar["result"]
    assert result["method"] == "ort_qdq"
    assert result["extra"]["quantizer"] == "onnxruntime quantize_static QDQ per-channel u8/s8"
    assert result["quantize_linear"] > 0
    ops = {n.op_type for n in proto.graph.node}
    assert "BatchNormalization" not in ops
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    assert len(convs) == 2
    producers = {o: n for n in proto.graph.node for o in n.output}
    for conv in convs:
        dq = producers[conv.input[1]]  # weight: DequantizeLinear(int8 weight, scale per channel)
        assert dq.op_type == "DequantizeLinear"
        weight, scale = inits[dq.input[0]], numpy_helper.to_array(inits[dq.input[1]])
        assert weight.data_type == onnx.TensorProto.INT8
        assert scale.shape == (weight.dims[0],)  # one scale per output channel
        act = producers[conv.input[0]]  # activation: Q/DQ with a uint8 zero point
        assert act.op_type == "DequantizeLinear"
        assert inits[act.input[2]].data_type == onnx.TensorProto.UINT8
    # assert: it computes what the fp32 graph computes, to int8 accuracy
    ref, got = _infer(zoo["root"] / "fp32.onnx", zoo["x"]), _infer(out, zoo["x"])
    cosine = float(ref @ got / np.linalg.norm(ref) / np.linalg.norm(got))
    assert 0.99 < cosine < 1.0  # < 1: really quantized


def test_excluded_op_types_stay_float(zoo, tmp_path):
    # setup: Conv excluded (models.<m>.precision.int8.op_types_to_exclude, as for ModelOpt)
    m = deep_merge(zoo["m"], {"precision": {"int8": {"op_types_to_exclude": ["Conv"]}}})
    # run
    _run(zoo, tmp_path / "out", tmp_path / "ws", m)
    proto = onnx.load(str(tmp_path / "out" / "model.onnx"))
    # assert: conv weights stay float; the Gemm (not excluded) is quantized (positive control)
    inits = {t.name: t for t in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    conv_weights = [n.input[1] for n in proto.graph.node if n.op_type == "Conv"]
    assert conv_weights and all(inits[w].data_type == onnx.TensorProto.FLOAT
                                for w in conv_weights if w in inits)
    assert all(w in inits for w in conv_weights)
    gemm = next(n for n in proto.graph.node if n.op_type in ("Gemm", "MatMul"))
    assert producers[gemm.input[1]].op_type == "DequantizeLinear"


def test_too_few_calibration_samples_is_one_line(zoo, tmp_path):
    # setup: 16 samples on disk, 64 asked for
    m = deep_merge(zoo["m"], {"precision": {"int8": {"calib_size": 64}}})
    # run / assert
    with pytest.raises(StageFailed, match=r"has 16 samples of 'input', int8 needs 64") as err:
        _run(zoo, tmp_path / "out", tmp_path / "ws", m)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out" / "model.onnx").exists()
