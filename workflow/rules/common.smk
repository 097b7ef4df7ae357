# Config validation, path templates, input functions and the stage runner.
# Nothing heavy is imported here: parsing the workflow must stay fast.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "workflow"))
sys.path.insert(1, str(Path(workflow.basedir)))  # the shipped models/ package

from engineforge import config as efconfig
from engineforge import jobs as efjobs
from engineforge import runner as efrunner
from engineforge.errors import EngineforgeError
from engineforge.sidecar import canonical_json
from engineforge.versions import tool_versions

try:
    EF = efconfig.resolve(config, Path("."))
except EngineforgeError as err:
    efrunner.fail_fast(err)

MODELS = EF["models"]
A = EF["artifacts"]
BACKENDS = efrunner.backend_availability(
    {b for m in MODELS.values() for b in m["backends"]}
)


wildcard_constraints:
    model="|".join(MODELS) or "^$",
    precision="fp32|fp16|bf16|int8|fp8",
    backend="onnxruntime|tensorrt-rtx|tensorrt|trtexec",
    profile="[A-Za-z0-9][A-Za-z0-9_-]*",


def M(wildcards):
    return MODELS[wildcards.model]


def slice_param(stage):
    """Config slice of a stage as a params value: editing it reruns only its jobs."""
    return lambda w: canonical_json(
        efconfig.stage_slice(
            MODELS[w.model],
            stage,
            precision=w.get("precision"),
            profile=w.get("profile"),
            backend=w.get("backend"),
        )
    )


def tools_param(stage):
    """Tool versions as a params value; a backend's own version (e.g. the trtexec banner)
    counts too, so an upgrade reruns exactly its builds."""

    def versions(w):
        tools = tool_versions(stage, w.get("backend"))
        if w.get("backend"):
            tools[w.backend] = str(BACKENDS[w.backend]["version"])
        return canonical_json(tools)

    return versions


def checkpoint_inputs(wildcards):
    m = M(wildcards)
    files = {}
    if m["checkpoint"].get("path"):
        files["checkpoint"] = m["checkpoint"]["path"]
    if efconfig.reference_data(m):
        files["reference_data"] = efconfig.reference_data(m)["path"]
    return files


def checkpoint_file(wildcards):
    path = M(wildcards)["checkpoint"].get("path")
    return {"checkpoint": path} if path else {}


def calibration_input(wildcards):
    m = M(wildcards)
    if wildcards.precision in efconfig.QUANTIZED:
        return {"calibration": m["calibration"]["path"]}
    return {}


def evaluation_input(wildcards):
    m = M(wildcards)
    return {"evaluation": m["evaluation"]["path"]} if "evaluation" in m else {}


def flags_mode_input(wildcards):
    """TensorRT 10 flags mode builds the fp32 ONNX with builder precision flags."""
    trt = M(wildcards)["tensorrt"]
    if (
        wildcards.backend not in ("tensorrt", "trtexec")
        or trt["precision_mode"] != "flags"
    ):
        return {}
    files = {"fp32": f"{A}/{wildcards.model}/precision/fp32/model.onnx"}
    if wildcards.precision == "int8" and trt.get("int8_calibration_cache"):
        files["calib_cache"] = trt["int8_calibration_cache"]
    return files


def engine_path(model, backend, precision, profile):
    suffix = "onnx" if backend == "onnxruntime" else "plan"
    return f"{A}/{model}/build/{backend}/{precision}/{profile}/engine.{suffix}"


def first_profile(model):
    return next(iter(MODELS[model]["profiles"]))


def usable_backends(model):
    return [b for b in MODELS[model]["backends"] if BACKENDS[b]["ok"]]


def build_profiles(model, backend):
    m = MODELS[model]
    profiles = list(m["profiles"])
    if backend != "onnxruntime" and m["tensorrt"]["multi_profile_engine"]:
        profiles.append("all")
    return profiles


def model_targets(model):
    """Every per-model output that the tracking record reads."""
    m = MODELS[model]
    t = {
        "export": f"{A}/{model}/export/export.json",
        "simplify": f"{A}/{model}/simplify/simplify.json",
        "simplified_onnx": f"{A}/{model}/simplify/model.onnx",
        "drift": f"{A}/{model}/audit/drift.json",
        "drift_md": f"{A}/{model}/audit/drift.md",
        "precision": {
            p: f"{A}/{model}/precision/{p}/precision.json" for p in m["precisions"]
        },
        "audit": {},
        "build": {},
        "bench": {},
        "baseline": {
            prof: f"{A}/{model}/bench/pytorch/{prof}.json" for prof in m["profiles"]
        },
        "artifacts": {"engine": {}},
    }
    for b in usable_backends(model):
        for p in m["precisions"]:
            t["audit"][(b, p)] = f"{A}/{model}/audit/{b}/{p}.json"
            for prof in build_profiles(model, b):
                key = (b, p, prof)
                t["build"][key] = f"{A}/{model}/build/{b}/{p}/{prof}/build.json"
                t["artifacts"]["engine"][key] = engine_path(model, b, p, prof)
                if prof != "all":
                    t["bench"][key] = f"{A}/{model}/bench/{b}/{p}/{prof}.json"
    return t


def flatten(obj):
    if isinstance(obj, dict):
        return [f for v in obj.values() for f in flatten(v)]
    return [obj]


def all_targets():
    return [f"{A}/summary.md"] + [f"{A}/{m}/track.json" for m in MODELS]


def print_summary():
    efrunner.print_file(f"{A}/summary.md")


def print_failures():
    efrunner.print_failures(A, MODELS)
