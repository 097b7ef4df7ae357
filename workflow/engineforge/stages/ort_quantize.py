"""Stage 3b, ort_quantize: the int8 graph ONNX Runtime's CPU kernels run fastest.

ModelOpt's Q/DQ graph (stages/precision.py) is made for TensorRT; ORT's x86 CPU provider
runs it slower than fp32. This stage writes the int8 variant the way ORT's own docs
recommend for x86-64: ``onnxruntime.quantization.quantize_static`` in QDQ format, weights
int8 per channel, activations uint8 (U8S8, the VPMADDUBSW / VNNI path), calibrated on the
first ``calib_size`` samples of the model's calibration data (the same
``models.<m>.precision.int8`` settings as ModelOpt's). Backends that declare
``quantizers = {"int8": "onnxruntime"}`` build from it (``Layout.quantized``); the TensorRT
backends keep ModelOpt's graph, and each backend's audit covers the graph it built.

Before quantizing, the graph (already folded by the exporter's optimizer: BatchNormalization
in the convolutions) is prepared by ORT's ``quant_pre_process`` (shape inference + ORT's
basic graph optimizations). fp8 has no ORT counterpart: ORT's CPU provider has no fp8 kernels.

``int8-repaired`` (the repair stage's variant, for these backends): the same quantizer, with
the nodes the repair kept in high precision (its record, ``extra.repair.excluded_nodes``,
named in the fp32 graph) left unquantized. Their names are found in the prepared graph (by
name, else the node now computing their output: a BatchNormalization folded into its Conv).
In ORT's QDQ format a tensor is quantized at its producer's output, so leaving a node's
inputs in float also leaves unquantized the chain producing them up to the node that
computes them (through the ops ORT quantizes with their input's scale: Relu, MaxPool,
Reshape, ...), and an input another quantized consumer still reads through Q/DQ is rewired
to its float tensor. A kept node that cannot be found, or that still reads a quantized
activation, fails the job.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Literal

from engineforge.errors import PrecisionError, first_line
from engineforge.results import PrecisionResult
from engineforge.settings import QuantizeSettings, Section, base_precision, is_repaired
from engineforge.sidecar import read_json, scratch_prefix

log = logging.getLogger(__name__)

TOOLS = ("onnx", "onnxruntime-gpu", "onnxruntime")
LIKELY_FIX = ("exclude the failing nodes or op types (models.<m>.precision.int8."
              "nodes_to_exclude / op_types_to_exclude), or drop onnxruntime for this model")


class Settings(Section):
    precision: Literal["int8", "int8-repaired"]
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
    return Settings(precision=w["precision"],
                    quantize=QuantizeSettings(**m["precision"][base_precision(w["precision"])]),
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


# ops ORT's QDQ quantizer quantizes with their input's scale (or folds into the producer's
# Q: Relu, Clip): their output is as quantized as their input
CARRY_QUANTIZATION = {"Relu", "Clip", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten",
                      "Identity", "Resize", "MaxPool", "AveragePool", "Slice", "Pad", "Split",
                      "Gather", "GatherElements", "TopK"}


def locate(fp32, folded, names: list[str]) -> dict[str, list[str]]:
    """fp32 node name -> the node(s) of the folded graph computing it: the same name, else
    the nodes now producing its output, or (fused into a later node: Conv -> BatchNorm) the
    first output downstream that still exists. [] where none (e.g. folded into a constant)."""
    here = {n.name for n in folded.node}
    made_here = {o: n.name for n in folded.node for o in n.output}
    nodes = {n.name: n for n in fp32.node}
    consumers: dict[str, list] = {}
    for n in fp32.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    out = {}
    for name in names:
        if name in here or name not in nodes:
            out[name] = [name] if name in here else []
            continue
        found, todo, seen = set(), list(nodes[name].output), set()
        while todo:
            t = todo.pop()
            if t in seen:
                continue
            seen.add(t)
            if t in made_here:
                found.add(made_here[t])
            else:  # gone: follow it into the consumers that were folded away too
                todo += [o for c in consumers.get(t, []) if c.name not in here for o in c.output]
        out[name] = sorted(found)
    return out


def float_closure(graph, kept: set[str]) -> tuple[set[str], set[str]]:
    """(nodes to exclude, nodes whose inputs must be float): ``kept``, and per activation
    input the producers through CARRY_QUANTIZATION ops up to the node computing it."""
    made = {o: n for n in graph.node for o in n.output}
    consts = {t.name for t in graph.initializer}
    exclude, float_in, todo = set(kept), set(kept), list(kept)
    by_name = {n.name: n for n in graph.node}
    while todo:
        node = by_name[todo.pop()]
        for t in node.input:
            p = made.get(t)
            if t in consts or p is None or p.op_type in ("Constant", "Shape"):
                continue
            if p.name not in exclude:
                exclude.add(p.name)
                if p.op_type in CARRY_QUANTIZATION:
                    float_in.add(p.name)
                    todo.append(p.name)
    return exclude, float_in


def _dequantized(graph) -> dict[str, str]:
    """DequantizeLinear output -> the float tensor its QuantizeLinear read (activations)."""
    made = {o: n for n in graph.node for o in n.output}
    return {dq.output[0]: made[dq.input[0]].input[0] for dq in graph.node
            if dq.op_type == "DequantizeLinear" and dq.input[0] in made
            and made[dq.input[0]].op_type == "QuantizeLinear"}


def unquantize_inputs(proto, names: set[str]) -> None:
    """Rewire the activation inputs of ``names`` that still pass through a Q/DQ pair (another
    consumer quantizes the tensor) to the float tensor; drop the Q/DQ left unused."""
    dq = _dequantized(proto.graph)
    for n in proto.graph.node:
        if n.name in names:
            for i, t in enumerate(n.input):
                n.input[i] = dq.get(t, t)
    outputs = {o.name for o in proto.graph.output}
    while True:
        used = {i for n in proto.graph.node for i in n.input} | outputs
        dead = [n for n in proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            proto.graph.node.remove(n)
    used = {i for n in proto.graph.node for i in n.input}
    for t in [t for t in proto.graph.initializer if t.name not in used]:
        proto.graph.initializer.remove(t)


def still_quantized(proto, names, prepared) -> list[str]:
    """Of ``names``, those reading an activation through a Q/DQ pair, or a tensor no longer
    computed by the op computing it in the float graph (an activation folded into a Q)."""
    dq = _dequantized(proto.graph)
    was = {o: n.op_type for n in prepared.node for o in n.output}
    now = {o: n.op_type for n in proto.graph.node for o in n.output}
    return sorted(n.name for n in proto.graph.node if n.name in names and any(
        t in dq or (t in was and now.get(t) != was[t]) for t in n.input))


class Unmapped(Exception):
    """A node to keep in high precision has no counterpart in the folded graph."""


def prepare(fp32: Path, prepared: Path) -> list[str]:
    """ORT's ``quant_pre_process``; where its symbolic shape inference fails (a Constant
    written with ``value_ints`` crashes it, in onnxruntime 1.24 and 1.31; onnxruntime 1.24 also
    on torchvision's ViT), again without it (ONNX's shape inference still runs). The steps
    run."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(fp32), str(prepared))
        return ["quant_pre_process"]
    except Exception as err:  # noqa: BLE001 - recorded; the retry's failure is the job's
        log.warning("symbolic shape inference failed (%s); quant_pre_process again without it",
                    first_line(err))
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        return [f"quant_pre_process(skip_symbolic_shape=True): symbolic shape inference "
                f"failed: {first_line(err)}"]


def _quantize(s: Settings, fp32: Path, out: Path, data: dict, scratch: Path,
              keep: list[str] = ()) -> dict:
    """Quantize ``fp32`` to ``out``; ``keep``: fp32 node names to leave unquantized. Returns
    the preprocessing steps and where ``keep`` went."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    q = s.quantize
    prepared = scratch / "prepared.onnx"
    steps = prepare(fp32, prepared)
    graph = onnx.load(str(prepared), load_external_data=False).graph
    op_types = None
    if q.op_types_to_exclude:
        op_types = sorted({n.op_type for n in graph.node} - set(q.op_types_to_exclude))
    kept, float_in, exclude = {}, set(), set()
    if keep:
        kept = locate(onnx.load(str(fp32), load_external_data=False).graph, graph, list(keep))
        missing = [name for name, found in kept.items() if not found]
        if missing:
            raise Unmapped(", ".join(missing))
        exclude, float_in = float_closure(graph, {n for found in kept.values() for n in found})
    quantize_static(
        str(prepared), str(out), _Reader(data),
        quant_format=getattr(QuantFormat, s.quant_format),
        activation_type=getattr(QuantType, s.activation_type),
        weight_type=getattr(QuantType, s.weight_type),
        per_channel=s.per_channel, reduce_range=s.reduce_range,
        calibrate_method={"max": CalibrationMethod.MinMax,
                          "entropy": CalibrationMethod.Entropy}[q.calibration_method],
        op_types_to_quantize=op_types,
        nodes_to_exclude=sorted(set(q.nodes_to_exclude) | exclude) or None)
    if not keep:
        return {"preprocess": steps}
    quantized = onnx.load(str(out))
    unquantize_inputs(quantized, float_in)
    onnx.save(quantized, str(out))
    return {"preprocess": steps, "nodes": kept, "unquantized": sorted(exclude),
            "still_quantized": still_quantized(quantized, float_in, graph)}


def kept_nodes(path: Path) -> tuple[str, list[str]]:
    """The repair record's (status, nodes kept in high precision) from its sidecar."""
    repair = PrecisionResult.model_validate(read_json(path)["result"]).extra.get("repair") or {}
    return repair.get("status", "unknown"), list(repair.get("excluded_nodes") or [])


def run(job) -> PrecisionResult:
    import onnx

    from engineforge.stages.precision import _calibration, _summary

    s: Settings = job.settings
    out = job.outputs["onnx"]
    key = f"models.{job.model}.precision.int8"
    status, keep = kept_nodes(job.inputs["repair"]) if is_repaired(s.precision) else (None, [])
    data = _calibration(job.model, s.inputs, base_precision(s.precision),
                        job.inputs.get("calibration"), s.quantize.calib_size)
    # the quantizer writes side files (augmented model, pre-processed graph): a private dir
    scratch = Path(tempfile.mkdtemp(prefix=scratch_prefix(), dir=out.parent.parent))
    start = time.perf_counter()
    try:
        kept = _quantize(s, job.inputs["onnx"], out, data, scratch, keep)
    except Unmapped as err:
        raise PrecisionError(
            f"the repair keeps node(s) {err} in high precision, but ONNX Runtime's folded "
            "graph has no node computing them: int8-repaired cannot leave them unquantized",
            model=job.model, key=f"models.{job.model}.repair",
            fix=f"drop int8 from models.{job.model}.repair.precisions, or onnxruntime from "
                f"models.{job.model}.backends") from None
    except Exception as err:  # noqa: BLE001 - any quantizer failure is one line
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:400]
        raise PrecisionError(
            f"ONNX Runtime quantize_static to {s.precision} failed: {reason}",
            model=job.model, key=key,
            fix=f"exclude the failing nodes or op types ({key}.nodes_to_exclude / "
                "op_types_to_exclude), or drop onnxruntime from "
                f"models.{job.model}.backends") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    elapsed = time.perf_counter() - start
    if kept.get("still_quantized"):
        raise PrecisionError(
            f"node(s) {', '.join(kept['still_quantized'])} still read a quantized activation "
            "in ONNX Runtime's int8-repaired graph (through Q/DQ, or an activation folded "
            "into a QuantizeLinear)", model=job.model,
            key=f"models.{job.model}.repair",
            fix=f"drop int8 from models.{job.model}.repair.precisions")
    onnx.checker.check_model(str(out))
    summary = _summary(out)
    if not summary["quantize_linear"]:
        raise PrecisionError("ONNX Runtime quantize_static quantized no node",
                             model=job.model, key=key,
                             fix="check op_types_to_exclude / nodes_to_exclude")
    extra = {"quantizer": describe(s), "calibration_samples": len(next(iter(data.values()))),
             "preprocess": kept["preprocess"]}
    if is_repaired(s.precision):  # the repair's nodes, as found in ORT's graph
        extra["kept_in_float"] = {"repair": status, "excluded_nodes": keep,
                                  "ort_nodes": kept.get("nodes", {}),
                                  "unquantized": kept.get("unquantized", [])}
    return PrecisionResult(
        precision=s.precision, method="ort_qdq", time_s=round(elapsed, 3),
        bytes=out.stat().st_size, **summary, extra=extra)
