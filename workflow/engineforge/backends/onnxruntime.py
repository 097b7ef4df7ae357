"""ONNX Runtime backend: an offline-optimized ORT model per precision × profile.

ORT has no optimization profiles; the same optimized model serves every
profile, and the bench times it at each profile's min/opt/max shapes. Graph
optimizations are applied at ``ORT_ENABLE_EXTENDED`` (the highest level whose
saved model stays portable across CPUs, per ORT's graph-optimization docs).
"""

from __future__ import annotations

import importlib.util
import shutil
import time
from pathlib import Path

from engineforge.backends.base import Availability, Backend, BuildRequest
from engineforge.errors import BenchError
from engineforge.sidecar import atomic_path

OPT_LEVEL = "ORT_ENABLE_EXTENDED"


def _version() -> str:
    from importlib import metadata

    for dist in OnnxRuntimeBackend.tools:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


def providers() -> list[str]:
    """CPU always; CUDA where onnxruntime-gpu finds a usable GPU."""
    import onnxruntime as ort

    avail = ort.get_available_providers()
    use = ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in avail and _cuda_device_present():
        use.insert(0, "CUDAExecutionProvider")
    return use


def _cuda_device_present() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def session(path: str | Path, threads: int | None = None, optimize: bool = False):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.graph_optimization_level = (getattr(ort.GraphOptimizationLevel, OPT_LEVEL) if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return ort.InferenceSession(str(path), opts, providers=providers())


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    artifact = "engine.onnx"
    device_class = "cpu"
    tools = ("onnxruntime-gpu", "onnxruntime")

    def availability(self) -> Availability:
        if importlib.util.find_spec("onnxruntime") is None:
            return Availability(False, "onnxruntime is not installed", "make env")
        return Availability(True, version=_version())

    def build(self, req: BuildRequest) -> dict:
        import onnxruntime as ort

        t0 = time.perf_counter()
        with atomic_path(req.engine_path) as tmp:
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVEL)
            opts.optimized_model_filepath = str(tmp)
            try:
                ort.InferenceSession(str(req.onnx_path), opts,
                                     providers=["CPUExecutionProvider"])
                status, reason = "ok", None
            except Exception as err:  # noqa: BLE001 - e.g. no bf16 kernels on the CPU EP
                # A result, not an error: keep the variant as is, and say why it cannot run.
                shutil.copyfile(req.onnx_path, tmp)
                status = "not_runnable"
                reason = ("not runnable on onnxruntime (CPUExecutionProvider): "
                          f"{str(err).strip().splitlines()[0][:300]}")
        return {"status": status, "reason": reason,
                "build_time_s": round(time.perf_counter() - t0, 3),
                "engine_bytes": req.engine_path.stat().st_size,
                "graph_optimization_level": OPT_LEVEL if status == "ok" else None,
                "version": ort.__version__}

    def runnable(self, precision: str) -> tuple[bool, str]:
        # Whether a given model runs is found by loading it (see audit/bench).
        return True, ""

    def bench(self, engine_path: Path, shapes: dict[str, list[int]], settings: dict,
              work_dir: Path) -> dict:
        from engineforge.stages.bench import time_callable

        try:
            sess = session(engine_path, threads=settings["threads"], optimize=False)
        except Exception as err:  # noqa: BLE001
            raise BenchError(f"{str(err).strip().splitlines()[0][:300]}") from None
        feed = _feed_for(sess, shapes)
        names = [o.name for o in sess.get_outputs()]
        stats = time_callable(lambda: sess.run(names, feed), settings["warmup"],
                              settings["iterations"], batch=next(iter(shapes.values()))[0])
        stats["extra"] = {"providers": sess.get_providers()}
        return stats

    def runner(self, engine_path: Path):
        from polygraphy.backend.onnxrt import OnnxrtRunner

        return OnnxrtRunner(lambda: session(engine_path, optimize=False))


def _feed_for(sess, shapes: dict[str, list[int]]) -> dict:
    import numpy as np

    types = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32,
             "tensor(double)": np.float64}
    rng = np.random.default_rng(0)
    feed = {}
    for inp in sess.get_inputs():
        dtype = types.get(inp.type)
        if dtype is None:
            raise BenchError(f"input '{inp.name}' has type {inp.type}, which the bench "
                             "cannot feed")
        feed[inp.name] = rng.random(shapes[inp.name]).astype(dtype)
    return feed
