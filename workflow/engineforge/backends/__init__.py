"""Engine backends: one module each, same contract (see base.Backend)."""

from __future__ import annotations

from engineforge.backends.base import Availability, Backend, BuildRequest

_REGISTRY = {
    "onnxruntime": "engineforge.backends.onnxruntime:OnnxRuntimeBackend",
    "tensorrt-rtx": "engineforge.backends.tensorrt:TensorRTRTXBackend",
    "tensorrt": "engineforge.backends.tensorrt:TensorRTBackend",
    "trtexec": "engineforge.backends.trtexec:TrtexecBackend",
}


def get_backend(name: str) -> Backend:
    import importlib

    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)()


__all__ = ["Availability", "Backend", "BuildRequest", "get_backend"]
