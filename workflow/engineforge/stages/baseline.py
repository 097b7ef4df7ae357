"""Stage 6b — eager PyTorch on the profile's shapes and threads: every engine's speedup
denominator. On a machine with CUDA, eager fp32 and fp16 on the GPU are timed too (through
engineforge.gpubench; in each point's ``extra``): GPU engines are compared with those."""

from __future__ import annotations

from engineforge import modelio
from engineforge.errors import BenchError
from engineforge.results import BenchPoint, BenchResult
from engineforge.settings import BenchSettings, Section
from engineforge.stages.bench import device_info, time_callable

TOOLS = ("torch", "torchvision")
LIKELY_FIX = "check that the PyTorch model runs on every profile shape (profiles:)"


class Settings(Section):
    profile: str
    shapes: dict[str, dict[str, list[int]]]
    bench: BenchSettings
    checkpoint: dict
    inputs: dict


def settings(m: dict, w: dict) -> Settings:
    return Settings(profile=w["profile"], shapes=m["profiles"][w["profile"]], bench=m["bench"],
                    checkpoint=m["checkpoint"], inputs=m["inputs"])


def run(job) -> BenchResult:
    import torch

    from engineforge.stages.export import check_program_shapes, load_module

    s: Settings = job.settings
    base = {"backend": "pytorch", "profile": s.profile, "threads": s.bench.threads,
            "device": device_info()}
    if s.checkpoint["kind"] == "onnx":
        return BenchResult(status="not_runnable", reason="no PyTorch checkpoint (onnx input)",
                           **base)
    net = load_module(job.model, s.checkpoint, job.inputs.get("checkpoint"))
    if not isinstance(net, torch.nn.Module):
        check_program_shapes(job.model, net, s.inputs, {s.profile: s.shapes},
                             s.checkpoint["path"], error=BenchError)  # a static .pt2
        net = net.module()
    torch.set_num_threads(s.bench.threads)
    points = {}
    for which in s.bench.points:
        shapes = modelio.shapes_at(s.shapes, which)
        feed = modelio.sample_inputs(s.inputs, shapes, seed=0)
        args = tuple(torch.from_numpy(feed[n]) for n in s.inputs)
        try:
            with torch.inference_mode():
                stats = time_callable(lambda a=args: net(*a), s.bench.warmup,
                                      s.bench.iterations, batch=next(iter(shapes.values()))[0])
        except Exception as err:  # noqa: BLE001
            raise BenchError(f"eager PyTorch failed at {which} shapes {shapes}: {err}",
                             model=job.model, key=f"models.{job.model}.profiles.{s.profile}"
                             ) from None
        if torch.cuda.is_available():
            stats["extra"] = gpu_eager(net, args)
        points[which] = BenchPoint(shapes=shapes, **stats)
    return BenchResult(points=points, **base)


def gpu_eager(net, args: tuple) -> dict:
    """Eager fp32 and fp16 p50 (ms) and CV on the GPU, same inputs."""
    from engineforge import gpubench

    timed = gpubench.eager_baselines(net, args, dtypes=("fp32", "fp16"))
    return {f"cuda_{dtype}_{k}": v for dtype, t in timed.items()
            for k, v in (("p50_ms", t.stats["p50_ms"]), ("cv", t.cv))}
