"""Tests for engineforge.stages.ort_quantize: ONNX Runtime's own int8 (quantize_static QDQ,
per-channel int8 weights, uint8 activations) on a tiny conv-BN net, through the real runner."""

from __future__ import annotations

import json
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


def test_a_graph_ort_symbolic_shape_inference_fails_on_is_quantized_without_it(tmp_path):
    """A Constant written with value_ints (as exporters write shapes; the unoptimized export
    of torchvision's ViT has them): ORT's symbolic shape inference, quant_pre_process's first
    step, crashes on it (onnxruntime 1.24 and 1.31). The stage runs quant_pre_process again
    without it and records that."""
    from onnx import TensorProto, helper
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # setup: x [batch, 2, 2] -> Reshape(Constant value_ints [-1, 4]) -> MatMul(w [4, 3])
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["shape"], value_ints=[-1, 4]),
         helper.make_node("Reshape", ["input", "shape"], ["flat"]),
         helper.make_node("MatMul", ["flat", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    fp32 = tmp_path / "fp32.onnx"
    onnx.save(model, str(fp32))
    with pytest.raises(Exception):  # noqa: B017 - the premise: ORT's own step fails here
        quant_pre_process(str(fp32), str(tmp_path / "prepared.onnx"))
    calib = rng.standard_normal((8, 2, 2)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", input=calib)
    m = deep_merge(builtin_defaults(), {"inputs": {"input": {"shape": ["batch", 2, 2]}},
                                        "calibration": {"path": str(tmp_path / "calib.npz")}})
    m["precision"]["int8"]["calib_size"] = 8
    # run
    sidecar = run_stage("ort_quantize", {"net": m}, "net",
                        {"onnx": fp32, "calibration": m["calibration"]["path"]},
                        {"onnx": tmp_path / "out/model.onnx",
                         "sidecar": tmp_path / "out/precision.json"},
                        tmp_path / "ws", precision="int8")
    # assert: quantized, the step recorded, and it computes what fp32 computes
    steps = sidecar["result"]["extra"]["preprocess"]
    assert len(steps) == 1 and steps[0].startswith("quant_pre_process(skip_symbolic_shape=True)")
    assert sidecar["result"]["quantize_linear"] > 0
    ref, got = _infer(fp32, calib), _infer(tmp_path / "out/model.onnx", calib)
    assert float(ref @ got / np.linalg.norm(ref) / np.linalg.norm(got)) > 0.99


# -- int8-repaired: ORT's graph with the repair's kept nodes left unquantized -----------------
class Branchy(torch.nn.Module):
    """conv_a -> BN -> relu -> (conv_b, conv_c) -> add -> mean -> fc: the relu's output feeds
    a kept node (conv_b) and a quantized one (conv_c); BN folds into conv_a (renamed)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16)
        self.b, self.c = torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.Conv2d(16, 16, 1)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.a(x)))
        return self.fc((self.b(h) + self.c(h)).mean((2, 3)))


@pytest.fixture(scope="module")
def branchy(zoo) -> Path:
    torch.manual_seed(0)
    net = Branchy().eval()
    net.bn.running_mean.uniform_(-0.5, 0.5)
    net.bn.running_var.uniform_(0.5, 2.0)
    path = zoo["root"] / "branchy.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # PRESERVE: the BatchNormalization stays in the fp32 graph (as the dynamo exporter's
        # does), so ORT's folding renames the conv it folds into
        torch.onnx.export(net, (torch.randn(2, 3, 16, 16),), path, dynamo=False,
                          opset_version=17, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          training=torch.onnx.TrainingMode.PRESERVE)
    return path


def _repair_record(path: Path, excluded: list[str]) -> Path:
    """A repair stage's sidecar as ort_quantize reads it (its record of the kept nodes):
    written here instead of running ModelOpt's repair rounds."""
    from engineforge.results import PrecisionResult

    result = PrecisionResult(
        precision="int8-repaired", method="qdq", time_s=0.0, bytes=0, nodes=0, cast=0,
        quantize_linear=0, dequantize_linear=0, op_types={}, initializer_dtypes={},
        extra={"repair": {"status": "repaired", "from": "int8", "excluded_nodes": excluded}})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"result": result.model_dump()}))
    return path


def _run_repaired(zoo, fp32: Path, excluded: list[str], tmp: Path) -> dict:
    m = zoo["m"]
    return run_stage("ort_quantize", {"tiny": m}, "tiny",
                     {"onnx": fp32, "calibration": m["calibration"]["path"],
                      "repair": _repair_record(tmp / "repair" / "precision.json", excluded)},
                     {"onnx": tmp / "out" / "model.onnx",
                      "sidecar": tmp / "out" / "precision.json"},
                     tmp / "ws", precision="int8-repaired")


def _quantized_inputs(path: Path) -> dict[str, list[str]]:
    """node -> its activation inputs read through DequantizeLinear(QuantizeLinear(...))."""
    graph = onnx.load(str(path)).graph
    made = {o: n for n in graph.node for o in n.output}
    q_dq = {dq.output[0] for dq in graph.node if dq.op_type == "DequantizeLinear"
            and dq.input[0] in made and made[dq.input[0]].op_type == "QuantizeLinear"}
    return {n.name: [i for i in n.input if i in q_dq] for n in graph.node}


def test_repaired_keeps_the_node_and_its_input_chain_float_the_rest_int8(zoo, branchy,
                                                                          tmp_path):
    # setup: the plain ORT int8 graph, where /b/Conv reads a Q/DQ'd activation (control)
    run_stage("ort_quantize", {"tiny": zoo["m"]}, "tiny",
              {"onnx": branchy, "calibration": zoo["m"]["calibration"]["path"]},
              {"onnx": tmp_path / "plain/model.onnx", "sidecar": tmp_path / "plain/p.json"},
              tmp_path / "ws0", precision="int8")
    assert _quantized_inputs(tmp_path / "plain/model.onnx")["/b/Conv"]
    # run: the repair kept /b/Conv
    sidecar = _run_repaired(zoo, branchy, ["/b/Conv"], tmp_path)
    out = tmp_path / "out" / "model.onnx"
    graph = onnx.load(str(out)).graph
    # assert: /b/Conv reads the relu's float output and its float weight; /c/Conv, which
    # reads the same relu, is still quantized (the tensor's Q/DQ stays for it)
    reads = _quantized_inputs(out)
    assert reads["/b/Conv"] == [] and reads["/c/Conv"]
    made = {o: n for n in graph.node for o in n.output}
    b = next(n for n in graph.node if n.name == "/b/Conv")
    assert made[b.input[0]].op_type == "Relu"
    inits = {t.name: t for t in graph.initializer}
    assert inits[b.input[1]].data_type == onnx.TensorProto.FLOAT
    assert inits[made[next(n for n in graph.node if n.name == "/c/Conv").input[1]]
                 .input[0]].data_type == onnx.TensorProto.INT8
    result = sidecar["result"]
    assert result["precision"] == "int8-repaired" and result["method"] == "ort_qdq"
    kept = result["extra"]["kept_in_float"]
    assert kept["ort_nodes"] == {"/b/Conv": ["/b/Conv"]} and "/Relu" in kept["unquantized"]
    # it still computes what fp32 computes
    ref, got = _infer(branchy, zoo["x"]), _infer(out, zoo["x"])
    assert float(ref @ got / np.linalg.norm(ref) / np.linalg.norm(got)) > 0.99


def test_a_kept_node_folded_away_is_found_by_what_it_computes(zoo, branchy, tmp_path):
    # setup: /a/Conv is gone from ORT's folded graph (its BatchNormalization folded into it)
    fp32 = {n.name: n for n in onnx.load(str(branchy)).graph.node}
    bn = next(n for n in fp32.values() if n.op_type == "BatchNormalization")
    assert bn.input[0] == fp32["/a/Conv"].output[0]
    # run
    sidecar = _run_repaired(zoo, branchy, ["/a/Conv"], tmp_path)
    # assert: it maps to the conv now computing the BN's output, which is left unquantized
    out = tmp_path / "out" / "model.onnx"
    graph = onnx.load(str(out)).graph
    (name,) = sidecar["result"]["extra"]["kept_in_float"]["ort_nodes"]["/a/Conv"]
    conv = next(n for n in graph.node if n.name == name)
    assert conv.op_type == "Conv" and conv.output[0] == bn.output[0]
    assert _quantized_inputs(out)[name] == [] and conv.input[0] == "input"
    assert _quantized_inputs(out)["/b/Conv"]  # not kept: quantized (positive control)


def test_a_kept_node_missing_from_the_graph_fails_in_one_line(zoo, branchy, tmp_path):
    with pytest.raises(StageFailed, match=r"key=models\.tiny\.repair\] the repair keeps "
                                          r"node\(s\) /no/Such in high precision") as err:
        _run_repaired(zoo, branchy, ["/b/Conv", "/no/Such"], tmp_path)
    assert "\n" not in str(err.value) and "model=tiny" in str(err.value)
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_summary_names_ort_quantizer_for_onnxruntime_int8_repaired(tmp_path):
    # setup: int8-repaired as the repair made it (ModelOpt) and as ort_quantize made it
    from engineforge.layout import Layout
    from engineforge.results import PrecisionResult
    from engineforge.stages import summary

    lay = Layout(str(tmp_path / "artifacts"))
    common = dict(precision="int8-repaired", time_s=0.0, nodes=1, cast=0, quantize_linear=1,
                  dequantize_linear=1, op_types={}, initializer_dtypes={})
    for path, result in (
            (lay.precision("precision.json", "m", "int8-repaired"),
             PrecisionResult(method="qdq", bytes=2**20, **common)),
            (lay.quantized("precision.json", "onnxruntime", "m", "int8-repaired"),
             PrecisionResult(method="ort_qdq", bytes=2**19, extra={"quantizer": "ORT qs"},
                             **common))):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"result": result.model_dump()}))
    s = summary.Settings(models={"m": {"precisions": ["int8-repaired"], "profile": "p",
                                       "backends": ["onnxruntime", "tensorrt-rtx"]}},
                         skipped_backends={})
    # run
    rows = {r["backend"]: r for r in summary.collect(lay, s)["rows"]}
    # assert: each backend's row names the graph it built from
    assert (rows["onnxruntime"]["quantizer"], rows["onnxruntime"]["onnx_mib"]) == ("ORT qs", 0.5)
    assert (rows["tensorrt-rtx"]["quantizer"], rows["tensorrt-rtx"]["onnx_mib"]) == (
        "ModelOpt Q/DQ", 1.0)
