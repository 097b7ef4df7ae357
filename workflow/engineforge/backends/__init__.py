"""Engine backends: one module each, one line here (see base.Backend for the contract)."""

from __future__ import annotations

import functools
import importlib

from engineforge.backends.base import Availability, Backend, BuildRequest

REGISTRY = {
    "onnxruntime": "engineforge.backends.onnxruntime:OnnxRuntimeBackend",
    "tensorrt-rtx": "engineforge.backends.tensorrt:TensorRTRTXBackend",
    "tensorrt": "engineforge.backends.tensorrt:TensorRTBackend",
    "trtexec": "engineforge.backends.trtexec:TrtexecBackend",
    "torch-inductor": "engineforge.backends.torch_inductor:TorchInductorBackend",
}


def names() -> list[str]:
    """Backend names in registry order (also the drift matrix's row order)."""
    return list(REGISTRY)


@functools.cache
def backend_class(name: str) -> type[Backend]:
    try:
        module, cls = REGISTRY[name].split(":")
    except KeyError:
        raise KeyError(f"unknown backend {name!r}; registered: {names()}") from None
    return getattr(importlib.import_module(module), cls)


def get_backend(name: str) -> Backend:
    return backend_class(name)()


__all__ = ["Availability", "Backend", "BuildRequest", "REGISTRY", "backend_class",
           "get_backend", "names"]
