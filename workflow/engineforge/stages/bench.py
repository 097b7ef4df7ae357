"""Stage 6 — latency at each profile's min/opt/max shapes, and the eager-PyTorch baseline.

Warm-up, then timed iterations; p50/p90/p95/p99, mean, throughput and the
coefficient of variation are recorded with the device and thread count. The
PyTorch baseline runs on the same shapes and threads, so every variant shows
a speedup ratio.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np

from engineforge import modelio
from engineforge.backends import get_backend
from engineforge.config import stage_slice
from engineforge.errors import BenchError, EngineforgeError
from engineforge.sidecar import cpu_device, make_sidecar, read_json, write_json
from engineforge.versions import tool_versions


def time_callable(fn, warmup: int, iterations: int, batch: int = 1) -> dict:
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


def run(model: str, m: dict, backend: str, precision: str, profile: str, engine: Path,
        build_sidecar: Path, out: Path, work_dir: Path) -> dict:
    """Bench one engine at its profile's min/opt/max; 'not runnable' is a result."""
    be = get_backend(backend)
    build = read_json(build_sidecar)["result"]
    settings = {**m["tensorrt"], **m["bench"]}  # trtexec/TensorRT timing knobs + counts
    points: dict = {}
    status, reason = "ok", None
    ok, why = be.runnable(precision)
    if not ok:
        status, reason = "not_runnable", f"not runnable on {backend}: {why}"
    else:
        for which in m["bench"]["points"]:
            shapes = modelio.shapes_at(m["profiles"][profile], which)
            try:
                points[which] = {"shapes": shapes,
                                 **be.bench(Path(engine), shapes, settings, Path(work_dir))}
            except EngineforgeError as err:
                status, reason = "not_runnable", f"not runnable on {backend}: {err.message}"
                points = {}
                break
    result = {"status": status, "reason": reason, "backend": backend, "precision": precision,
              "profile": profile, "points": points, "build": build, "threads":
              m["bench"]["threads"], **device_info()}
    side = make_sidecar(stage="bench", model=model, inputs={"engine": engine},
                        config_slice=stage_slice(m, "bench", precision=precision,
                                                 profile=profile, backend=backend),
                        tools=tool_versions("bench", backend), outputs={}, result=result,
                        device=device_info()["device"])
    write_json(out, side)
    return side


def run_baseline(model: str, m: dict, profile: str, out: Path, root: Path = Path(".")) -> dict:
    """Eager PyTorch on the same shapes and thread count (the speedup denominator)."""
    import torch

    from engineforge.stages.export import load_module

    if m["checkpoint"]["kind"] == "onnx":
        result = {"status": "not_runnable", "reason": "no PyTorch checkpoint (onnx input)",
                  "points": {}}
    else:
        net = load_module(model, m, Path(root))
        if not isinstance(net, torch.nn.Module):
            net = net.module()
        prev = torch.get_num_threads()
        torch.set_num_threads(m["bench"]["threads"])
        points = {}
        try:
            for which in m["bench"]["points"]:
                shapes = modelio.shapes_at(m["profiles"][profile], which)
                feed = modelio.sample_inputs(m, shapes, seed=0)
                args = tuple(torch.from_numpy(feed[n]) for n in m["inputs"])
                with torch.inference_mode():
                    stats = time_callable(lambda a=args: net(*a), m["bench"]["warmup"],
                                          m["bench"]["iterations"],
                                          batch=next(iter(shapes.values()))[0])
                points[which] = {"shapes": shapes, **stats}
        except Exception as err:  # noqa: BLE001
            raise BenchError(f"eager PyTorch failed at {which} shapes: {err}", model=model,
                             key=f"models.{model}.profiles.{profile}") from None
        finally:
            torch.set_num_threads(prev)
        result = {"status": "ok", "reason": None, "points": points}
    result |= {"backend": "pytorch", "profile": profile, "threads": m["bench"]["threads"],
               **device_info()}
    side = make_sidecar(stage="baseline", model=model, inputs={},
                        config_slice=stage_slice(m, "baseline", profile=profile),
                        tools=tool_versions("baseline"), outputs={}, result=result,
                        device=device_info()["device"])
    write_json(out, side)
    return side
