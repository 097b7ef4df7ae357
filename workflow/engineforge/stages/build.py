"""Stage 5 — engine build per backend × precision × optimization profile.

Dispatches to the backend named by the job. Graph mode builds from the precision's
ONNX (strongly typed, the only mode of TensorRT 11); TensorRT 10's
``precision_mode: flags`` builds the fp32 ONNX with builder flags instead (backends with
``flags_mode``). The profile name ``all`` builds one engine holding every profile.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engineforge.backends import BuildRequest, backend_class, get_backend
from engineforge.errors import BuildError, EngineforgeError
from engineforge.layout import ALL_PROFILES, Layout
from engineforge.results import BuildResult
from engineforge.settings import Section, base_precision, build_settings

TOOLS = ()  # the backend's own tools and version are added (see tools())
LIKELY_FIX = ("the backend rejected the graph: check its op support for this precision "
              "(docs/backends.md), or drop the backend for this model")


class Settings(Section):
    backend: str
    precision: str
    profile: str
    profiles: list[dict]                 # input shapes of each profile in the engine
    precision_mode: str = "graph"        # graph | flags
    backend_settings: dict[str, Any] | None = None


def flags_mode(m: dict, backend: str) -> bool:
    cls = backend_class(backend)
    return cls.flags_mode and m["tensorrt"]["precision_mode"] == "flags"


def profiles_for(m: dict, profile: str) -> list[dict]:
    return list(m["profiles"].values()) if profile == ALL_PROFILES else [m["profiles"][profile]]


def settings(m: dict, w: dict) -> Settings:
    section = backend_class(w["backend"]).settings_section
    return Settings(backend=w["backend"], precision=w["precision"], profile=w["profile"],
                    profiles=profiles_for(m, w["profile"]),
                    precision_mode="flags" if flags_mode(m, w["backend"]) else "graph",
                    backend_settings=build_settings(section, m[section]) if section else None)


def cache_group(job) -> str:
    return "build"


def device(job) -> str:
    return get_backend(job.backend).device()


def worker_lane(job) -> str:
    """Many small jobs: a warm worker per backend runs them (see worker.py)."""
    return f"backend:{job.backend}"


def run(job) -> BuildResult:
    s: Settings = job.settings
    be = get_backend(s.backend)
    avail = be.availability()
    if not avail.ok:
        raise BuildError(avail.line(s.backend), model=job.model,
                         key=f"models.{job.model}.backends",
                         fix=avail.how or "remove the backend from the list")
    flags = s.precision_mode == "flags"
    source = job.inputs["fp32"] if flags else job.inputs.get("onnx")
    engine = job.outputs["engine"]
    work_dir = Path(Layout(job.artifacts).build_dir(s.backend, job.model, s.precision,
                                                    s.profile))
    work_dir.mkdir(parents=True, exist_ok=True)
    timing_cache = None
    if be.timing_cache:
        safe = "".join(c if c.isalnum() or c in "-._" else "_"
                       for c in f"{job.device}-{avail.version}")
        timing_cache = Path(Layout(job.artifacts).timing_cache_dir()) / f"timing-{safe}.cache"
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
    req = BuildRequest(model=job.model, precision=base_precision(s.precision), onnx_path=source,
                       engine_path=engine, work_dir=work_dir, profiles=s.profiles,
                       settings=dict(s.backend_settings or {}),
                       calib_cache=job.inputs.get("calib_cache"),
                       calib_npz=job.inputs.get("calibration"), timing_cache=timing_cache,
                       program=job.inputs.get("program"))
    try:
        facts = be.build(req)
        facts.pop("engine_bytes", None)
    except EngineforgeError as err:
        err.model = err.model or job.model
        raise
    return BuildResult(
        status=facts.pop("status", "ok"), reason=facts.pop("reason", None), backend=s.backend,
        precision=s.precision, profile=s.profile, precision_mode=s.precision_mode,
        backend_version=avail.version, build_time_s=facts.pop("build_time_s"),
        engine_bytes=engine.stat().st_size, extra=facts)
