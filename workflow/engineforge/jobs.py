"""What each Snakemake rule's job calls: rule name -> stage function and its arguments.

Keeps the rules thin (one line in ``run:``) and the mapping from Snakemake's
named inputs/outputs to the stage functions in one readable place.
"""

from __future__ import annotations

import contextlib
import importlib
import threading
from pathlib import Path

from engineforge.runner import run_stage

HERE = Path(".")

# Jobs run as threads of one Snakemake process. Two threads importing intertwined packages
# at once can deadlock on Python's per-module import locks (seen with
# modelopt.onnx.autocast and modelopt.onnx.quantization), so each rule's heavy modules are
# imported first, one thread at a time.
_IMPORT_LOCK = threading.Lock()
HEAVY = {
    "export": ("torch", "onnx", "onnxruntime", "torch.onnx", "onnxscript"),
    "simplify": ("onnx", "onnxsim"),
    "precision": ("onnx", "onnxruntime", "modelopt.onnx.autocast",
                  "modelopt.onnx.quantization"),
    "audit": ("onnxruntime", "polygraphy.comparator", "polygraphy.backend.onnxrt"),
    "build": ("onnx", "onnxruntime"),
    "build_onnxruntime": ("onnxruntime",),
    "bench": ("onnxruntime",),
    "bench_pytorch": ("torch",),
    "track": ("mlflow",),
}


# Libraries with process-global state take turns, one lock per library: torch.onnx.export
# and torch.export (two concurrent exports failed spuriously), ModelOpt (global loggers,
# Polygraphy's global logger inside AutoCast) and Polygraphy's comparator. Jobs of
# different libraries still run side by side.
_EXCLUSIVE = {"export": threading.Lock(), "precision": threading.Lock(),
              "audit": threading.Lock()}


def _preload(rule: str) -> None:
    with _IMPORT_LOCK:
        for name in HEAVY.get(rule, ()):
            importlib.import_module(name)


def _export(w, i, o, p, m, a):
    return "stages.export:run", (w.model, m, Path(o.onnx), Path(o.reference), Path(o.sidecar),
                                 HERE), {}


def _simplify(w, i, o, p, m, a):
    return "stages.simplify:run", (w.model, m, Path(i.onnx), Path(o.onnx), Path(o.sidecar)), {}


def _precision(w, i, o, p, m, a):
    return "stages.precision:run", (w.model, m, w.precision, Path(i.onnx), Path(o.onnx),
                                    Path(o.sidecar), HERE), {}


def _build(w, i, o, p, m, a):
    fp32 = Path(i.fp32) if "fp32" in i.keys() else None
    return "stages.build:run", (w.model, m, w.backend, w.precision, w.profile, Path(i.onnx),
                                Path(o.engine), Path(o.sidecar), Path(o.engine).parent), {
        "fp32_onnx": fp32, "timing_cache_dir": Path(p.timing_cache)}


def _audit(w, i, o, p, m, a):
    return "stages.audit:run", (w.model, m, w.backend, w.precision, Path(i.engine),
                                Path(i.reference), Path(o[0]), HERE), {}


def _drift_matrix(w, i, o, p, m, a):
    return "stages.audit:drift_matrix", (w.model, [Path(f) for f in i], Path(o.json),
                                         Path(o.md)), {}


def _bench(w, i, o, p, m, a):
    return "stages.bench:run", (w.model, m, w.backend, w.precision, w.profile, Path(i.engine),
                                Path(i.build), Path(o[0]), Path(o[0]).parent), {}


def _bench_pytorch(w, i, o, p, m, a):
    return "stages.bench:run_baseline", (w.model, m, w.profile, Path(o[0]), HERE), {}


def _track(w, i, o, p, m, a):
    return "tracking:track_model", (w.model, m, p.experiment, p.targets, Path(o[0]), a), {}


def _summary(w, i, o, p, m, a):
    return "summary:write", (Path(a), p.models, p.backends, Path(o.md),
                             Path(o.json)), {}


JOBS = {"export": _export, "simplify": _simplify, "precision": _precision, "build": _build,
        "build_onnxruntime": _build, "audit": _audit, "drift_matrix": _drift_matrix,
        "bench": _bench, "bench_pytorch": _bench_pytorch, "track": _track,
        "summary": _summary}


def run(rule: str, wildcards, input, output, params, log, models: dict, artifacts: str):
    """Run one job of ``rule`` in this process, through :func:`runner.run_stage`."""
    _preload(rule)
    model = models.get(wildcards.get("model")) if hasattr(wildcards, "get") else None
    target, args, kwargs = JOBS[rule](wildcards, input, output, params, model, artifacts)
    module, func = target.split(":")
    fn = getattr(importlib.import_module(f"engineforge.{module}"), func)
    job_id = "-".join([rule, *[str(v) for v in wildcards]]) if len(wildcards) else rule
    with _EXCLUSIVE.get(rule) or contextlib.nullcontext():
        return run_stage(log[0], job_id, artifacts, fn, *args, **kwargs)
