"""Stage 6 — latency of one engine at its profile's min/opt/max shapes.

Warm-up, then timed iterations; p50/p90/p95/p99, mean, throughput and the coefficient
of variation, with the device and thread count. Every backend returns the same
:class:`~engineforge.results.BenchPoint` fields. An engine that cannot run here is a
result ("not runnable on <backend>: <reason>"), not an error.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from engineforge import modelio
from engineforge.backends import backend_class, get_backend
from engineforge.errors import EngineforgeError
from engineforge.layout import Layout
from engineforge.results import BenchPoint, BenchResult
from engineforge.settings import BenchSettings, Section, base_precision

TOOLS = ()  # the backend's own tools and version are added (see the rules' tools param)
LIKELY_FIX = ("check that the model accepts every profile shape (profiles:) on this backend, "
              "or drop the backend for this model")


class Settings(Section):
    backend: str
    precision: str
    profile: str
    shapes: dict[str, dict[str, list[int]]]   # the profile: input -> min/opt/max
    bench: BenchSettings
    backend_settings: dict[str, Any] | None = None


def settings(m: dict, w: dict) -> Settings:
    section = backend_class(w["backend"]).settings_section
    return Settings(backend=w["backend"], precision=w["precision"], profile=w["profile"],
                    shapes=m["profiles"][w["profile"]], bench=m["bench"],
                    backend_settings=m[section] if section else None)


def time_callable(fn, warmup: int, iterations: int, batch: int = 1) -> dict:
    """BenchPoint fields (less shapes) from timing ``fn``."""
    for _ in range(warmup):
        fn()
    times = np.empty(iterations)
    for i in range(iterations):
        t0 = time.perf_counter()
        fn()
        times[i] = time.perf_counter() - t0
    ms = times * 1e3
    mean = float(ms.mean())
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p95_ms": float(np.percentile(ms, 95)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": mean, "min_ms": float(ms.min()),
            "cv": float(ms.std() / mean) if mean else 0.0,
            "throughput_per_s": float(batch * 1e3 / mean) if mean else 0.0,
            "iterations": iterations, "warmup": warmup, "batch": batch}


def device_info() -> dict:
    from engineforge.sidecar import cpu_device

    info = {"device": cpu_device(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count()}
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    except Exception:  # noqa: BLE001
        pass
    return info


def worker_lane(job) -> str:
    """Many small jobs: a warm worker per backend runs them (see worker.py)."""
    return f"backend:{job.backend}"


def run(job) -> BenchResult:
    """Bench one engine at its profile's min/opt/max; 'not runnable' is a result."""
    s: Settings = job.settings
    be = get_backend(s.backend)
    knobs = {**(s.backend_settings or {}), **s.bench.model_dump()}  # timing knobs + counts
    work = Path(Layout(job.artifacts).bench_work(job.model, s.backend, s.precision, s.profile))
    points: dict = {}
    status, reason = "ok", None
    ok, why = be.runnable(base_precision(s.precision))
    if not ok:
        status, reason = "not_runnable", f"not runnable on {s.backend}: {why}"
    else:
        for which in s.bench.points:
            shapes = modelio.shapes_at(s.shapes, which)
            try:
                stats = be.bench(job.inputs["engine"], shapes, knobs, work)
            except EngineforgeError as err:
                status, reason = "not_runnable", f"not runnable on {s.backend}: {err.message}"
                points = {}
                break
            points[which] = BenchPoint(shapes=shapes, **stats)
    return BenchResult(status=status, reason=reason, backend=s.backend, precision=s.precision,
                       profile=s.profile, points=points, threads=s.bench.threads,
                       device=device_info())
