"""A Polygraphy runner over ONNX's reference implementation (``onnx.reference``).

The audit uses it for variants that no runtime on this machine can execute —
bf16 and fp8 on ONNX Runtime's CPU provider — so their drift is still
measured, by the ONNX specification's arithmetic (numpy, emulated low
precision). It is slow, so it is only used below ``MAX_BYTES`` and on the
audit's small batches; its rows are labelled ``onnx-reference (emulated)``.
"""

from __future__ import annotations

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
