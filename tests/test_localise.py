"""Localisation: the node where a variant's drift enters, found by comparing intermediate
tensors of real ModelOpt variants (AutoCast fp16, Q/DQ int8) with the fp32 graph."""

import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from driftnets import Outliers  # tests/fixtures (the repair stage's tests use it too)
from engineforge.localise import Drift, localise, variant_names
from engineforge.stages.audit import cosine, snr_db
from engineforge.stages.precision import _quiet_modelopt
from torch import nn


class Scaled(nn.Module):
    """Conv -> x*scale -> square (Pow) -> /scale**2 -> pool -> linear. With scale 1000 the
    square exceeds the fp16 range (65504) in the Pow node alone."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = torch.pow(self.conv(x) * self.scale, 2) / self.scale ** 2
        return self.fc(y.mean((2, 3)))


def export(module: nn.Module, path: Path) -> Path:
    torch.manual_seed(0)
    with warnings.catch_warnings():  # the legacy exporter's deprecation notice
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(module.eval(), (torch.rand(2, 3, 8, 8),), path, dynamo=False,
                          opset_version=17, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    return path


def autocast(onnx_in: Path, out: Path, precision: str = "fp16") -> Path:
    """As stages/precision.py calls AutoCast, but with data_max unbounded: the magnitude rule
    would otherwise keep the overflowing node in fp32 (the drift this test needs)."""
    from modelopt.onnx.autocast import convert_to_mixed_precision
    from modelopt.onnx.utils import save_onnx

    with _quiet_modelopt():
        proto = convert_to_mixed_precision(
            onnx_path=str(onnx_in), low_precision_type=precision, keep_io_types=True,
            data_max=float("inf"), init_max=65504, nodes_to_exclude=[],
            op_types_to_exclude=[], calibration_data=None, providers=["cpu"])
    save_onnx(proto, str(out))
    return out


def quantize_int8(onnx_in: Path, out: Path, calib: np.ndarray) -> Path:
    """As stages/precision.py calls ModelOpt Q/DQ, on a private copy of the input."""
    from modelopt.onnx.quantization import quantize

    scratch = Path(tempfile.mkdtemp(dir=out.parent))
    try:
        private = scratch / onnx_in.name
        shutil.copyfile(onnx_in, private)
        with _quiet_modelopt():
            quantize(onnx_path=str(private), quantize_mode="int8",
                     calibration_data={"x": calib}, calibration_method="max",
                     calibration_eps=["cpu"], op_types_to_exclude=None, nodes_to_exclude=None,
                     high_precision_dtype="fp32", output_path=str(out), log_level="WARNING")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out


def feed(n: int = 6, seed: int = 1) -> dict:
    return {"x": np.random.default_rng(seed).random((n, 3, 8, 8), dtype=np.float32)}


def node_of(path: Path, op_type: str) -> str:
    names = [n.name for n in onnx.load(str(path)).graph.node if n.op_type == op_type]
    assert len(names) == 1, names
    return names[0]


def producer(path: Path, tensor: str) -> str:
    return next(n.name for n in onnx.load(str(path)).graph.node if tensor in n.output)


@pytest.fixture(scope="module")
def fp16(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fp16")
    out = {}
    for name, scale in (("overflow", 1000.0), ("control", 1.0)):
        fp32 = export(Scaled(scale), root / f"{name}.onnx")
        out[name] = (fp32, autocast(fp32, root / f"{name}_fp16.onnx"))
    return out


@pytest.fixture(scope="module")
def int8(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("int8")
    fp32 = export(Outliers(), root / "outliers.onnx")
    return fp32, quantize_int8(fp32, root / "outliers_int8.onnx", feed(16, seed=0)["x"])


def test_fp16_overflow_is_localised_to_the_square(fp16):
    fp32, variant = fp16["overflow"]
    pow_node = node_of(variant, "Pow")
    assert pow_node in {n.name for n in onnx.load(str(fp32)).graph.node}

    result = localise(fp32, variant, feed(), batch=4)

    assert result.status == "localised" and result.runtime == "onnxruntime-cpu"
    assert (result.first.node, result.first.op_type) == (pow_node, "Pow")
    assert result.first.fp32_peak_abs > 65504 and result.first.non_finite > 0
    assert result.first.cosine is None and result.first.snr_in_db > 40
    # everything after it drifts too, but it adds the most error
    assert result.worst[0].node == pow_node
    assert result.first.snr_out_db == -200  # inf in the variant: the worst SNR, not NaN
    div = next(d for d in result.worst if d.op_type == "Div")
    assert div.snr_out_db < 40 and div.drop_db < result.first.drop_db  # drifts, adds less
    assert result.time_s > 0 and result.peak_mem_mb > 0


def test_fp16_control_crosses_no_threshold(fp16):
    fp32, variant = fp16["control"]
    assert node_of(variant, "Pow")  # the same graph, run in fp16 (Cast nodes inserted)
    assert any(n.op_type == "Cast" for n in onnx.load(str(variant)).graph.node)

    result = localise(fp32, variant, feed(), batch=4)

    assert result.status == "clean" and result.first is None
    assert result.compared >= 5 and result.worst
    assert all(d.snr_out_db > 40 and d.non_finite == 0 for d in result.worst)


def test_int8_outlier_channels_localised_to_their_conv(int8):
    fp32, variant = int8
    proto = onnx.load(str(variant))
    assert any(n.op_type == "DequantizeLinear" for n in proto.graph.node)
    conv_b = producer(fp32, next(n.output[0] for n in onnx.load(str(fp32)).graph.node
                                 if n.op_type == "Conv" and "conv_b" in n.input[1]))

    result = localise(fp32, variant, feed(), batch=4)

    assert result.worst[0].node == conv_b and result.worst[0].op_type == "Conv"
    assert result.first is not None and result.first.node == conv_b
    # its input is compared before its Q/DQ pair: the conv takes the blame, not its input
    assert result.worst[0].snr_in_db > result.worst[0].snr_out_db + 10


def test_drift_accumulated_per_batch_equals_the_audits_metrics():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((6, 5)).astype(np.float32)
    var = (ref + 0.01 * rng.standard_normal((6, 5))).astype(np.float32)
    drift = Drift()
    for rows in (slice(0, 4), slice(4, 6)):
        drift.add(ref[rows], var[rows])
    assert drift.snr == pytest.approx(snr_db(ref, var), abs=1e-9)
    assert drift.cosine == pytest.approx(cosine(ref, var), abs=1e-12)
    assert drift.peak == pytest.approx(np.abs(ref).max()) and drift.bad == 0
    exact = Drift()
    exact.add(ref, ref)
    assert exact.snr == 200.0 and exact.cosine == pytest.approx(1.0)
    for bad in (np.nan, np.inf):  # a variant's NaN or Inf scores the worst, never NaN
        broken = Drift()
        broken.add(ref, np.where(ref > 1, bad, ref))
        assert (broken.snr, broken.cosine, broken.bad) == (-200.0, None, int((ref > 1).sum()))


def test_tensor_names_map_back_across_qdq_and_casts(int8, fp16):
    for fp32, variant in (int8, fp16["overflow"]):
        mapping = variant_names(onnx.load(str(fp32)), onnx.load(str(variant)))
        producers = {o: n for n in onnx.load(str(variant)).graph.node for o in n.output}
        for source in mapping.values():  # every value is read where a real op computes it
            assert producers[source].op_type not in {"QuantizeLinear", "DequantizeLinear"}
    # the fp16 graph output is an inserted Cast's (keep_io_types): read where Gemm computes it
    assert producers["y"].op_type == "Cast"
    assert mapping["y"] != "y" and producers[mapping["y"]].op_type == "Gemm"


def test_bf16_runs_emulated_and_keeps_the_range(fp16, tmp_path):
    """ORT's CPU provider has no bf16 kernels: the variant runs on onnx.reference. bf16 has
    fp32's exponent range, so the square that overflows fp16 (the positive control, above)
    stays finite here and nothing crosses the thresholds."""
    fp32, _ = fp16["overflow"]
    variant = autocast(fp32, tmp_path / "overflow_bf16.onnx", "bf16")

    result = localise(fp32, variant, feed(), batch=4)

    assert result.runtime == "onnx-reference" and result.status == "clean"
    square = next(d for d in result.worst if d.op_type == "Pow")
    assert square.fp32_peak_abs > 65504 and square.non_finite == 0 and square.snr_out_db > 30


def test_bounded_passes_equal_one_pass(fp16):
    fp32, variant = fp16["overflow"]
    one = localise(fp32, variant, feed(), batch=4, max_outputs_per_pass=1000)
    small = localise(fp32, variant, feed(), batch=4, max_outputs_per_pass=2)

    assert one.passes == 1 and small.passes > 2
    skip = {"time_s", "peak_mem_mb", "max_rss_mb", "passes"}
    assert small.model_dump(exclude=skip) == one.model_dump(exclude=skip)
