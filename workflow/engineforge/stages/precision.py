"""Stage 3, precision: one strongly typed ONNX per precision (precision lives in the graph).

- fp32: the input ONNX, copied as is.
- fp16 / bf16: ModelOpt AutoCast (``modelopt.onnx.autocast.convert_to_mixed_precision``);
  nodes whose reference values exceed ``data_max`` / ``init_max`` stay fp32. The reference
  run uses Polygraphy's seeded random inputs, so fp16/bf16 do not depend on calib data.
- int8 / fp8: ModelOpt explicit Q/DQ (``modelopt.onnx.quantization.quantize``), calibrated
  on CPU with the first ``calib_size`` samples of the model's calibration data.

ModelOpt works in a temporary directory beside the output; the result is moved into place
only after ``onnx.checker`` accepts it, so an interrupted job leaves nothing a rerun trusts.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from engineforge import cache
from engineforge.config import stage_slice
from engineforge.errors import PrecisionError
from engineforge.sidecar import make_sidecar, read_json, write_json
from engineforge.versions import tool_versions

log = logging.getLogger(__name__)

METHODS = {"fp32": "copy", "fp16": "autocast", "bf16": "autocast", "int8": "qdq", "fp8": "qdq"}


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


def _calibration(model: str, m: dict, precision: str, root: Path,
                 n: int | None) -> tuple[Path, dict[str, np.ndarray]]:
    """The first ``n`` samples (all if None) of every input, cast to the input's dtype."""
    if "calibration" not in m:
        raise PrecisionError(f"{precision} needs calibration data.", model=model,
                             key=f"models.{model}.calibration",
                             fix="add calibration: {path: calib/<file>.npz}")
    key = f"models.{model}.calibration.path"
    path = root / m["calibration"]["path"]
    data = {}
    with np.load(path) as npz:
        for name, spec in m["inputs"].items():
            if name not in npz.files:
                raise PrecisionError(
                    f"calibration data '{path}' has no array '{name}' "
                    f"(it has {sorted(npz.files)}).", model=model, key=key,
                    fix=f"save one array per model input, named {sorted(m['inputs'])}")
            arr = npz[name]
            if n is not None and len(arr) < n:
                lower = (f" or lower models.{model}.precision.{precision}.calib_size"
                         if precision in ("int8", "fp8") else "")
                raise PrecisionError(
                    f"calibration data '{path}' has {len(arr)} samples of '{name}', "
                    f"{precision} needs {n}.", model=model, key=key, fix=f"add samples{lower}")
            data[name] = np.ascontiguousarray(arr[:n].astype(spec.get("dtype", "float32")))
    return path, data


def _autocast(model: str, m: dict, precision: str, onnx_in: Path, out: Path,
              root: Path) -> tuple[Path | None, dict]:
    from modelopt.onnx.autocast import convert_to_mixed_precision
    from modelopt.onnx.utils import save_onnx

    # Polygraphy's seeded random inputs (AutoCast's default) drive the node classification:
    # deterministic, and fp16/bf16 stay independent of the calibration data (only the
    # quantized variants rebuild when it changes).
    calib, data = None, None
    s = m["precision"][precision]
    with _quiet_modelopt():
        proto = convert_to_mixed_precision(
            onnx_path=str(onnx_in), low_precision_type=precision,
            keep_io_types=s["keep_io_types"], data_max=s["data_max"], init_max=s["init_max"],
            nodes_to_exclude=s["nodes_to_exclude"], op_types_to_exclude=s["op_types_to_exclude"],
            calibration_data=data, providers=["cpu"])
    save_onnx(proto, str(out))  # switches to external data above 2 GB
    ref = f"calibration[:{len(next(iter(data.values())))}]" if data else "random"
    return calib, {"reference_data": ref} | _type_split(proto)


def _qdq(model: str, m: dict, precision: str, onnx_in: Path, out: Path,
         root: Path) -> tuple[Path, dict]:
    from modelopt.onnx.quantization import quantize

    s = m["precision"][precision]
    calib, data = _calibration(model, m, precision, root, s["calib_size"])
    with _quiet_modelopt():
        quantize(onnx_path=str(onnx_in), quantize_mode=precision, calibration_data=data,
                 calibration_method=s["calibration_method"], calibration_eps=["cpu"],
                 op_types_to_exclude=s["op_types_to_exclude"] or None,
                 nodes_to_exclude=s["nodes_to_exclude"] or None,
                 high_precision_dtype=s["high_precision_dtype"], output_path=str(out),
                 log_level="WARNING")
    return calib, {"calibration_samples": len(next(iter(data.values())))}


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


def run(model: str, m: dict, precision: str, onnx_in: Path, out_onnx: Path,
        sidecar_path: Path, root: Path = Path(".")) -> dict:
    """Write ``out_onnx`` (``precision`` variant of ``onnx_in``) and its sidecar; return it."""
    import onnx

    onnx_in, out_onnx, root = Path(onnx_in), Path(out_onnx), Path(root)
    method = METHODS[precision]
    calib_in = ({"calibration": Path(root) / m["calibration"]["path"]}
                if method == "qdq" and "calibration" in m else {})
    if cache.try_restore(f"precision.{precision}", inputs={"onnx": onnx_in} | calib_in,
                         config_slice=stage_slice(m, "precision", precision=precision),
                         tools=tool_versions("precision"), outputs={"onnx": out_onnx},
                         sidecar_path=sidecar_path):
        return read_json(sidecar_path)
    if method != "copy":  # import first, so that time_s is the conversion alone
        importlib.import_module("modelopt.onnx." + ("autocast" if method == "autocast"
                                                    else "quantization"))
    out_onnx.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_onnx.name}.", dir=out_onnx.parent))
    work = tmp / out_onnx.name  # same name, so an external-data reference stays valid
    try:
        start = time.perf_counter()
        calib, extra = None, {}
        if method == "copy":
            for rel in _external_files(onnx_in):
                shutil.copyfile(onnx_in.parent / rel, tmp / rel)
            shutil.copyfile(onnx_in, work)
        else:
            convert = _autocast if method == "autocast" else _qdq
            try:
                calib, extra = convert(model, m, precision, onnx_in, work, root)
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
            onnx.checker.check_model(str(work))  # path-based: works above 2 GB too
        except onnx.checker.ValidationError as err:
            raise PrecisionError(
                f"{precision} ONNX fails onnx.checker: {' '.join(str(err).split())}",
                model=model, key=f"models.{model}.precision.{precision}",
                fix="report it with the input ONNX; exclude the offending nodes meanwhile"
            ) from None
        # publish: external data first, the .onnx (what Snakemake trusts) last
        refs = set(_external_files(work))
        data_files = [p for p in tmp.iterdir() if p.name in refs and p.is_file()]
        for p in data_files:
            os.replace(p, out_onnx.parent / p.name)
        os.replace(work, out_onnx)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    summary = _summary(out_onnx)
    if method == "qdq" and not summary["quantize_linear"] + summary["dequantize_linear"]:
        extra["warning"] = ("ModelOpt inserted no Q/DQ nodes (no node passed its quantization "
                            f"rules): this {precision} variant computes in high precision")
        log.warning("%s/%s: %s", model, precision, extra["warning"])
    outputs = {"onnx": out_onnx} | {f"external_data:{p.name}": out_onnx.parent / p.name
                                    for p in data_files}
    result = {"precision": precision, "method": method, "time_s": round(elapsed, 3),
              "bytes": sum(os.path.getsize(p) for p in outputs.values())} | summary | extra
    sidecar = make_sidecar(
        stage="precision", model=model,
        inputs={"onnx": onnx_in} | ({"calibration": calib} if calib else {}),
        config_slice=stage_slice(m, "precision", precision=precision),
        tools=tool_versions("precision"), outputs=outputs, result=result)
    write_json(sidecar_path, sidecar)
    return sidecar
