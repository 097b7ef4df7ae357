"""Stage 3b, ort_quantize: the int8 graph ONNX Runtime's CPU kernels run fastest.

ModelOpt's Q/DQ graph (stages/precision.py) is made for TensorRT; ORT's x86 CPU provider
runs it slower than fp32. This stage writes the int8 variant the way ORT's own docs
recommend for x86-64: ``onnxruntime.quantization.quantize_static`` in QDQ format, weights
int8 per channel, activations uint8 (U8S8, the VPMADDUBSW / VNNI path), calibrated on the
first ``calib_size`` samples of the model's calibration data (the same
``models.<m>.precision.int8`` settings as ModelOpt's). Backends that declare
``quantizers = {"int8": "onnxruntime"}`` build from it (``Layout.quantized``); the TensorRT
backends keep ModelOpt's graph, and each backend's audit covers the graph it built.

Before quantizing, the graph is folded by ``onnxscript.optimizer.optimize`` (the dynamo
exporter's ``CastLike``/``Expand`` bias chains are folded, so BatchNormalization folds into
the convolutions) and prepared by ORT's ``quant_pre_process`` (shape inference + ORT's basic
graph optimizations). fp8 has no ORT counterpart: ORT's CPU provider has no fp8 kernels.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Literal

from engineforge.errors import PrecisionError
from engineforge.results import PrecisionResult
from engineforge.settings import QuantizeSettings, Section
from engineforge.sidecar import scratch_prefix

TOOLS = ("onnx", "onnxruntime-gpu", "onnxruntime", "onnxscript")
LIKELY_FIX = ("exclude the failing nodes or op types (models.<m>.precision.int8."
              "nodes_to_exclude / op_types_to_exclude), or drop onnxruntime for this model")


class Settings(Section):
    precision: Literal["int8"]
    quantize: QuantizeSettings            # models.<m>.precision.int8 (shared with ModelOpt)
    inputs: dict                          # the model's inputs (calibration is read per input)
    # ORT's x86 recommendation: U8S8 QDQ, per-channel weights; reduce_range only helps
    # CPUs without VNNI (saturation of VPMADDUBSW), at an accuracy cost on VNNI ones.
    quant_format: Literal["QDQ"] = "QDQ"
    activation_type: Literal["QUInt8"] = "QUInt8"
    weight_type: Literal["QInt8"] = "QInt8"
    per_channel: bool = True
    reduce_range: bool = False


def settings(m: dict, w: dict) -> Settings:
    return Settings(precision=w["precision"], quantize=QuantizeSettings(**m["precision"]["int8"]),
                    inputs=m["inputs"])


def cache_group(job) -> str:
    """The MLflow folder and cache tag tracking gives it (``precision/int8/onnxruntime``)."""
    return f"precision.{job.precision}/onnxruntime"


def describe(s: Settings) -> str:
    """How the summary names this quantizer."""
    kinds = {"QUInt8": "u8", "QInt8": "s8"}
    channel = "per-channel" if s.per_channel else "per-tensor"
    return (f"onnxruntime quantize_static {s.quant_format} {channel} "
            f"{kinds[s.activation_type]}/{kinds[s.weight_type]}"
            + (" reduce_range" if s.reduce_range else ""))


class _Reader:
    """``CalibrationDataReader``: one sample at a time (any static batch dim of 1 works)."""

    def __init__(self, data: dict) -> None:
        n = len(next(iter(data.values())))
        self._feeds = iter([{k: v[i:i + 1] for k, v in data.items()} for i in range(n)])

    def get_next(self):
        return next(self._feeds, None)


def _quantize(s: Settings, fp32: Path, out: Path, data: dict, scratch: Path) -> None:
    import onnx
    import onnxscript.optimizer
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    q = s.quantize
    proto = onnxscript.optimizer.optimize(onnx.load(str(fp32)))
    folded, prepared = scratch / "folded.onnx", scratch / "prepared.onnx"
    onnx.save(proto, str(folded))
    quant_pre_process(str(folded), str(prepared))
    op_types = None
    if q.op_types_to_exclude:
        present = {n.op_type for n in onnx.load(str(prepared), load_external_data=False)
                   .graph.node}
        op_types = sorted(present - set(q.op_types_to_exclude))
    quantize_static(
        str(prepared), str(out), _Reader(data),
        quant_format=getattr(QuantFormat, s.quant_format),
        activation_type=getattr(QuantType, s.activation_type),
        weight_type=getattr(QuantType, s.weight_type),
        per_channel=s.per_channel, reduce_range=s.reduce_range,
        calibrate_method={"max": CalibrationMethod.MinMax,
                          "entropy": CalibrationMethod.Entropy}[q.calibration_method],
        op_types_to_quantize=op_types, nodes_to_exclude=list(q.nodes_to_exclude) or None)


def run(job) -> PrecisionResult:
    import onnx

    from engineforge.stages.precision import _calibration, _summary

    s: Settings = job.settings
    out = job.outputs["onnx"]
    data = _calibration(job.model, s.inputs, s.precision, job.inputs.get("calibration"),
                        s.quantize.calib_size)
    # the quantizer writes side files (augmented model, pre-processed graph): a private dir
    scratch = Path(tempfile.mkdtemp(prefix=scratch_prefix(), dir=out.parent.parent))
    start = time.perf_counter()
    try:
        _quantize(s, job.inputs["onnx"], out, data, scratch)
    except Exception as err:  # noqa: BLE001 - any quantizer failure is one line
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:400]
        key = f"models.{job.model}.precision.int8"
        raise PrecisionError(
            f"ONNX Runtime quantize_static to {s.precision} failed: {reason}",
            model=job.model, key=key,
            fix=f"exclude the failing nodes or op types ({key}.nodes_to_exclude / "
                "op_types_to_exclude), or drop onnxruntime from "
                f"models.{job.model}.backends") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    elapsed = time.perf_counter() - start
    onnx.checker.check_model(str(out))
    summary = _summary(out)
    if not summary["quantize_linear"]:
        raise PrecisionError("ONNX Runtime quantize_static quantized no node",
                             model=job.model, key=f"models.{job.model}.precision.int8",
                             fix="check op_types_to_exclude / nodes_to_exclude")
    return PrecisionResult(
        precision=s.precision, method="ort_qdq", time_s=round(elapsed, 3),
        bytes=out.stat().st_size, **summary,
        extra={"quantizer": describe(s), "calibration_samples": len(next(iter(data.values()))),
               "preprocess": ["onnxscript.optimizer.optimize", "quant_pre_process"]})
