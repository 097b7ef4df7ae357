"""Stage 3, precision: one strongly typed ONNX per precision (precision lives in the graph).

- fp32: the input ONNX, copied as is.
- fp16 / bf16: ModelOpt AutoCast (``modelopt.onnx.autocast.convert_to_mixed_precision``);
  nodes whose reference values exceed ``data_max`` / ``init_max`` stay fp32. The reference
  run uses Polygraphy's seeded random inputs, so fp16/bf16 do not depend on calib data.
- int8 / fp8: ModelOpt explicit Q/DQ (``modelopt.onnx.quantization.quantize``), calibrated
  on CPU with the first ``calib_size`` samples of the model's calibration data.

ModelOpt writes into the runner's staging directory; the result (with any external data
file) is published only after ``onnx.checker`` accepts it.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from engineforge import modelio
from engineforge.errors import PrecisionError
from engineforge.results import PrecisionResult
from engineforge.settings import (
    QUANTIZED,
    AutocastSettings,
    Fp32Settings,
    QuantizeSettings,
    Section,
)
from engineforge.sidecar import scratch_prefix

log = logging.getLogger(__name__)

TOOLS = ("onnx", "nvidia-modelopt", "onnxruntime-gpu")
METHODS = {"fp32": "copy", "fp16": "autocast", "bf16": "autocast", "int8": "qdq", "fp8": "qdq"}


class Settings(Section):
    precision: str
    method: AutocastSettings | QuantizeSettings | Fp32Settings
    inputs: dict | None = None    # the model's inputs (quantized variants read calibration)


def settings(m: dict, w: dict) -> Settings:
    p = w["precision"]
    kind = {"copy": Fp32Settings, "autocast": AutocastSettings, "qdq": QuantizeSettings}
    return Settings(precision=p, method=kind[METHODS[p]](**m["precision"][p]),
                    inputs=m["inputs"] if p in QUANTIZED else None)


def cache_group(job) -> str:
    return f"precision.{job.precision}"


@contextlib.contextmanager
def _quiet_modelopt():
    """ModelOpt's log records go to Python logging (WARNING and up), its prints to DEBUG."""

    def reroute() -> None:  # ModelOpt installs stdout handlers at import and in quantize()
        for name in ("modelopt.onnx", "modelopt.onnx.autocast"):
            logger = logging.getLogger(name)
            logger.setLevel(logging.WARNING)
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            logger.propagate = True

    reroute()
    # No stdout redirection: jobs share one process (threads), and sys.stdout is global.
    try:
        yield
    finally:
        reroute()


def _calibration(model: str, inputs: dict, precision: str, path: Path | None,
                 n: int | None) -> dict[str, np.ndarray]:
    """The first ``n`` samples (all if None) of every input, cast to the input's dtype."""
    if path is None:
        raise PrecisionError(f"{precision} needs calibration data.", model=model,
                             key=f"models.{model}.calibration",
                             fix="add calibration: {path: calib/<file>.npz}")
    # readable, finite, one array per input of the input's rank and static dims
    data = modelio.load_data(path, inputs, model=model, section="calibration",
                             error_cls=PrecisionError)
    for name, arr in data.items():
        if n is not None and len(arr) < n:
            lower = (f" or lower models.{model}.precision.{precision}.calib_size"
                     if precision in ("int8", "fp8") else "")
            raise PrecisionError(
                f"calibration data '{path}' has {len(arr)} samples of '{name}', "
                f"{precision} needs {n}.", model=model, key=f"models.{model}.calibration.path",
                fix=f"add samples{lower}")
    return {name: np.ascontiguousarray(arr[:n]) for name, arr in data.items()}


def _autocast(job, onnx_in: Path, out: Path) -> dict:
    from modelopt.onnx.autocast import convert_to_mixed_precision
    from modelopt.onnx.utils import save_onnx

    # Polygraphy's seeded random inputs (AutoCast's default) drive the node classification:
    # deterministic, and fp16/bf16 stay independent of the calibration data (only the
    # quantized variants rebuild when it changes).
    s = job.settings.method
    with _quiet_modelopt():
        proto = convert_to_mixed_precision(
            onnx_path=str(onnx_in), low_precision_type=job.precision,
            keep_io_types=s.keep_io_types, data_max=s.data_max, init_max=s.init_max,
            nodes_to_exclude=list(s.nodes_to_exclude),
            op_types_to_exclude=list(s.op_types_to_exclude),
            calibration_data=None, providers=["cpu"])
    save_onnx(proto, str(out))  # switches to external data above 2 GB
    return {"reference_data": "random"} | _type_split(proto)


def _qdq(job, onnx_in: Path, out: Path) -> dict:
    s = job.settings.method
    data = _calibration(job.model, job.settings.inputs, job.precision,
                        job.inputs.get("calibration"), s.calib_size)
    # ModelOpt rewrites the file it quantizes (value_info, duplicated constants): give it a
    # private copy, outside the staging directory, never the published input.
    scratch = Path(tempfile.mkdtemp(prefix=scratch_prefix(), dir=out.parent.parent))
    try:
        private = scratch / onnx_in.name
        for rel in _external_files(onnx_in):
            shutil.copyfile(onnx_in.parent / rel, scratch / rel)
        shutil.copyfile(onnx_in, private)
        _quantize(job, s, private, out, data)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"calibration_samples": len(next(iter(data.values())))}


def _quantize(job, s, onnx_in: Path, out: Path, data: dict) -> None:
    from modelopt.onnx.quantization import quantize

    with _quiet_modelopt():
        quantize(onnx_path=str(onnx_in), quantize_mode=job.precision, calibration_data=data,
                 calibration_method=s.calibration_method, calibration_eps=["cpu"],
                 op_types_to_exclude=list(s.op_types_to_exclude) or None,
                 nodes_to_exclude=list(s.nodes_to_exclude) or None,
                 high_precision_dtype=s.high_precision_dtype, output_path=str(out),
                 log_level="WARNING")


def _type_split(proto) -> dict:
    """Non-Cast nodes computing in fp32 vs in the low precision (from inferred types)."""
    import onnx

    try:
        graph = onnx.shape_inference.infer_shapes(proto).graph
    except Exception:  # noqa: BLE001 - a summary only; >2 GB protos cannot be inferred in memory
        return {}
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*graph.value_info, *graph.input, *graph.output]}
    first = [types.get(n.output[0]) for n in graph.node if n.op_type != "Cast" and n.output]
    low = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    return {"high_precision_nodes": sum(t == onnx.TensorProto.FLOAT for t in first),
            "low_precision_nodes": sum(t in low for t in first)}


def _external_files(path: Path) -> list[str]:
    """External data files an ONNX file refers to (relative to its directory)."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    proto = onnx.load(str(path), load_external_data=False)
    return sorted({ExternalDataInfo(t).location for t in proto.graph.initializer
                   if uses_external_data(t)})


def _summary(path: Path) -> dict:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    ops = Counter(n.op_type for n in proto.graph.node)
    inits = Counter(onnx.TensorProto.DataType.Name(t.data_type) for t in proto.graph.initializer)
    return {"nodes": sum(ops.values()), "cast": ops["Cast"],
            "quantize_linear": ops["QuantizeLinear"],
            "dequantize_linear": ops["DequantizeLinear"], "op_types": dict(sorted(ops.items())),
            "initializer_dtypes": dict(sorted(inits.items())),
            "opset": max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
                         default=None)}


def run(job) -> PrecisionResult:
    """Write the ``precision`` variant of the simplified ONNX (the runner publishes it with
    any external data file, only after ``onnx.checker`` accepted it)."""
    import onnx

    model, precision = job.model, job.precision
    onnx_in, out = job.inputs["onnx"], job.outputs["onnx"]
    method = METHODS[precision]
    if method != "copy":  # import first, so that time_s is the conversion alone
        importlib.import_module("modelopt.onnx." + ("autocast" if method == "autocast"
                                                    else "quantization"))
    start = time.perf_counter()
    extra: dict = {}
    if method == "copy":
        for rel in _external_files(onnx_in):
            shutil.copyfile(onnx_in.parent / rel, out.parent / rel)
        shutil.copyfile(onnx_in, out)
    else:
        convert = _autocast if method == "autocast" else _qdq
        try:
            extra = convert(job, onnx_in, out)
        except PrecisionError:
            raise
        except Exception as err:  # noqa: BLE001 - any ModelOpt failure is one line
            reason = " ".join(f"{type(err).__name__}: {err}".split())
            key = f"models.{model}.precision.{precision}"
            raise PrecisionError(
                f"ModelOpt {method} to {precision} failed: {reason}", model=model, key=key,
                fix=f"exclude the failing nodes or op types ({key}.nodes_to_exclude / "
                    f"op_types_to_exclude) or drop {precision} from "
                    f"models.{model}.precisions") from None
    elapsed = time.perf_counter() - start
    try:
        onnx.checker.check_model(str(out))  # path-based: works above 2 GB too
    except onnx.checker.ValidationError as err:
        raise PrecisionError(
            f"{precision} ONNX fails onnx.checker: {' '.join(str(err).split())}",
            model=model, key=f"models.{model}.precision.{precision}",
            fix="report it with the input ONNX; exclude the offending nodes meanwhile"
        ) from None
    summary = _summary(out)
    if method == "qdq" and not summary["quantize_linear"] + summary["dequantize_linear"]:
        extra["warning"] = ("ModelOpt inserted no Q/DQ nodes (no node passed its quantization "
                            f"rules): this {precision} variant computes in high precision")
        log.warning("%s/%s: %s", model, precision, extra["warning"])
    files = [out] + [out.parent / rel for rel in _external_files(out)]
    return PrecisionResult(precision=precision, method=method, time_s=round(elapsed, 3),
                           bytes=sum(f.stat().st_size for f in files), **summary, extra=extra)
