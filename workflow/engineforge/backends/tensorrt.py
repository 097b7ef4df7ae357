"""TensorRT and TensorRT-RTX backends, built through Polygraphy's loaders.

``NetworkFromOnnxPath`` → ``CreateConfig`` (every profile in one engine) →
``EngineBytesFromNetwork``, i.e. what ``polygraphy convert --convert-to trt`` does.

* ``tensorrt-rtx`` builds ahead of time on a CPU-only machine; the engines run only
  on compute capability 8.0/8.6/8.9/12.x GPUs. Networks are strongly typed: the
  precision comes from the ONNX graph (AutoCast casts, Q/DQ nodes).
* ``tensorrt`` (the full builder, NGC container) also builds strongly typed networks;
  ``tensorrt.precision_mode: flags`` instead passes fp32 ONNX + TensorRT 10 builder flags.

One flavour per process: Polygraphy chooses its TensorRT module (``tensorrt`` or
``tensorrt_rtx``) once, when ``polygraphy.backend.trt`` is first imported. Every job runs
in its own child process (worker.py), so both flavours mix in one run; where they would
share a process (``ENGINEFORGE_ISOLATION=0``) the second refuses with a BuildError instead
of silently building with the wrong library.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import re
import sys
import threading
import time
import warnings
from pathlib import Path

from engineforge.backends.base import Availability, Backend, BuildRequest
from engineforge.errors import BenchError, BuildError
from engineforge.sidecar import atomic_path

RTX_CCS = ((8, 0), (8, 6), (8, 9))        # plus every 12.x (Blackwell)
RTX_RUNS_ON = "compute capability 8.0/8.6/8.9/12.x"
FLAG_PRECISIONS = ("fp16", "bf16", "int8", "fp8")
# Logged by TensorRT-RTX on a machine without a CUDA driver while Polygraphy's CreateConfig
# creates its (always-created, empty) timing cache; harmless, so kept out of error messages.
_NO_DRIVER = re.compile(r"cudaError 35|CUDA driver version is insufficient")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _cuda_capabilities() -> list[tuple[str, tuple[int, int]]]:
    """(name, (major, minor)) of each visible CUDA GPU; [] without torch or a GPU."""
    if importlib.util.find_spec("torch") is None:
        return []
    import torch

    if not torch.cuda.is_available():
        return []
    return [(torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i))
            for i in range(torch.cuda.device_count())]


def _bound_flavour() -> str | None:
    """Which TensorRT module polygraphy.backend.trt uses in this process (None: not imported)."""
    if "polygraphy.backend.trt" not in sys.modules:
        return None
    from polygraphy import config

    return "tensorrt-rtx" if config.USE_TENSORRT_RTX else "tensorrt"


# Polygraphy's logger is process-global; builds in one process (Snakemake jobs run as
# threads) take turns so that each build's log file gets its own messages.
_BUILD_LOCK = threading.Lock()


@contextlib.contextmanager
def _log_to(path: Path):
    """Mirror Polygraphy's log (TensorRT's own messages arrive through it) into ``path``."""
    from polygraphy.logger import G_LOGGER

    # G_LOGGER.log_file's setter reopens (truncates) a file, so swap the handle itself and
    # hand the caller's log file back afterwards.
    saved = (G_LOGGER._log_path, G_LOGGER._log_file)
    G_LOGGER.log_file = str(path)
    try:
        yield
    finally:
        G_LOGGER._log_file.close()
        G_LOGGER._log_path, G_LOGGER._log_file = saved


def _errors_in(log: Path) -> list[str]:
    lines = _ANSI.sub("", log.read_text(errors="replace")).splitlines() if log.exists() else []
    # TensorRT's errors, once each ("[!]" lines repeat the exception's own text)
    return list(dict.fromkeys(ln.strip() for ln in lines
                              if ln.startswith("[E]") and not _NO_DRIVER.search(ln)))


class _PolygraphyTensorRT(Backend):
    module = ""            # the Python module that builds
    rtx = False

    # -- what is installed, what can run --------------------------------------------------
    def availability(self) -> Availability:
        # Package metadata only: this runs while Snakemake parses the workflow.
        if importlib.util.find_spec(self.module) is None:
            return self._absent()
        from importlib import metadata

        for dist in self.tools:
            with contextlib.suppress(metadata.PackageNotFoundError):
                return Availability(True, version=metadata.version(dist))
        return Availability(True, version="unknown")

    def _absent(self) -> Availability:
        raise NotImplementedError

    def _trt(self):
        """Bind Polygraphy to this flavour; return (polygraphy.backend.trt, the TensorRT module)."""
        bound = _bound_flavour()
        if bound not in (None, self.name):
            raise BuildError(f"Polygraphy's TensorRT backend is already bound to {bound} in this "
                             f"process, so {self.name} cannot build here",
                             fix=f"run {self.name} builds in a separate process")
        if bound is None:
            # polygraphy.config reads the variable when *it* is imported, which may already
            # have happened (e.g. the ONNX Runtime audit): set the variable and the attribute.
            os.environ["POLYGRAPHY_USE_TENSORRT_RTX"] = "1" if self.rtx else "0"
            from polygraphy import config

            config.USE_TENSORRT_RTX = self.rtx
            if self.rtx:    # Polygraphy imports `tensorrt_rtx`; the wheel's module is named so
                sys.modules.setdefault("tensorrt_rtx", importlib.import_module(self.module))
        import polygraphy.backend.trt as ptrt

        return ptrt, importlib.import_module("tensorrt_rtx" if self.rtx else "tensorrt")

    # -- build --------------------------------------------------------------------------------
    def _mode(self, req: BuildRequest, trt) -> tuple[bool, dict]:
        """(strongly typed?, CreateConfig precision kwargs) for this request."""
        mode = req.settings.get("precision_mode", "graph")
        if mode != "flags":
            # TensorRT 11 and RTX networks are always strongly typed; TensorRT 10 opts in.
            return hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"), {}
        raise BuildError(f"{self.name} has no builder precision flags (TensorRT 11 and "
                         "TensorRT-RTX take precision from the ONNX graph)", model=req.model,
                         key="tensorrt.precision_mode", fix="use precision_mode: graph")

    def _create_config(self, ptrt, kwargs: dict, req: BuildRequest):
        return ptrt.CreateConfig(**kwargs)

    def build(self, req: BuildRequest) -> dict:
        with _BUILD_LOCK:
            return self._build(req)

    def _build(self, req: BuildRequest) -> dict:
        ptrt, trt = self._trt()
        strongly_typed, precision_kwargs = self._mode(req, trt)
        req.work_dir.mkdir(parents=True, exist_ok=True)
        log = req.work_dir / f"{self.name}-build.log"
        profiles = [ptrt.Profile() for _ in req.profiles]
        for prof, shapes in zip(profiles, req.profiles):
            for name, s in shapes.items():
                prof.add(name, min=s["min"], opt=s["opt"], max=s["max"])
        kwargs = dict(profiles=profiles, profiling_verbosity=trt.ProfilingVerbosity.DETAILED,
                      builder_optimization_level=req.settings.get("builder_optimization_level"),
                      **precision_kwargs)
        if req.settings.get("workspace_mib"):
            kwargs["memory_pool_limits"] = {
                trt.MemoryPoolType.WORKSPACE: int(req.settings["workspace_mib"]) << 20}
        cache = str(req.timing_cache) if req.timing_cache else None
        cache_note = self._timing_cache_note()
        if cache and not cache_note:
            req.timing_cache.parent.mkdir(parents=True, exist_ok=True)
            kwargs["load_timing_cache"] = cache
        seen: dict = {}

        def remember(builder, network, config):   # what TensorRT was really asked to build
            seen["profiles"] = config.num_optimization_profiles

        t0 = time.perf_counter()
        try:
            with _log_to(log), warnings.catch_warnings():
                # Polygraphy's CreateConfig always attaches an (empty) timing cache.
                warnings.filterwarnings("ignore", "Use Deprecated in TensorRT-RTX",
                                        DeprecationWarning)
                # Keep the (builder, network, parser) tuple: its layers are the fallback layer
                # info when the engine cannot be deserialized here.
                net = ptrt.network_from_onnx_path(str(req.onnx_path), strongly_typed=strongly_typed)
                config = ptrt.PostprocessConfig(self._create_config(ptrt, kwargs, req), remember)
                plan = ptrt.engine_bytes_from_network(
                    net, config=config, save_timing_cache=None if cache_note else cache)
        except BuildError:
            raise
        except Exception as err:  # noqa: BLE001 - PolygraphyException, TensorRT RuntimeErrors
            said = _errors_in(log)
            raise BuildError(
                f"{self.name} could not build the {req.precision} engine from "
                f"{req.onnx_path.name}: {str(err).strip()[:300]}"
                + (f" | TensorRT: {' | '.join(said[-4:])[:800]}" if said else ""),
                model=req.model, fix=f"see {log}; `polygraphy inspect capability "
                                     f"{req.onnx_path}` lists the nodes TensorRT cannot parse",
            ) from None
        build_s = time.perf_counter() - t0
        with atomic_path(req.engine_path) as tmp, open(tmp, "wb") as f:
            f.write(plan)
        if cache and not cache_note and "timing cache will not be used" in log.read_text():
            cache_note = "TensorRT did not use the timing cache (see the build log)"
        layers, source = self._layer_info(ptrt, trt, plan, net[1], req.precision)
        info = req.work_dir / f"{self.name}-layers.json"
        info.write_text(json.dumps({"source": source, "layers": layers}, indent=1, default=str))
        return {"build_time_s": round(build_s, 3),
                "engine_bytes": req.engine_path.stat().st_size,
                "trt_version": trt.__version__, "flavour": self.name,
                "strongly_typed": strongly_typed, "precision_mode":
                    req.settings.get("precision_mode", "graph"),
                "profiles": seen.get("profiles"), "layer_info": str(info),
                "num_layers": len(layers), "layer_info_source": source,
                "timing_cache": {"path": cache, "used": bool(cache) and not cache_note,
                                 "note": cache_note if cache else None},
                "log": str(log), "runs_on": self._runs_on(req)}

    def _timing_cache_note(self) -> str | None:
        """Why the timing cache is skipped here (None: use it)."""
        return None

    def _runs_on(self, req: BuildRequest) -> str:
        gpus = _cuda_capabilities()
        where = f" (built on {gpus[0][0]})" if gpus else ""
        return "the GPU model and TensorRT version it was built with" + where

    def _layer_info(self, ptrt, trt, plan, network, precision) -> tuple[list, str]:
        """Engine inspector output where the engine deserializes here, else the parsed network."""
        if self.runnable(precision)[0]:
            with contextlib.suppress(Exception):
                engine = ptrt.engine_from_bytes(plan)
                inspector = engine.create_engine_inspector()
                got = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
                return got.get("Layers", []), "engine inspector"

        def tensors(n, get):
            return [{"name": t.name, "dtype": str(t.dtype), "shape": list(t.shape)}
                    for t in (get(i) for i in range(n)) if t is not None]

        return ([{"name": lyr.name, "type": str(lyr.type),
                  "inputs": tensors(lyr.num_inputs, lyr.get_input),
                  "outputs": tensors(lyr.num_outputs, lyr.get_output)}
                 for lyr in network],
                "network (the engine cannot be deserialized on this machine)")

    # -- run ----------------------------------------------------------------------------------
    def runner(self, engine_path: Path):
        ptrt, _ = self._trt()
        from polygraphy.backend.common import BytesFromPath

        return ptrt.TrtRunner(ptrt.EngineFromBytes(BytesFromPath(str(engine_path))))

    def bench(self, engine_path: Path, shapes: dict[str, list[int]], settings: dict,
              work_dir: Path) -> dict:
        import numpy as np

        from engineforge.stages.bench import time_callable

        ok, why = self.runnable("any")
        if not ok:
            raise BenchError(why)
        rng = np.random.default_rng(0)
        try:
            with self.runner(engine_path) as runner:
                runner.set_profile(_profile_for(runner.engine, shapes))
                meta = runner.get_input_metadata(use_numpy_dtypes=False)
                feed = {n: rng.random(shapes[n]).astype(m.dtype.numpy()) for n, m in meta.items()}
                copy_out = not settings.get("no_data_transfers", False)
                stats = time_callable(lambda: runner.infer(feed, copy_outputs_to_host=copy_out),
                                      settings["warmup"], settings["iterations"],
                                      batch=next(iter(shapes.values()))[0])
        except BenchError:
            raise
        except Exception as err:  # noqa: BLE001
            raise BenchError(f"{self.name} cannot run {engine_path} at {shapes}: "
                             f"{str(err).strip()[:400]}") from None
        return stats | {"extra": {"copy_outputs_to_host": copy_out}}


def _profile_for(engine, shapes: dict[str, list[int]]) -> int:
    """The first optimization profile whose [min, max] range holds every input shape."""
    for idx in range(engine.num_optimization_profiles):
        ranges = {n: engine.get_tensor_profile_shape(n, idx) for n in shapes}
        if all(all(lo <= d <= hi for d, lo, hi in zip(shapes[n], r[0], r[2]))
               for n, r in ranges.items()):
            return idx
    raise BenchError(f"no optimization profile of the engine covers the shapes {shapes}")


class TensorRTBackend(_PolygraphyTensorRT):
    """The full TensorRT builder (NGC container): graph precision, or TensorRT 10 flags."""

    name = "tensorrt"
    module = "tensorrt"
    settings_section = "tensorrt"
    tools = ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "polygraphy")
    timing_cache = True
    multi_profile = True
    flags_mode = True

    def _absent(self) -> Availability:
        return Availability(False, "the tensorrt Python package (full builder) is not installed",
                            "run inside nvcr.io/nvidia/tensorrt:<tag> (pip's tensorrt wheels "
                            "download from NVIDIA's index at install time)")

    def _mode(self, req: BuildRequest, trt) -> tuple[bool, dict]:
        if req.settings.get("precision_mode", "graph") != "flags":
            return super()._mode(req, trt)
        if int(trt.__version__.split(".")[0]) >= 11:
            return super()._mode(req, trt)          # raises: TensorRT 11 removed the flags
        kwargs = {req.precision: True} if req.precision in FLAG_PRECISIONS else {}
        if req.precision == "int8":
            kwargs["calibrator"] = self._calibrator(req)
        return False, kwargs                     # builder flags need a weakly typed network

    def _calibrator(self, req: BuildRequest):
        npz, cache = req.calib_npz, req.calib_cache
        if not npz and not (cache and Path(cache).exists()):
            raise BuildError("flags-mode int8 needs calibration data", model=req.model,
                             key=f"models.{req.model}.calibration",
                             fix="give the model calibration data (input name -> [N, ...] "
                                 "array) or tensorrt.int8_calibration_cache, or use "
                                 "precision_mode: graph (Q/DQ ONNX)")
        import numpy as np
        from polygraphy.backend.trt import Calibrator

        batches = []              # none: TensorRT reads the existing calibration cache
        if npz:                  # batches of the last (calibration) profile's opt batch size
            data = np.load(npz)
            step = max(1, next(iter(req.profiles[-1].values()))["opt"][0])
            count = len(data[data.files[0]])
            batches = [{k: data[k][i:i + step] for k in data.files} for i in range(0, count, step)]
        return Calibrator(batches, cache=str(cache) if cache else None)

    def runnable(self, precision: str) -> tuple[bool, str]:
        if not self.availability().ok:
            return False, "the tensorrt Python package is not installed"
        if not _cuda_capabilities():
            return False, "TensorRT engines need a CUDA GPU; this machine has none"
        return True, ""


class TensorRTRTXBackend(_PolygraphyTensorRT):
    """TensorRT-RTX: ahead-of-time builds on any machine, for RTX-class GPUs."""

    name = "tensorrt-rtx"
    module = "tensorrt_rtx_bindings"
    rtx = True
    device_class = "rtx:sm80/86/89/12x (ahead-of-time, built on CPU)"
    settings_section = "tensorrt"
    tools = ("tensorrt_rtx_cu13_bindings", "polygraphy")
    multi_profile = True

    @classmethod
    def needs_gpu(cls, stage: str, device: str) -> bool:
        return stage != "build" and device == "cuda"  # builds ahead of time on a CPU

    def _absent(self) -> Availability:
        return Availability(False, "tensorrt_rtx_bindings is not installed",
                            "pip install tensorrt_rtx_cu13_libs tensorrt_rtx_cu13_bindings")

    def _create_config(self, ptrt, kwargs: dict, req: BuildRequest):
        from polygraphy.backend.tensorrt_rtx import CreateConfigRTX

        # Optional `compute_capabilities: [[8, 6], [12, 0]]` narrows the target GPUs.
        ccs = [tuple(cc) for cc in req.settings.get("compute_capabilities") or []]
        return CreateConfigRTX(compute_capabilities=ccs or None, **kwargs)

    def _timing_cache_note(self) -> str | None:
        # The bindings warn "Deprecated in TensorRT-RTX 1.2. Timing cache operations are no-ops
        # in TensorRT-RTX"; without a CUDA driver the cache cannot even be created (cudaError 35).
        return "skipped: timing cache operations are no-ops in TensorRT-RTX (>= 1.2)"

    def _runs_on(self, req: BuildRequest) -> str:
        ccs = req.settings.get("compute_capabilities")
        return "compute capability " + "/".join(f"{a}.{b}" for a, b in ccs) if ccs else RTX_RUNS_ON

    def runnable(self, precision: str) -> tuple[bool, str]:
        if not self.availability().ok:
            return False, "tensorrt_rtx_bindings is not installed"
        gpus = _cuda_capabilities()
        fits = [g for g, cc in gpus if cc in RTX_CCS or cc[0] == 12]
        if fits:
            return True, ""
        have = ", ".join(f"{g} ({a}.{b})" for g, (a, b) in gpus) or "none"
        return False, (f"TensorRT-RTX engines run only on {RTX_RUNS_ON} GPUs; "
                       f"this machine has {have}")
