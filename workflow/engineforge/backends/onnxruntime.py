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
On the CUDA provider the bench feeds device-resident inputs through an I/O binding (no host
copies in the timing) and times with the GPU harness (engineforge.gpubench), with and
without ONNX Runtime's own CUDA graphs (``onnxruntime.cuda_graphs``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from engineforge.backends.base import Availability, Backend, BuildRequest, precision_of
from engineforge.errors import BenchError, first_line
from engineforge.settings import base_precision
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


CUDA = "CUDAExecutionProvider"


def providers() -> list[str]:
    """CPU always; CUDA where onnxruntime-gpu finds a usable GPU."""
    import onnxruntime as ort

    avail = ort.get_available_providers()
    use = ["CPUExecutionProvider"]
    if CUDA in avail and _cuda_device_present():
        _preload_cuda_libraries()
        use.insert(0, CUDA)
    return use


@functools.cache
def _preload_cuda_libraries() -> None:
    """ORT's loader of the nvidia-* wheels' CUDA and cuDNN libraries (the ones torch uses),
    so the CUDA provider finds them whatever was imported first."""
    import onnxruntime as ort

    with contextlib.redirect_stdout(io.StringIO()):  # it prints what it could not load
        ort.preload_dlls()


def _cuda_device_present() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def engine_cuda_options(path: str | Path) -> dict:
    """The CUDA provider's options for an engine. ORT lets cuDNN/cuBLAS run fp32 in TF32 by
    default: an fp32 engine (its place in the layout says which) computes in fp32, as the
    audit's fp32 limit assumes (mobilenet_v3_small fp32 on the H100: SNR 57.0 dB with TF32,
    below the 60 dB limit). Other engines keep ORT's default: its switch also takes the tensor
    cores from fp16 convolutions (resnet50 fp16 b32 on the H100: 4.59 -> 11.0 ms)."""
    return {"use_tf32": "0"} if base_precision(precision_of(path)) == "fp32" else {}


def session(path: str | Path, threads: int | None = None, optimize: bool = False,
            use: list[str] | None = None, cuda_options: dict | None = None):
    """An inference session on ``use`` (default: :func:`providers`); the CUDA provider
    with :func:`engine_cuda_options` and ``cuda_options``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.graph_optimization_level = (getattr(ort.GraphOptimizationLevel, OPT_LEVEL) if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return ort.InferenceSession(str(path), opts, providers=[
        (p, {**engine_cuda_options(path), **(cuda_options or {})}) if p == CUDA else p
        for p in use or providers()])


def check_providers(requested: list[str], ran: list[str]) -> None:
    """A requested provider that ORT dropped (it falls back to CPU without raising) is a
    BenchError naming the cause, so no CPU figure is recorded under a GPU label."""
    dropped = [p for p in requested if p not in ran]
    if not dropped:
        return
    cause = ""
    if CUDA in dropped:
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
    _preload_cuda_libraries()
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
    device_class = "cpu"  # the saved model is portable (ORT_ENABLE_EXTENDED); CUDA at runtime
    settings_section = "onnxruntime"
    tools = ("onnxruntime-gpu", "onnxruntime")
    quantizers = {"int8": "onnxruntime"}   # stages/ort_quantize.py: QDQ u8/s8 per-channel

    @classmethod
    def needs_gpu(cls, stage: str, device: str) -> bool:
        return device == "cuda"

    def availability(self) -> Availability:
        if importlib.util.find_spec("onnxruntime") is None:
            return Availability(False, "onnxruntime is not installed", "make env")
        return Availability(True, version=_version())

    def build(self, req: BuildRequest) -> dict:
        """The model optimized offline on the CPU provider (portable), then loaded on the
        providers the bench will use. A graph the CPU provider cannot load (e.g. bf16 Conv)
        is kept unoptimized: the CUDA provider may still run it; if nothing can, that is
        the result, with the reason."""
        import onnxruntime as ort

        t0 = time.perf_counter()
        requested = providers()
        with atomic_path(req.engine_path) as tmp:
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVEL)
            opts.optimized_model_filepath = str(tmp)
            try:
                ort.InferenceSession(str(req.onnx_path), opts,
                                     providers=["CPUExecutionProvider"])
                optimized, why = True, None
            except Exception as err:  # noqa: BLE001 - e.g. no bf16 kernels on the CPU EP
                shutil.copyfile(req.onnx_path, tmp)
                optimized, why = False, err
            try:
                ran = session(tmp, use=requested).get_providers()  # what the bench gets
                status, reason = "ok", None
            except Exception as err:  # noqa: BLE001 - a result, not an error
                status, ran = "not_runnable", []
                reason = (f"not runnable on onnxruntime ({', '.join(requested)}): "
                          f"{runtime_error(err)}")
        return {"status": status, "reason": reason,
                "requested_providers": requested, "providers": ran,
                "build_time_s": round(time.perf_counter() - t0, 3),
                "engine_bytes": req.engine_path.stat().st_size,
                "graph_optimization_level": OPT_LEVEL if optimized else None,
                "offline_optimization_error": None if optimized else runtime_error(why),
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
            raise BenchError(runtime_error(err)) from None
        check_providers(requested, sess.get_providers())
        feed = feed_for(sess, shapes)
        batch = next(iter(shapes.values()))[0]
        on_cuda = sess.get_providers()[0] == CUDA
        ran = {"providers": sess.get_providers(), "requested_providers": requested,
               "device": "cuda" if on_cuda else "cpu"}  # the summary's eager baseline
        if on_cuda:
            stats, facts = bench_cuda(sess, engine_path, feed, settings, batch)
            ran |= facts
        else:
            names = [o.name for o in sess.get_outputs()]
            stats = time_callable(lambda: sess.run(names, feed), settings["warmup"],
                                  settings["iterations"], batch=batch)
        stats["extra"] = {**stats.get("extra", {}), **ran}
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

        return OnnxrtRunner(lambda: _loaded(engine_path))


NO_PROVIDER = re.compile(r"Provider type for (\w+) node with name '([^']*)' is not set")


def runtime_error(err: BaseException) -> str:
    """ORT's error as one readable line. A node no provider took is named: ORT reports it from
    inside its memcpy transformer, as a C++ assertion with a source path."""
    found = NO_PROVIDER.search(str(err))
    if found:
        return (f"no provider here runs its {found[1]} node '{found[2]}' (no kernel for that "
                "op in this graph's data type)")
    return first_line(err, typed=False)


def _loaded(engine_path: Path):
    """A session for the audit's runner; a model ORT cannot load fails in one line."""
    try:
        return session(engine_path, optimize=False)
    except Exception as err:  # noqa: BLE001
        raise RuntimeError(runtime_error(err)) from None


def bench_cuda(sess, engine_path: Path, feed: dict, settings: dict, batch: int,
                cuda_options: dict | None = None) -> tuple[dict, dict]:
    """Time ``sess`` (on the CUDA provider, made with ``cuda_options``): inputs and outputs
    bound on the device (no host copies in the timing), GPU harness, with and without ORT's
    CUDA graphs (``cuda_graphs``; the graphed session gets the same options)."""
    import onnxruntime as ort

    from engineforge import gpubench

    def on_device(s, outputs: dict | None):
        binding = s.io_binding()
        for name, value in feed.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
        for o in s.get_outputs():
            if outputs is None:
                binding.bind_output(o.name, "cuda")
            else:  # a graph replays fixed addresses: outputs allocated once, before capture
                binding.bind_ortvalue_output(o.name, ort.OrtValue.ortvalue_from_shape_and_type(
                    *outputs[o.name], "cuda", 0))
        return binding

    plain = on_device(sess, None)
    sess.run_with_iobinding(plain)
    outputs = {o.name: (v.shape(), _tensor_type(v.data_type()))
               for o, v in zip(sess.get_outputs(), plain.get_outputs())}

    def timed_graphed() -> dict:
        graphed = session(engine_path, use=[CUDA, "CPUExecutionProvider"],
                          cuda_options={**(cuda_options or {}), "enable_cuda_graph": "1"})
        binding = on_device(graphed, outputs)
        graphed.run_with_iobinding(binding)  # the first run captures the graph
        return gpubench.bench_point(lambda: graphed.run_with_iobinding(binding),
                                    warmup=settings["warmup"], batch=batch)

    return gpubench.with_cuda_graphs(
        settings.get("cuda_graphs", "auto"),
        lambda: gpubench.bench_point(lambda: sess.run_with_iobinding(plain),
                                     warmup=settings["warmup"], batch=batch),
        timed_graphed)


def _tensor_type(ort_type: str) -> int:
    """``tensor(float16)`` -> onnx.TensorProto.FLOAT16 (what OrtValue allocation takes)."""
    import onnx

    return getattr(onnx.TensorProto, ort_type.removeprefix("tensor(").removesuffix(")").upper())


def feed_for(sess, shapes: dict[str, list[int]]) -> dict:
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
