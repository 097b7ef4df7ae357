"""Localisation: which node of a precision variant lets the drift in.

Every float tensor a node of the fp32 graph produces is compared with the same tensor of
the variant, on the same inputs. Names match across the rewrite: AutoCast and ModelOpt keep
node and tensor names and insert Cast / QuantizeLinear / DequantizeLinear nodes (nodes
whose names the fp32 graph lacks); a tensor such a node produces maps back to its source.
So a consumer's input is compared *before* its inserted Q/DQ pair: quantization error of an
activation or a weight is charged to the node that consumes it.

Both graphs run with intermediate tensors added as graph outputs, at most
``max_outputs_per_pass`` per run (memory stays bounded: one pass's tensors live at a
time, reduced to scalars at once). ONNX Runtime's CPU provider runs both, with graph
optimizations off: its fusions depend on which tensors are outputs (a fused Conv+Mul
rounds differently in fp16), so values would depend on the pass; each node runs as the
graph states it. A variant that provider cannot load (bf16, fp8) runs on
``onnx.reference.ReferenceEvaluator`` (pure Python, slow) if below
``onnx_reference.MAX_BYTES``, else it is ``not_localisable``.

A node's *drop* is ``min(worst input SNR, ceiling) - output SNR``, with ``ceiling`` the best
output SNR anywhere in the variant (what its precision achieves): input SNRs are capped
there so that the first nodes (exact inputs and weights, 200 dB) do not rank high merely
for being first. ``first`` is the earliest node (topological order) whose drop exceeds
``drop_db`` and whose output SNR is below ``snr_db_below``; ``worst`` the ``top`` largest
drops.
"""

from __future__ import annotations

import resource
import time
import tracemalloc
from pathlib import Path

import numpy as np

from engineforge import modelio
from engineforge.results import Localisation, NodeDrift
from engineforge.stages.audit import SNR_BOUND_DB, cosine, snr_db

INSERTED_OPS = {"Cast", "QuantizeLinear", "DequantizeLinear"}
FLOAT_TYPES = {1, 10, 11, 16}  # FLOAT, FLOAT16, DOUBLE, BFLOAT16


def _types(model) -> dict[str, int]:
    import onnx

    graph = onnx.shape_inference.infer_shapes(model).graph
    return {v.name: v.type.tensor_type.elem_type
            for v in [*graph.value_info, *graph.input, *graph.output]}


def variant_names(fp32, variant) -> dict[str, str]:
    """fp32 tensor name -> the variant tensor holding its value (before any inserted
    Cast / Q / DQ), for tensors that exist in both graphs."""
    ours = {n.name for n in fp32.graph.node}
    producer = {o: n for n in variant.graph.node for o in n.output}
    graph_inputs = {i.name for i in variant.graph.input}
    out = {}
    for name in {o for n in fp32.graph.node for o in n.output if o}:
        if name not in producer and name not in graph_inputs:
            continue
        source, seen = name, set()
        while (source in producer and producer[source].op_type in INSERTED_OPS
               and producer[source].name not in ours and source not in seen):
            seen.add(source)
            source = producer[source].input[0]
        out[name] = source
    return out


class _Runner:
    """Runs one graph with chosen tensors as extra outputs (ORT CPU, else onnx.reference)."""

    def __init__(self, model, types: dict[str, int], allow_reference: bool):
        import onnxruntime as ort

        self.model, self.types = model, types
        self.kept = list(model.graph.output)
        self.runtime = "onnxruntime-cpu"
        try:
            self._session(ort)
        except Exception:  # noqa: BLE001 - no CPU kernel (bf16, fp8): emulate, or give up
            if not allow_reference:
                raise
            self.runtime = "onnx-reference"

    def _session(self, ort):
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        # no fusions: they depend on which tensors are outputs, and so would the values
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return ort.InferenceSession(self.model.SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])

    def run(self, names: list[str], feed: dict, batch: int) -> dict[str, np.ndarray]:
        import onnx
        import onnxruntime as ort

        del self.model.graph.output[:]
        self.model.graph.output.extend(
            onnx.helper.make_tensor_value_info(n, self.types.get(n, 1), None) for n in names)
        try:
            if self.runtime == "onnxruntime-cpu":
                sess = self._session(ort)
                infer = lambda f: dict(zip(names, sess.run(names, f)))
            else:
                from onnx.reference import ReferenceEvaluator

                ev = ReferenceEvaluator(self.model)
                infer = lambda f: dict(zip(names, ev.run(names, f)))
            out = modelio.run_batched(lambda f: _per_sample(infer(f), f), feed, batch)
        finally:
            del self.model.graph.output[:]
            self.model.graph.output.extend(self.kept)
        return {k: np.asarray(v).astype(np.float32) for k, v in out.items()}


def _per_sample(out: dict, feed: dict) -> dict:
    """The outputs that hold one row per sample (not weights or shapes derived in-graph)."""
    n = len(next(iter(feed.values())))
    return {k: v for k, v in out.items() if np.ndim(v) and np.shape(v)[0] == n}


def _stats(ref: np.ndarray, var: np.ndarray) -> dict:
    bad = int(var.size - np.isfinite(var).sum())
    ref_bad = not np.isfinite(ref).all()
    return {"snr": -SNR_BOUND_DB if bad and not ref_bad else snr_db(ref, var),
            "cos": None if bad else cosine(ref, var),
            "peak": float(np.max(np.abs(ref))) if ref.size else 0.0, "bad": bad}


def localise(fp32_onnx: str | Path, variant_onnx: str | Path, feed: dict[str, np.ndarray], *,
             batch: int, max_outputs_per_pass: int = 64, top: int = 10,
             drop_db: float = 10.0, snr_db_below: float = 40.0) -> Localisation:
    """Compare every matched node output of ``variant_onnx`` with ``fp32_onnx`` on ``feed``
    (run in batches of ``batch``) and rank the nodes by the error they add."""
    import onnx

    from engineforge.backends import onnx_reference

    tracing = tracemalloc.is_tracing()  # a caller's trace is left running
    if not tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    start = time.perf_counter()
    base = {"drop_threshold_db": drop_db, "snr_threshold_db": snr_db_below}

    def done(**fields) -> Localisation:
        peak = tracemalloc.get_traced_memory()[1]
        if not tracing:
            tracemalloc.stop()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return Localisation(**base, **fields, time_s=round(time.perf_counter() - start, 3),
                            peak_mem_mb=round(peak / 2**20, 1), max_rss_mb=round(rss, 1))

    try:
        fp32, variant = onnx.load(str(fp32_onnx)), onnx.load(str(variant_onnx))
        fp32_types, variant_types = _types(fp32), _types(variant)
        mapping = variant_names(fp32, variant)
        nodes = []  # (node, its first float output) in topological order
        for node in fp32.graph.node:
            out = next((o for o in node.output if fp32_types.get(o) in FLOAT_TYPES), None)
            if out is not None:
                nodes.append((node, out))
        names = [o for _, o in nodes if o in mapping
                 and variant_types.get(mapping[o]) in FLOAT_TYPES]
        ref_runner = _Runner(fp32, fp32_types, allow_reference=False)
        try:
            var_runner = _Runner(variant, variant_types,
                                 allow_reference=onnx_reference.usable(variant_onnx))
        except Exception as err:  # noqa: BLE001 - a result, like the audit's not_runnable
            return done(status="not_localisable", reason=str(err).strip().splitlines()[-1])
        stats, passes = {}, 0
        for i in range(0, len(names), max_outputs_per_pass):
            chunk = names[i:i + max_outputs_per_pass]
            ref = ref_runner.run(chunk, feed, batch)
            var = var_runner.run([mapping[n] for n in chunk], feed, batch)
            for n in chunk:
                if n in ref and mapping[n] in var:
                    stats[n] = _stats(ref.pop(n), var.pop(mapping[n]))
            passes += 1
            del ref, var
    except BaseException:
        if not tracing:
            tracemalloc.stop()
        raise
    if not stats:
        return done(status="not_localisable", reason="no float node output matches",
                    runtime=var_runner.runtime)
    ceiling = max(s["snr"] for s in stats.values())
    drifts = []
    for node, out in nodes:
        if out not in stats:
            continue
        ins = [stats[i]["snr"] for i in node.input if i in stats]
        snr_in = min(ins, default=SNR_BOUND_DB)
        s = stats[out]
        drifts.append(NodeDrift(
            node=node.name, op_type=node.op_type, output=out, snr_in_db=round(snr_in, 3),
            snr_out_db=round(s["snr"], 3), drop_db=round(min(snr_in, ceiling) - s["snr"], 3),
            cosine=s["cos"], fp32_peak_abs=s["peak"], non_finite=s["bad"]))
    first = next((d for d in drifts if d.drop_db > drop_db and d.snr_out_db < snr_db_below),
                 None)
    worst = sorted(drifts, key=lambda d: -d.drop_db)[:top]
    return done(status="localised" if first else "clean", runtime=var_runner.runtime,
                samples=len(next(iter(feed.values()))), compared=len(drifts),
                unmatched=len(nodes) - len(drifts), passes=passes,
                ceiling_snr_db=round(ceiling, 3), first=first, worst=worst)
