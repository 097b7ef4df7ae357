"""Versions of the tools whose upgrade changes a stage's output.

Read from package metadata (no heavy imports), so the Snakefile can put them
into ``params:`` and Snakemake reruns exactly the stages a tool upgrade affects.
``ENGINEFORGE_TOOL_VERSIONS='{"onnxsim": "9.9"}'`` overrides entries: it
simulates an upgrade in tests and pins a version that metadata cannot see
(e.g. a trtexec binary).
"""

from __future__ import annotations

import json
import os
from importlib import metadata

# stage -> distributions that affect its output
STAGE_TOOLS = {
    "export": ("torch", "torchvision", "onnx", "onnxscript"),
    "simplify": ("onnx", "onnxsim"),
    "precision": ("onnx", "nvidia-modelopt", "onnxruntime-gpu"),
    "audit": ("polygraphy", "onnxruntime-gpu", "onnx", "torch"),
    "build": ("onnxruntime-gpu",),
    "bench": ("onnxruntime-gpu", "torch"),
    "baseline": ("torch",),
}
BACKEND_TOOLS = {
    "onnxruntime": ("onnxruntime-gpu",),
    "tensorrt-rtx": ("tensorrt_rtx_cu13_bindings", "polygraphy"),
    "tensorrt": ("tensorrt", "polygraphy"),
    "trtexec": (),  # the binary's banner version is added by the workflow (BACKENDS)
}


def _overrides() -> dict:
    raw = os.environ.get("ENGINEFORGE_TOOL_VERSIONS")
    return json.loads(raw) if raw else {}


def version(dist: str) -> str:
    over = _overrides()
    if dist in over:
        return str(over[dist])
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


def tool_versions(stage: str, backend: str | None = None) -> dict:
    names = list(STAGE_TOOLS.get(stage, ()))
    if backend:
        names = list(BACKEND_TOOLS.get(backend, ())) + [n for n in names if stage != "build"]
    return {n: version(n) for n in names}
