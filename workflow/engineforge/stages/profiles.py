"""Stage 1b — every optimization profile's min/opt/max shapes run once through the fp32 ONNX
(ONNX Runtime, CPU, seeded data of the declared dtypes and ranges), so a profile the model
cannot take is a clear error naming the profile, shape and dims — before any engine is built
for it, not as a runtime error in the bench. One job per profile: editing a profile reruns its
check, builds and benches, and re-exports nothing.
"""

from __future__ import annotations

import logging
import re
import time

from engineforge import modelio
from engineforge.errors import ProfileError
from engineforge.results import ProfileCheckResult
from engineforge.settings import Section

log = logging.getLogger(__name__)

TOOLS = ()  # an ONNX Runtime upgrade need not rerun every build of every profile
LIKELY_FIX = "keep the profile to shapes the model takes (declare fixed dims static)"
SHAPE_FIX = ("keep the profile to shapes the model takes (or declare the dim static in "
             "inputs:), or make the model accept them")


class Settings(Section):
    profile: str
    shapes: dict[str, dict[str, list[int]]]  # input -> min/opt/max
    inputs: dict
    seed: int


def settings(m: dict, w: dict) -> Settings:
    return Settings(profile=w["profile"], shapes=m["profiles"][w["profile"]],
                    inputs=m["inputs"], seed=m["export"]["seed"])


def worker_lane(job) -> str:
    return "backend:onnxruntime"


def run(job) -> ProfileCheckResult:
    import onnxruntime as ort

    t0 = time.perf_counter()
    s: Settings = job.settings
    key = f"models.{job.model}.profiles.{s.profile}"
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the failure is raised, not logged twice
    try:
        sess = ort.InferenceSession(str(job.inputs["onnx"]), options,
                                    providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001
        log.info("ONNX Runtime cannot load '%s':\n%s", job.inputs["onnx"], err)
        if "NOT_IMPLEMENTED" in str(err):  # e.g. fp16 kernels the CPU provider lacks
            log.warning("profile shapes not checked: ONNX Runtime's CPU provider cannot run "
                        "this graph: %s", ort_cause(err))
            return ProfileCheckResult(profile=s.profile, checked=[],
                                      skipped=f"ONNX Runtime (CPU) cannot run the graph: "
                                              f"{ort_cause(err)}",
                                      time_s=round(time.perf_counter() - t0, 3))
        raise ProfileError(f"ONNX Runtime cannot load the exported ONNX: {ort_cause(err)}",
                           model=job.model, key=f"models.{job.model}.export",
                           fix="try export.exporter: torchscript or another opset:; report "
                               "the exporter bug") from None
    checked = []
    for which in ("min", "opt", "max"):
        shapes = modelio.shapes_at(s.shapes, which)
        if shapes in [c for _, c in checked]:
            continue
        feed = modelio.sample_inputs(s.inputs, shapes, seed=s.seed)
        try:
            produced = sess.run(None, feed)
        except Exception as err:  # noqa: BLE001 - the model cannot take this shape
            log.info("profile '%s' %s shape %s failed in ONNX Runtime:\n%s", s.profile,
                     which, shapes, err)
            raise ProfileError(
                f"profile '{s.profile}' {which} shape fails in ONNX Runtime "
                f"({shape_story(s.inputs, shapes)}): {ort_cause(err)}", model=job.model,
                key=key, fix=SHAPE_FIX) from None
        wrong = broken_signature(sess, s.inputs, shapes, produced)
        if wrong:
            raise ProfileError(
                f"profile '{s.profile}' {which} shape ({shape_story(s.inputs, shapes)}) runs, "
                f"but {wrong}: the graph only holds for the export's shapes (a reshape to "
                "hard-coded sizes?)", model=job.model, key=key, fix=SHAPE_FIX)
        checked.append((which, shapes))
    return ProfileCheckResult(profile=s.profile, checked=[w for w, _ in checked],
                              time_s=round(time.perf_counter() - t0, 3))


def broken_signature(sess, inputs: dict, shapes: dict, produced: list) -> str | None:
    """Where an output contradicts the graph's own signature: a dim it names after an input's
    named dim ('batch') whose size differs from that input's. The exporter's optimizer can
    fold a reshape to [-1, 512], valid only at the export's shapes: another shape then runs
    and silently changes the batch."""
    sizes = {d: v for name, shape in shapes.items()
             for d, v in zip(inputs[name]["shape"], shape) if isinstance(d, str)}
    for meta, out in zip(sess.get_outputs(), produced):
        for axis, (dim, got) in enumerate(zip(meta.shape, getattr(out, "shape", ()))):
            if isinstance(dim, str) and dim in sizes and got != sizes[dim]:
                return (f"output '{meta.name}' dim {axis} ('{dim}') is {got}, not the input's "
                        f"{sizes[dim]}")
    return None


def shape_story(inputs: dict, shapes: dict) -> str:
    """'img=[1, 1, 8, 8]: h=8, w=8': each input's shape and its named dims."""
    parts = []
    for name, shape in shapes.items():
        dims = [f"{d}={v}" for d, v in zip(inputs[name]["shape"], shape) if isinstance(d, str)]
        parts.append(f"{name}={shape}" + (f": {', '.join(dims)}" if dims else ""))
    return "; ".join(parts)


def ort_cause(err: Exception) -> str:
    """ONNX Runtime's message, less its error-code prefix and C++ source locations."""
    text = " ".join(ln.strip() for ln in str(err).splitlines()[:3] if ln.strip())
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"Non-zero status code returned while running (\w+) node\. "
                  r"Name:'([^']*)' Status Message: ", r"\1 node '\2': ", text)
    text = re.sub(r"/onnxruntime_src/\S+:\d+ [^(]*\([^)]*\)\s*", "", text)
    return text[:300]
