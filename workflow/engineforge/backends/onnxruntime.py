"""ONNX Runtime backend: an offline-optimized ORT model per precision × profile.

ORT has no optimization profiles; the same optimized model serves every
profile, and the bench times it at each profile's min/opt/max shapes. Graph
optimizations are applied at ``ORT_ENABLE_EXTENDED`` (the highest level whose
saved model stays portable across CPUs, per ORT's graph-optimization docs).

int8 builds from ORT's own quantizer's graph (stages/ort_quantize.py, ``quantizers``), not
ModelOpt's TensorRT-oriented Q/DQ graph, which ORT's CPU kernels run slower than fp32. fp8
keeps ModelOpt's graph (ORT's CPU provider has no fp8 kernels).

The provider that actually ran is recorded (``session.get_providers()`` after creation):
a requested CUDA provider that ORT silently replaced by the CPU one fails the bench with
the reason (the CUDA libraries that do not resolve), never a CPU figure under a GPU label.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import shutil
import subprocess
import time
from pathlib import Path

from engineforge.backends.base import Availability, Backend, BuildRequest
from engineforge.errors import BenchError, first_line
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


def session(path: str | Path, threads: int | None = None, optimize: bool = False,
            use: list[str] | None = None):
    """An inference session on ``use`` (default: :func:`providers`)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.graph_optimization_level = (getattr(ort.GraphOptimizationLevel, OPT_LEVEL) if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return ort.InferenceSession(str(path), opts, providers=use or providers())


def check_providers(requested: list[str], ran: list[str]) -> None:
    """A requested provider that ORT dropped (it falls back to CPU without raising) is a
    BenchError naming the cause, so no CPU figure is recorded under a GPU label."""
    dropped = [p for p in requested if p not in ran]
    if not dropped:
        return
    cause = ""
    if "CUDAExecutionProvider" in dropped:
        missing = cuda_provider_missing()
        cause = (f": libonnxruntime_providers_cuda.so needs {', '.join(missing)}, not found "
                 "(docs/backends.md, ONNX Runtime on GPU)" if missing else "")
    raise BenchError(f"{', '.join(dropped)} was requested but ONNX Runtime ran on "
                     f"{', '.join(ran) or 'nothing'}{cause}")


DRIVER_LIBS = ("libcuda.so.1",)  # installed with the NVIDIA driver, never from a wheel


def cuda_provider_missing() -> list[str]:
    """Shared libraries of ORT's CUDA provider that do not resolve in this environment
    after ``onnxruntime.preload_dlls()`` (ORT's own loader of the nvidia-* wheels' CUDA and
    cuDNN libraries): ``ldd`` with the directories of every library now loaded. The NVIDIA
    driver's libraries (``DRIVER_LIBS``) are not counted: no wheel provides them."""
    import onnxruntime as ort

    lib = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    if not lib.exists():
        return [f"{lib.name} itself (this onnxruntime build has no CUDA provider)"]
    return unresolved_libraries(lib)


def unresolved_libraries(lib: Path) -> list[str]:
    """What ``ldd lib`` cannot find after ``onnxruntime.preload_dlls()`` (see above)."""
    import onnxruntime as ort

    with contextlib.redirect_stdout(io.StringIO()):  # it prints what it could not load
        ort.preload_dlls()
    dirs = sorted({str(Path(line.split()[-1]).parent)
                   for line in Path("/proc/self/maps").read_text().splitlines()
                   if ".so" in line.rsplit("/", 1)[-1]})
    env = dict(os.environ, LD_LIBRARY_PATH=":".join(
        dirs + [os.environ.get("LD_LIBRARY_PATH", "")]))
    out = subprocess.run(["ldd", str(lib)], capture_output=True, text=True, env=env,
                         check=False).stdout
    return [line.split()[0] for line in out.splitlines()
            if "not found" in line and line.split()[0] not in DRIVER_LIBS]


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    artifact = "engine.onnx"
    device_class = "cpu"
    tools = ("onnxruntime-gpu", "onnxruntime")
    quantizers = {"int8": "onnxruntime"}   # stages/ort_quantize.py: QDQ u8/s8 per-channel

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
                requested = providers()
                ran = session(tmp, use=requested).get_providers()  # what the bench gets
            except Exception as err:  # noqa: BLE001 - e.g. no bf16 kernels on the CPU EP
                # A result, not an error: keep the variant as is, and say why it cannot run.
                shutil.copyfile(req.onnx_path, tmp)
                status = "not_runnable"
                reason = ("not runnable on onnxruntime (CPUExecutionProvider): "
                          f"{first_line(err, typed=False)}")
                requested = ran = []
        return {"status": status, "reason": reason,
                "requested_providers": requested, "providers": ran,
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

        requested = providers()
        try:
            sess = session(engine_path, threads=settings["threads"], optimize=False,
                           use=requested)
        except Exception as err:  # noqa: BLE001
            raise BenchError(first_line(err, typed=False)) from None
        check_providers(requested, sess.get_providers())
        feed = _feed_for(sess, shapes)
        names = [o.name for o in sess.get_outputs()]
        stats = time_callable(lambda: sess.run(names, feed), settings["warmup"],
                              settings["iterations"], batch=next(iter(shapes.values()))[0])
        stats["extra"] = {"providers": sess.get_providers(), "requested_providers": requested}
        return stats

    @staticmethod
    def note(precision: str, ran: dict) -> str | None:
        """What a reader must know about a figure (the summary shows it); ``ran``: the bench
        point's ``extra``."""
        if (ran.get("providers") or [None])[0] == "CPUExecutionProvider" and \
                precision in ("fp16", "bf16"):
            return (f"ORT CPU has no fast {precision} kernels (ops without one run in fp32 "
                    "between inserted casts): slower than fp32 expected, not a speedup")
        return None

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
