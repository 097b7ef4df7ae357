"""trtexec backend: the production TensorRT path, TensorRT 10 and 11 syntax.

Written against NVIDIA's trtexec (samples/trtexec, samples/common/sampleOptions.cpp and
sampleReporting.cpp in github.com/NVIDIA/TensorRT) and the docs pages
https://docs.nvidia.com/deeplearning/tensorrt/latest/reference/command-line-programs.html and
https://docs.nvidia.com/deeplearning/tensorrt/11.0.0/api/migration/tensorrt-10x-to-11x-trtexec.html

Version differences handled here:
- TensorRT 11 networks are always strongly typed: --fp16/--bf16/--int8/--fp8/--best/--calib
  are gone, precision comes from the ONNX graph (casts, Q/DQ). TensorRT 10 has the flags
  and an opt-in --stronglyTyped.
- TensorRT 11 flipped inference defaults: CUDA graphs and spin-wait on, data transfers off,
  the separate profile run always on (--useCudaGraph/--noDataTransfers/--useSpinWait/
  --separateProfileRun are deprecated no-ops; --noCudaGraph/--includeDataTransfers/
  --noSpinWait turn them back). bench_command pins each setting explicitly for both.
- Several optimization profiles in one engine: ``--profile=N`` before each
  --minShapes/--optShapes/--maxShapes triple (repeating the triple alone is an error).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

from engineforge.backends.base import Availability, Backend, BuildRequest
from engineforge.errors import BackendUnavailable, BenchError, BuildError
from engineforge.settings import PRECISIONS

log = logging.getLogger(__name__)

ENV_BINARY = "ENGINEFORGE_TRTEXEC"
HOW = ("run inside the NGC container nvcr.io/nvidia/tensorrt:<tag> "
       "or set tensorrt.trtexec / ENGINEFORGE_TRTEXEC")
PERCENTILES = (50, 90, 95, 99)


# ---------------------------------------------------------------- version / names
def parse_version(text: str) -> tuple[int, int, int]:
    """TensorRT version from trtexec output.

    The banner ``&&&& RUNNING TensorRT.trtexec [TensorRT v100800] [b43] # trtexec ...``
    carries NV_TENSORRT_VERSION: major*10000 + minor*100 + patch since TensorRT 10
    (v100800 -> 10.8.0, v110100 -> 11.1.0); TensorRT 8/9 used major*1000 + minor*100 + patch
    (v8601 -> 8.6.1). A dotted "TensorRT version: 10.8.0" line is accepted too.
    """
    m = re.search(r"\[TensorRT v(\d+)\]", text)
    if m:
        n = int(m.group(1))
        if n >= 100000:
            return n // 10000, n // 100 % 100, n % 100
        return n // 1000, n // 100 % 10, n % 100
    m = re.search(r"TensorRT[ _-]?(?:version:?\s*|v)(\d+)\.(\d+)\.(\d+)", text, re.IGNORECASE)
    if m:
        return int(m.group(1)), int(m.group(2)), int(m.group(3))
    raise ValueError("no TensorRT version found in trtexec output")


def _vstr(v) -> str:
    return ".".join(str(x) for x in v) if isinstance(v, (tuple, list)) else str(v)


def timing_cache_name(gpu_name: str, compute_capability, trt_version) -> str:
    """One timing cache per (GPU, TensorRT version), as a safe file name:
    ``timing-NVIDIA_H100_80GB_HBM3-sm90-trt10.8.0.cache``."""
    gpu = re.sub(r"[^A-Za-z0-9]+", "_", gpu_name).strip("_") or "gpu"
    if isinstance(compute_capability, (tuple, list)):
        cc = "".join(str(x) for x in compute_capability)
    else:
        cc = re.sub(r"[^0-9]", "", str(compute_capability))
    trt = re.sub(r"[^0-9.]", "", _vstr(trt_version))
    return f"timing-{gpu}-sm{cc}-trt{trt}.cache"


# ---------------------------------------------------------------- command lines
def _shape(name: str, dims) -> str:
    # trtexec strips single quotes around names; needed where a name holds ':' or ','.
    name = f"'{name}'" if re.search(r"[:,]", name) else name
    return f"{name}:" + ("x".join(str(int(d)) for d in dims) if len(dims) else "scalar")


def _shapes(profile: dict, key: str) -> str:
    return ",".join(_shape(name, spec[key]) for name, spec in profile.items())


def precision_flags(precision: str, mode: str, trt_version, calib_cache=None,
                    model: str | None = None) -> list[str]:
    """Builder flags choosing the precision (empty on TensorRT 11: the graph decides)."""
    if precision not in PRECISIONS:
        raise BuildError(f"unknown precision {precision!r}; expected one of {PRECISIONS}",
                         model=model, key="precisions")
    if mode not in ("graph", "flags"):
        raise BuildError(f"unknown precision_mode {mode!r}", model=model,
                         key="tensorrt.precision_mode", fix="use 'graph' or 'flags'")
    if trt_version[0] >= 11:
        if mode == "flags":
            raise BuildError(
                f"TensorRT {_vstr(trt_version)} removed the builder precision flags "
                "(--fp16/--bf16/--int8/--fp8/--best/--calib): every network is strongly typed "
                f"and precision comes from the ONNX graph (cannot build {precision} by flags)",
                model=model, key="tensorrt.precision_mode",
                fix="set precision_mode: graph (the precision stage writes casts / Q/DQ)")
        return []
    if mode == "graph":
        return ["--stronglyTyped"]
    if precision == "fp32":
        return []
    flags = [f"--{precision}"]
    if precision == "int8":
        if calib_cache:
            flags.append(f"--calib={calib_cache}")
        else:
            log.warning("%s: --int8 without a calibration cache: TensorRT uses dummy scales, "
                        "the engine times INT8 but its outputs are meaningless", model)
    if precision == "fp8":
        log.warning("%s: TensorRT runs FP8 only through explicit Q/DQ; --fp8 on an fp32 ONNX "
                    "adds no FP8 kernels (use precision_mode: graph)", model)
    return flags


def build_command(req: BuildRequest, trt_version, trtexec: str = "trtexec",
                  save_engine: Path | None = None) -> list[str]:
    """trtexec command line building ``req`` (``save_engine`` overrides the output path)."""
    s = req.settings
    cmd = [trtexec, f"--onnx={req.onnx_path}",
           f"--saveEngine={save_engine or req.engine_path}"]
    multi = len(req.profiles) > 1
    for i, profile in enumerate(req.profiles):
        if multi:
            cmd.append(f"--profile={i}")
        cmd += [f"--minShapes={_shapes(profile, 'min')}",
                f"--optShapes={_shapes(profile, 'opt')}",
                f"--maxShapes={_shapes(profile, 'max')}"]
    cmd += precision_flags(req.precision, s.get("precision_mode", "graph"), trt_version,
                           req.calib_cache, req.model)
    if req.timing_cache:
        cmd.append(f"--timingCacheFile={req.timing_cache}")
    cmd += [f"--memPoolSize=workspace:{int(s.get('workspace_mib', 2048))}M",  # base-2 MiB
            f"--builderOptimizationLevel={int(s.get('builder_optimization_level', 3))}",
            "--profilingVerbosity=detailed",
            f"--exportLayerInfo={Path(req.work_dir) / 'layers.json'}",
            "--skipInference"]
    return cmd


def pinned_bench_settings(settings: dict) -> dict:
    """Inference settings pinned on every bench run (trtexec defaults differ by version)."""
    return {
        "warmup_ms": float(settings.get("warmup_ms", 200)),
        "iterations": int(settings.get("iterations", 10)),
        "duration_s": float(settings.get("duration_s", 3)),
        "avg_runs": int(settings.get("avg_runs", 10)),
        "use_cuda_graph": bool(settings.get("use_cuda_graph", False)),
        "no_data_transfers": bool(settings.get("no_data_transfers", False)),
        "use_spin_wait": bool(settings.get("use_spin_wait", False)),
        "separate_profile_run": True,
    }


def bench_command(engine_path, shapes: dict, settings: dict, work_dir, trt_version,
                  trtexec: str = "trtexec") -> list[str]:
    """trtexec command line timing ``engine_path`` at ``shapes`` with pinned settings."""
    p, work = pinned_bench_settings(settings), Path(work_dir)
    cmd = [trtexec, f"--loadEngine={engine_path}"]
    if shapes:
        cmd.append("--shapes=" + ",".join(_shape(n, d) for n, d in shapes.items()))
    if "profile_index" in settings:  # which profile of a multi-profile engine
        cmd.append(f"--useProfile={int(settings['profile_index'])}")
    cmd += [f"--warmUp={p['warmup_ms']:g}", f"--iterations={p['iterations']}",
            f"--duration={p['duration_s']:g}", f"--avgRuns={p['avg_runs']}",
            "--percentile=90,95,99",
            f"--exportTimes={work / 'times.json'}", f"--exportProfile={work / 'profile.json'}"]
    if trt_version[0] >= 11:  # defaults: graph on, transfers off, spin on, separate run on
        cmd += [] if p["use_cuda_graph"] else ["--noCudaGraph"]
        cmd += [] if p["no_data_transfers"] else ["--includeDataTransfers"]
        cmd += [] if p["use_spin_wait"] else ["--noSpinWait"]
    else:  # TensorRT 10 defaults: all four off
        cmd.append("--separateProfileRun")  # keep the profiler out of the timed run
        cmd += ["--useCudaGraph"] if p["use_cuda_graph"] else []
        cmd += ["--noDataTransfers"] if p["no_data_transfers"] else []
        cmd += ["--useSpinWait"] if p["use_spin_wait"] else []
    return cmd


# ---------------------------------------------------------------- parsers
def _load(path_or_json):
    if isinstance(path_or_json, (list, dict)):
        return path_or_json
    if isinstance(path_or_json, str) and path_or_json.lstrip()[:1] in ("[", "{"):
        return json.loads(path_or_json)
    return json.loads(Path(path_or_json).read_text())


def _percentile(sorted_vals: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy.percentile's default).
    trtexec's own summary picks a nearest rank, so its percentiles can differ slightly."""
    pos = (len(sorted_vals) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def _stats(prefix: str, values: list[float]) -> dict:
    s, n = sorted(values), len(values)
    mean = sum(s) / n
    std = (sum((v - mean) ** 2 for v in s) / n) ** 0.5  # population, as trtexec
    out = {f"{prefix}_mean": mean, f"{prefix}_min": s[0], f"{prefix}_max": s[-1]}
    out.update({f"{prefix}_p{q}": _percentile(s, q) for q in PERCENTILES})
    out[f"{prefix}_cv_pct"] = 100 * std / mean if mean else 0.0
    return out


def parse_export_times(path_or_json) -> dict:
    """Stats from ``--exportTimes`` JSON: one record per timed inference (warm-ups excluded)
    with startEnqMs/endEnqMs, startH2dMs/endH2dMs, startComputeMs/endComputeMs,
    startD2hMs/endD2hMs and h2dMs/computeMs/d2hMs/latencyMs (latency = h2d+compute+d2h)."""
    recs = _load(path_or_json)
    if not isinstance(recs, list) or not recs:
        raise ValueError("exportTimes JSON holds no inference records")

    def span(r, a, b, key):
        return r[key] if key in r else r[b] - r[a]

    h2d = [span(r, "startH2dMs", "endH2dMs", "h2dMs") for r in recs]
    gpu = [span(r, "startComputeMs", "endComputeMs", "computeMs") for r in recs]
    d2h = [span(r, "startD2hMs", "endD2hMs", "d2hMs") for r in recs]
    lat = [r.get("latencyMs", a + b + c) for r, a, b, c in zip(recs, h2d, gpu, d2h, strict=True)]
    # Throughput as trtexec: queries / (last D2H end - first H2D start).
    wall_ms = max(r["endD2hMs"] for r in recs) - min(r["startH2dMs"] for r in recs)
    out = {"count": len(recs), "walltime_ms": wall_ms,
           "throughput_qps": 1000 * len(recs) / wall_ms if wall_ms > 0 else float("nan")}
    out |= _stats("latency_ms", lat) | _stats("gpu_compute_ms", gpu)
    out["h2d_ms_mean"] = sum(h2d) / len(h2d)
    out["d2h_ms_mean"] = sum(d2h) / len(d2h)
    enq = [r["endEnqMs"] - r["startEnqMs"] for r in recs if "startEnqMs" in r]
    if enq:
        out["enqueue_ms_mean"] = sum(enq) / len(enq)
    return out


def parse_export_profile(path_or_json) -> list[dict]:
    """Per-layer timing from ``--exportProfile`` JSON: ``[{"count": N}, {"name", "timeMs",
    "averageMs", "medianMs", "percentage"}, ...]``; the count header is dropped."""
    recs = _load(path_or_json)
    return [r for r in recs if isinstance(r, dict) and "name" in r]


_DTYPE = re.compile(r"\b(FP32|FP16|BF16|FP8|FP4|Int8|Int4|Int32|Int64|UInt8|Bool|Float|Half)\b")


def parse_layer_info(path_or_json) -> dict:
    """``--exportLayerInfo`` JSON (``{"Layers": [...], "Bindings": [...]}``; with
    --profilingVerbosity=detailed each layer is a dict with Name, LayerType, Inputs, Outputs
    carrying "Format/Datatype"). Summarises layer types and output data types."""
    info = _load(path_or_json)
    layers = info.get("Layers", [])
    detailed = [ly for ly in layers if isinstance(ly, dict)]  # else names only (not detailed)
    dtypes = (_DTYPE.search(o.get("Format/Datatype", "")) for ly in detailed
              for o in ly.get("Outputs", []))
    return {"num_layers": len(layers),
            "layer_types": dict(Counter(ly.get("LayerType", "?") for ly in detailed)),
            "output_dtypes": dict(Counter(m.group(1) for m in dtypes if m)),
            "bindings": info.get("Bindings", [])}


_NUM = r"([-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|inf|nan))"
_STAT = re.compile(r"(min|max|mean|median|percentile\(([\d.]+)%\))\s*=\s*" + _NUM + r"\s*ms")


def parse_performance_summary(stdout: str) -> dict:
    """The "=== Performance summary ===" block of trtexec's log (printEpilog): Throughput in
    qps; Latency, Enqueue Time, H2D Latency, GPU Compute Time, D2H Latency (and on older
    releases End-to-End Host Latency) as min/max/mean/median/percentile(P%) in ms; Total Host
    Walltime and Total GPU Compute Time in s. Empty dict when there is no block."""
    lines = stdout.splitlines()
    start = next((i for i, ln in enumerate(lines) if "=== Performance summary ===" in ln), None)
    if start is None:
        return {}
    out: dict = {}
    for raw in lines[start + 1:]:
        line = re.sub(r"^(\[[^\]]*\]\s*)+", "", raw).strip()  # "[date] [I] " prefixes
        if not line or line.startswith("==="):
            break
        key, _, rest = line.partition(":")
        name = re.sub(r"[^a-z0-9]+", "_", key.lower()).strip("_")
        if name == "throughput":
            out["throughput_qps"] = float(re.match(r"\s*" + _NUM, rest).group(1))
        elif name in ("total_host_walltime", "total_gpu_compute_time"):
            out[f"{name}_s"] = float(re.match(r"\s*" + _NUM, rest).group(1))
        elif _STAT.search(rest):
            out[name] = {(f"p{m.group(2)}" if m.group(2) else m.group(1)): float(m.group(3))
                         for m in _STAT.finditer(rest)}
    return out


# ---------------------------------------------------------------- backend
def _tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _run(cmd: list[str], log_path: Path) -> int:
    """Run ``cmd`` with stdout+stderr into ``log_path`` (command first); the exit code."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as fh:
        fh.write(f"$ {shlex.join(cmd)}\n")
        fh.flush()
        try:
            return subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=False).returncode
        except OSError as exc:
            fh.write(f"cannot run {cmd[0]}: {exc}\n")
            return 127


def _probe_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "engineforge" / "trtexec-versions.json"


def probe_version(path: str) -> tuple[int, int, int] | None:
    """TensorRT version of a trtexec binary; cached on (path, size, mtime) so that parsing
    the workflow runs ``trtexec --help`` only when the binary changed."""
    st = os.stat(path)
    key = f"{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}"
    cache_file = _probe_cache()
    try:
        known = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return tuple(known[key]) if known[key] else None
    # `trtexec --help` prints the &&&& RUNNING banner (with the version) before the help.
    try:
        p = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=120,
                           check=False)
        version = parse_version(p.stdout + p.stderr)
    except (OSError, subprocess.SubprocessError, ValueError):
        version = None
    known[key] = list(version) if version else None
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known))
        os.replace(tmp, cache_file)
    except OSError:
        pass  # a cache only
    return version


class TrtexecBackend(Backend):
    name = "trtexec"
    artifact = "engine.plan"
    settings_section = "tensorrt"
    timing_cache = True
    multi_profile = True
    flags_mode = True

    def __init__(self, binary: str | None = None):
        self.binary = binary
        self._versions: dict[str, tuple[int, int, int] | None] = {}

    def _binary(self, settings: dict | None = None) -> str:
        """ENGINEFORGE_TRTEXEC, else tensorrt.trtexec, else ``trtexec`` on PATH."""
        name = (self.binary or os.environ.get(ENV_BINARY)
                or (settings or {}).get("trtexec") or "trtexec")
        return shutil.which(name) or ""

    def _version(self, path: str) -> tuple[int, int, int] | None:
        if path not in self._versions:
            self._versions[path] = probe_version(path)
        return self._versions[path]

    def availability(self, settings: dict | None = None) -> Availability:
        path = self._binary(settings)
        if not path:
            return Availability(ok=False, reason="trtexec not found on PATH", how=HOW)
        version = self._version(path)
        if version is None:
            return Availability(ok=False, reason=f"{path} printed no TensorRT version "
                                "banner for --help", how=HOW)
        return Availability(ok=True, version=_vstr(version))

    def _require(self, settings: dict, model: str | None = None):
        avail = self.availability(settings)
        if not avail.ok:
            raise BackendUnavailable(avail.reason, model=model, fix=avail.how)
        path = self._binary(settings)
        return path, self._versions[path]

    def runnable(self, precision: str) -> tuple[bool, str]:
        # trtexec ships with TensorRT and needs a GPU to run at all.
        avail = self.availability()
        return (True, "") if avail.ok else (False, avail.reason)

    def runner(self, engine_path: Path):
        """Audit through Polygraphy's TrtRunner where the tensorrt module sits beside trtexec
        (the NGC container); NotImplementedError (audited as not runnable) elsewhere."""
        from engineforge.backends.tensorrt import TensorRTBackend

        trt = TensorRTBackend()
        if not trt.availability().ok:
            raise NotImplementedError("trtexec engines are audited through the tensorrt Python "
                                      "package (Polygraphy TrtRunner), which is not installed")
        return trt.runner(engine_path)

    def build(self, req: BuildRequest) -> dict:
        trtexec, version = self._require(req.settings, req.model)
        work, engine = Path(req.work_dir), Path(req.engine_path)
        work.mkdir(parents=True, exist_ok=True)
        engine.parent.mkdir(parents=True, exist_ok=True)
        tmp = engine.with_name(f".{engine.name}.{os.getpid()}.tmp")
        cmd = build_command(req, version, trtexec, save_engine=tmp)
        log_path = work / "build.log"
        t0 = time.perf_counter()
        rc = _run(cmd, log_path)
        build_time = time.perf_counter() - t0
        if rc != 0 or not tmp.is_file():
            tmp.unlink(missing_ok=True)
            raise BuildError(
                f"trtexec (TensorRT {_vstr(version)}) exited with {rc} building the "
                f"{req.precision} engine; last lines of {log_path}:\n{_tail(log_path)}",
                model=req.model, fix=f"read {log_path}")
        os.replace(tmp, engine)
        layers = work / "layers.json"
        return {"backend": self.name, "command": cmd, "trt_version": _vstr(version),
                "precision": req.precision,
                "precision_mode": req.settings.get("precision_mode", "graph"),
                "build_time_s": build_time, "engine_bytes": engine.stat().st_size,
                "log": str(log_path), "layer_info": str(layers) if layers.is_file() else None}

    def bench(self, engine_path: Path, shapes: dict[str, list[int]], settings: dict,
              work_dir: Path) -> dict:
        trtexec, version = self._require(settings)
        work = Path(work_dir)
        work.mkdir(parents=True, exist_ok=True)
        for stale in ("times.json", "profile.json"):  # never read a previous run's numbers
            (work / stale).unlink(missing_ok=True)
        cmd = bench_command(engine_path, shapes, settings, work, version, trtexec)
        log_path = work / "bench.log"
        rc = _run(cmd, log_path)
        if rc != 0:
            raise BenchError(f"trtexec (TensorRT {_vstr(version)}) exited with {rc} timing "
                             f"{engine_path}; last lines of {log_path}:\n{_tail(log_path)}",
                             fix=f"read {log_path}")
        summary = parse_performance_summary(log_path.read_text(errors="replace"))
        times = work / "times.json"
        if times.is_file():
            stats, source = parse_export_times(times), "exportTimes"
        elif summary.get("latency"):  # fallback: the stdout summary (nearest-rank percentiles)
            lat, gpu = summary["latency"], summary.get("gpu_compute_time", {})
            stats = {f"latency_ms_{k}": v for k, v in lat.items() if k != "median"}
            stats |= {"latency_ms_p50": lat.get("median"),
                      "throughput_qps": summary.get("throughput_qps"),
                      "gpu_compute_ms_mean": gpu.get("mean")}
            source = "performance_summary"
        else:
            raise BenchError(f"trtexec wrote no {times} and no performance summary",
                             fix=f"read {log_path}")
        if source == "exportTimes" and summary.get("latency", {}).get("mean"):
            # cross-check: trtexec's own mean over the same timed run
            stdout_mean = summary["latency"]["mean"]
            stats["stdout_rel_diff"] = abs(stats["latency_ms_mean"] - stdout_mean) / stdout_mean
            if stats["stdout_rel_diff"] > 0.01:
                log.warning("%s: exportTimes mean %.4g ms vs stdout %.4g ms", engine_path,
                            stats["latency_ms_mean"], stdout_mean)
        profile = work / "profile.json"
        batch = next(iter(shapes.values()))[0] if shapes else 1
        extra = {"source": source, "trt_version": _vstr(version),
                 "pinned": pinned_bench_settings(settings), "command": cmd,
                 "log": str(log_path), "summary": summary, "trtexec": stats,
                 "layer_profile": parse_export_profile(profile) if profile.is_file() else []}
        pinned = pinned_bench_settings(settings)
        return {"batch": batch, "p50_ms": stats["latency_ms_p50"],
                "p90_ms": stats["latency_ms_p90"], "p95_ms": stats["latency_ms_p95"],
                "p99_ms": stats["latency_ms_p99"], "mean_ms": stats["latency_ms_mean"],
                "min_ms": stats.get("latency_ms_min", stats["latency_ms_p50"]),
                "cv": stats.get("latency_ms_cv_pct", 0.0) / 100,
                "throughput_per_s": (stats.get("throughput_qps") or 0.0) * batch,
                "iterations": stats.get("count", pinned["iterations"]),
                "warmup": pinned["warmup_ms"], "extra": extra}
