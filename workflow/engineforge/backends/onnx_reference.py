"""A Polygraphy runner over ONNX's reference implementation (``onnx.reference``).

The audit uses it for variants that no runtime on this machine can execute —
bf16 and fp8 on ONNX Runtime's CPU provider — so their drift is still
measured, by the ONNX specification's arithmetic (numpy, emulated low
precision). It is slow (pure Python: a bilinear ``Resize`` once took 24+ minutes), so it
is only used below ``MAX_BYTES`` and within a time limit (:func:`time_limit`, the model's
``time_limits.emulated_audit``); its rows are labelled ``onnx-reference (emulated)``.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import threading
import time
from collections import OrderedDict
from pathlib import Path

from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata
from polygraphy.datatype import DataType

NAME = "onnx-reference"
MAX_BYTES = 256 << 20


class OnnxReferenceRunner(BaseRunner):
    def __init__(self, path: str | Path, name: str | None = None):
        super().__init__(name=name, prefix="onnx-reference-runner")
        self.path = str(path)

    def activate_impl(self):
        import onnx
        from onnx.reference import ReferenceEvaluator

        self.model = onnx.load(self.path)
        self.evaluator = ReferenceEvaluator(self.model)

    def get_input_metadata_impl(self):
        meta = TensorMetadata()
        for inp in self.model.graph.input:
            dims = [d.dim_value or d.dim_param for d in inp.type.tensor_type.shape.dim]
            meta.add(inp.name, dtype=DataType.from_dtype(inp.type.tensor_type.elem_type, "onnx"),
                     shape=dims)
        return meta

    def infer_impl(self, feed_dict):
        import numpy as np

        start = time.time()
        outs = self.evaluator.run(None, {k: np.asarray(v) for k, v in feed_dict.items()})
        self.inference_time = time.time() - start
        names = [o.name for o in self.model.graph.output]
        # bf16/fp8 arrays (ml_dtypes) are compared in float32
        return OrderedDict((n, np.asarray(o).astype(np.float32)) for n, o in zip(names, outs))

    def deactivate_impl(self):
        del self.evaluator, self.model


def usable(path: str | Path) -> bool:
    return Path(path).stat().st_size <= MAX_BYTES


class Stopped(BaseException):
    """The emulation ran past its time limit. A BaseException, like KeyboardInterrupt: the
    ``except Exception`` blocks of the libraries it runs through do not swallow it."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise :class:`Stopped` in this thread once ``seconds`` have passed; the timer is
    cleared on the way out, however the block ends.

    In the main thread (the audit's worker process runs bodies there) a ``SIGALRM`` timer
    interrupts the pure-Python evaluator between bytecodes; elsewhere (isolation off) a
    timer thread sets an asynchronous exception in this thread, which acts the same way.
    """
    if threading.current_thread() is threading.main_thread():
        def alarm(signum, frame):
            raise Stopped(seconds)

        previous = signal.signal(signal.SIGALRM, alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
        finally:
            try:
                signal.setitimer(signal.ITIMER_REAL, 0)
            finally:
                signal.signal(signal.SIGALRM, previous)
        return
    tid, lock, state = threading.get_ident(), threading.Lock(), {"done": False, "fired": False}

    def fire():
        with lock:
            if not state["done"]:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid),
                                                           ctypes.py_object(Stopped))
                state["fired"] = True

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        with lock:
            state["done"] = True
            timer.cancel()
            if state["fired"]:  # drop one still pending (set after the block had ended)
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), None)
