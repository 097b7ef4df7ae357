"""Localisation: which node of a precision variant lets the drift in.

Every float tensor a node of the fp32 graph produces is compared with the same tensor of
the variant, on the same inputs. Names match across the rewrite: AutoCast and ModelOpt keep
node and tensor names and insert Cast / QuantizeLinear / DequantizeLinear nodes (nodes
whose names the fp32 graph lacks); a tensor such a node produces maps back to its source.
So a consumer's input is compared *before* its inserted Q/DQ pair: quantization error of an
activation or a weight is charged to the node that consumes it.

Both graphs run with intermediate tensors added as graph outputs, at most
``max_outputs_per_pass`` per run. Memory stays bounded: one pass's tensors for one batch
live at a time, reduced to sums at once. ONNX Runtime's CPU provider runs both, with graph
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

from engineforge.results import Localisation, NodeDrift
from engineforge.stages.audit import SNR_BOUND_DB

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

    def batches(self, names: list[str], feed: dict, batch: int):
        """``names`` (float32) for each batch of ``feed``, as ``modelio.run_batched`` runs
        them (a short last batch filled up, then cut back), one batch in memory at a time."""
        import onnx
        import onnxruntime as ort

        del self.model.graph.output[:]
        self.model.graph.output.extend(
            onnx.helper.make_tensor_value_info(n, self.types.get(n, 1), None) for n in names)
        try:
            if self.runtime == "onnxruntime-cpu":
                sess = self._session(ort)
                infer = lambda f: sess.run(names, f)
            else:
                from onnx.reference import ReferenceEvaluator

                ev = ReferenceEvaluator(self.model)
                infer = lambda f: ev.run(names, f)
        finally:
            del self.model.graph.output[:]
            self.model.graph.output.extend(self.kept)
        n = len(next(iter(feed.values())))
        for start in range(0, n, batch):
            idx = np.arange(start, start + batch) % n
            keep = min(batch, n - start)
            outs = infer({k: v[idx] for k, v in feed.items()})
            # only tensors with one row per sample (not weights or shapes derived in-graph)
            yield {name: np.asarray(v[:keep]).astype(np.float32) for name, v in zip(names, outs)
                   if np.ndim(v) and np.shape(v)[0] == batch}


class Drift:
    """SNR and cosine of a variant tensor vs the fp32 one, accumulated batch by batch (the
    same numbers as ``audit.snr_db`` / ``audit.cosine`` on the concatenated arrays)."""

    def __init__(self):
        self.aa = self.bb = self.ab = self.ee = self.peak = 0.0
        self.bad = 0

    def add(self, ref: np.ndarray, var: np.ndarray) -> None:
        a, b = ref.astype(np.float64).ravel(), var.astype(np.float64).ravel()
        self.peak = max(self.peak, float(np.max(np.abs(a), initial=0.0)))
        finite = np.isfinite(a) & np.isfinite(b)
        self.bad += int(b.size - np.isfinite(b).sum())
        a, b = a[finite], b[finite]  # (an fp32 Inf/NaN: left out; fp32 is the reference)
        self.aa, self.bb, self.ab = self.aa + a @ a, self.bb + b @ b, self.ab + a @ b
        self.ee += (a - b) @ (a - b)

    @property
    def snr(self) -> float:
        """dB within +-SNR_BOUND_DB; any NaN or Inf in the variant scores the worst."""
        if self.bad:
            return -SNR_BOUND_DB
        if self.ee == 0:
            return SNR_BOUND_DB
        if self.aa == 0:
            return -SNR_BOUND_DB
        return float(np.clip(10 * np.log10(self.aa / self.ee), -SNR_BOUND_DB, SNR_BOUND_DB))

    @property
    def cosine(self) -> float | None:
        if self.bad:
            return None
        denom = np.sqrt(self.aa) * np.sqrt(self.bb)
        return float(self.ab / denom) if denom else float(self.ee == 0)


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
        stats: dict[str, Drift] = {}
        passes = 0
        for i in range(0, len(names), max_outputs_per_pass):
            chunk = names[i:i + max_outputs_per_pass]
            pairs = zip(ref_runner.batches(chunk, feed, batch),
                        var_runner.batches([mapping[n] for n in chunk], feed, batch))
            for ref, var in pairs:
                for n in chunk:
                    if n in ref and mapping[n] in var:
                        stats.setdefault(n, Drift()).add(ref[n], var[mapping[n]])
            passes += 1
    except BaseException:
        if not tracing:
            tracemalloc.stop()
        raise
    if not stats:
        return done(status="not_localisable", reason="no float node output matches",
                    runtime=var_runner.runtime)
    ceiling = max(s.snr for s in stats.values())
    drifts = []
    for node, out in nodes:
        if out not in stats:
            continue
        ins = [stats[i].snr for i in node.input if i in stats]
        snr_in = min(ins, default=SNR_BOUND_DB)
        s = stats[out]
        drifts.append(NodeDrift(
            node=node.name, op_type=node.op_type, output=out, snr_in_db=round(snr_in, 3),
            snr_out_db=round(s.snr, 3), drop_db=round(min(snr_in, ceiling) - s.snr, 3),
            cosine=s.cosine, fp32_peak_abs=s.peak, non_finite=s.bad))
    first = next((d for d in drifts if d.drop_db > drop_db and d.snr_out_db < snr_db_below),
                 None)
    worst = sorted(drifts, key=lambda d: -d.drop_db)[:top]
    return done(status="localised" if first else "clean", runtime=var_runner.runtime,
                samples=len(next(iter(feed.values()))), compared=len(drifts),
                unmatched=len(nodes) - len(drifts), passes=passes,
                ceiling_snr_db=round(ceiling, 3), first=first, worst=worst)
