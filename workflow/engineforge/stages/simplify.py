"""Stage 2 — onnxsim with the profile shapes.

If onnxsim fails, or the result is not smaller than its input, the input is
kept and the reason recorded. ``onnx.checker`` runs on whatever is kept.
"""

from __future__ import annotations

import collections
import logging
import shutil
import time
from pathlib import Path

from engineforge import cache, modelio
from engineforge.config import stage_slice
from engineforge.errors import SimplifyError
from engineforge.sidecar import atomic_path, make_sidecar, read_json, write_json
from engineforge.versions import tool_versions

log = logging.getLogger(__name__)


def op_counts(model) -> dict[str, int]:
    return dict(collections.Counter(n.op_type for n in model.graph.node))


def run(model: str, m: dict, onnx_in: Path, onnx_out: Path, sidecar_path: Path) -> dict:
    import onnx
    import onnxsim

    if cache.try_restore("simplify", inputs={"onnx": onnx_in},
                         config_slice=stage_slice(m, "simplify"), tools=tool_versions("simplify"),
                         outputs={"onnx": onnx_out}, sidecar_path=sidecar_path):
        return read_json(sidecar_path)
    t0 = time.perf_counter()
    original = onnx.load(str(onnx_in))
    before = len(original.graph.node)
    kept_reason = None
    simplified = None
    if not m["simplify"]["enabled"]:
        kept_reason = "simplify.enabled is false"
    else:
        # Shapes of the first profile's opt point; dynamic dims stay symbolic.
        opt = modelio.shapes_at(next(iter(m["profiles"].values())), "opt")
        try:
            simplified, ok = onnxsim.simplify(original, test_input_shapes=opt,
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

    with atomic_path(onnx_out) as tmp:
        if kept_reason:
            shutil.copyfile(onnx_in, tmp)
        else:
            onnx.save(simplified, str(tmp))
        try:
            onnx.checker.check_model(str(tmp))
        except Exception as err:  # noqa: BLE001
            raise SimplifyError(f"onnx.checker rejects the model: {err}".splitlines()[0],
                                model=model, key=f"models.{model}.simplify.enabled",
                                fix="set simplify.enabled: false to keep the export") from None
    after = before if kept_reason else len(simplified.graph.node)
    result = {"simplified": kept_reason is None, "kept_reason": kept_reason,
              "nodes_before": before, "nodes_after": after,
              "ops_before": op_counts(original),
              "ops_after": op_counts(original if kept_reason else simplified),
              "time_s": round(time.perf_counter() - t0, 3)}
    side = make_sidecar(stage="simplify", model=model, inputs={"onnx": onnx_in},
                        config_slice=stage_slice(m, "simplify"),
                        tools=tool_versions("simplify"), outputs={"onnx": onnx_out},
                        result=result)
    write_json(sidecar_path, side)
    return side
