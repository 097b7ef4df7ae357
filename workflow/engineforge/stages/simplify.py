"""Stage 2 — onnxsim with the profile shapes.

If onnxsim fails, or the result is not smaller than its input, the input is
kept and the reason recorded. ``onnx.checker`` runs on whatever is kept.
"""

from __future__ import annotations

import collections
import logging
import shutil
import time

from engineforge.errors import SimplifyError
from engineforge.results import SimplifyResult
from engineforge.settings import Section

log = logging.getLogger(__name__)

TOOLS = ("onnx", "onnxsim")
LIKELY_FIX = "set simplify: {enabled: false} for this model (onnxsim cannot handle the graph)"


class Settings(Section):
    enabled: bool
    test_shapes: dict[str, list[int]]   # the first profile's opt shapes (onnxsim's check)


def settings(m: dict, w: dict) -> Settings:
    first = next(iter(m["profiles"].values()))
    return Settings(enabled=m["simplify"]["enabled"],
                    test_shapes={i: s["opt"] for i, s in first.items()})


def cache_group(job) -> str:
    return "simplify"


def op_counts(model) -> dict[str, int]:
    return dict(collections.Counter(n.op_type for n in model.graph.node))


def run(job) -> SimplifyResult:
    import onnx
    import onnxsim

    model, onnx_in, onnx_out = job.model, job.inputs["onnx"], job.outputs["onnx"]
    t0 = time.perf_counter()
    original = onnx.load(str(onnx_in))
    before = len(original.graph.node)
    kept_reason = None
    simplified = None
    if not job.settings.enabled:
        kept_reason = "simplify.enabled is false"
    else:
        try:
            simplified, ok = onnxsim.simplify(original, test_input_shapes=job.settings.test_shapes,
                                              check_n=1, skip_shape_inference=False)
            if not ok:
                kept_reason = "onnxsim's own check found different outputs"
            elif len(simplified.graph.node) > before:
                kept_reason = (f"onnxsim grew the graph ({before} -> "
                               f"{len(simplified.graph.node)} nodes)")
        except Exception as err:  # noqa: BLE001 - recorded; the input is kept
            kept_reason = f"onnxsim failed: {type(err).__name__}: {str(err)[:300]}"
    if kept_reason:
        log.warning("%s: keeping the unsimplified model: %s", model, kept_reason)
        shutil.copyfile(onnx_in, onnx_out)
    else:
        onnx.save(simplified, str(onnx_out))
    try:
        onnx.checker.check_model(str(onnx_out))
    except Exception as err:  # noqa: BLE001
        raise SimplifyError(f"onnx.checker rejects the model: {err}".splitlines()[0],
                            model=model, key=f"models.{model}.simplify.enabled",
                            fix="set simplify.enabled: false to keep the export") from None
    kept = original if kept_reason else simplified
    return SimplifyResult(simplified=kept_reason is None, kept_reason=kept_reason,
                          nodes_before=before, nodes_after=len(kept.graph.node),
                          ops_before=op_counts(original), ops_after=op_counts(kept),
                          time_s=round(time.perf_counter() - t0, 3))
