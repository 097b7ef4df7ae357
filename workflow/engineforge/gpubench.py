"""One GPU bench harness for every GPU backend.

    from engineforge import gpubench
    timing = gpubench.time_callable(lambda: model(x), cuda_graph=True)   # a Timing
    flops = gpubench.count_flops(model, (x,))                            # once per shape
    peak = gpubench.device_peak(torch.float16)                           # a Peak (measured)
    row = gpubench.report(timing, batch=32, flops=flops, peak=peak)      # a dict for JSON

`time_callable` times a callable with CUDA events (per call), after a warm-up, optionally
captured once in a CUDA graph and replayed; it runs rounds of iterations until the median of
the last rounds is stable (coefficient of variation of the round medians <= `target_cv`) or
a time / round bound is hit, and reports p50/p90/p95/p99, the mean and both CVs. With
``device="cpu"`` the same loop runs on a host clock (tests, CPU backends); with
``device="cuda"`` and no CUDA it raises `GpuBenchError`.

The statistics (`percentile`, `cv`, `summarize`, `is_stable`) are plain functions of a list of
floats. torch is imported only inside the functions that need it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from .errors import BenchError, first_line

# Dense (no sparsity) tensor-core peaks from NVIDIA's datasheets, TFLOP/s.
# fp32 = plain FP32 (CUDA cores); tf32 = TF32 tensor cores. Matched on the device name.
DATASHEET_TFLOPS = {
    "H100 SXM": {"fp16": 989.4, "bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 NVL": {"fp16": 835.5, "bf16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H100 PCIe": {"fp16": 756.5, "bf16": 756.5, "tf32": 378.0, "fp32": 51.2},
    "H200": {"fp16": 989.4, "bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
}


class GpuBenchError(BenchError):
    """The harness was asked for something this machine cannot do (CUDA without a GPU)."""


# ---------------------------------------------------------------- statistics (pure Python)

def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation between order statistics
    (numpy's default method)."""
    if not samples:
        raise ValueError("percentile of no samples")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q={q} outside 0..100")
    xs = sorted(samples)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def cv(samples: Sequence[float]) -> float:
    """Coefficient of variation: sample standard deviation / mean (0 for one sample)."""
    if not samples:
        raise ValueError("cv of no samples")
    n = len(samples)
    mean = sum(samples) / n
    if n == 1:
        return 0.0
    if mean == 0:
        return math.inf
    var = sum((x - mean) ** 2 for x in samples) / (n - 1)
    return math.sqrt(var) / abs(mean)


def summarize(samples_ms: Sequence[float]) -> dict:
    """p50/p90/p95/p99, mean, min, max, sample CV and count of per-call latencies (ms)."""
    if not samples_ms or not all(math.isfinite(x) for x in samples_ms):
        raise ValueError("latency samples must be a non-empty list of finite numbers")
    out = {f"p{q}_ms": percentile(samples_ms, q) for q in (50, 90, 95, 99)}
    out.update(mean_ms=sum(samples_ms) / len(samples_ms), min_ms=min(samples_ms),
               max_ms=max(samples_ms), sample_cv=cv(samples_ms), n=len(samples_ms))
    return out


def is_stable(round_medians: Sequence[float], target_cv: float, window: int) -> bool:
    """The stopping rule: the last `window` round medians vary by at most `target_cv`."""
    return len(round_medians) >= window and cv(round_medians[-window:]) <= target_cv


# ---------------------------------------------------------------- timing

@dataclass
class Timing:
    """What `time_callable` measured. `cv` is the CV of the stable window's round medians
    (the stability of the reported median); `sample_cv` is the CV of every timed call."""

    samples_ms: list[float]
    round_medians_ms: list[float]
    cv: float
    stable: bool
    timer: str  # "cuda-events" or "perf_counter"
    cuda_graph: bool
    warmup: int
    stats: dict = field(default_factory=dict)

    def as_dict(self, with_samples: bool = False) -> dict:
        d = asdict(self)
        if not with_samples:
            d.pop("samples_ms")
        return d


def _require_cuda():
    import torch

    if not torch.cuda.is_available():
        raise GpuBenchError("CUDA timing asked for, but torch sees no CUDA device "
                            f"(torch {torch.__version__}).",
                            fix="run on a machine with an NVIDIA GPU, or time with "
                                "device='cpu'.")
    return torch


def capture_cuda_graph(fn: Callable[[], object], warmup: int = 3) -> Callable[[], None]:
    """Capture one call of `fn` in a CUDA graph and return its replay.

    `fn` must read fixed input tensors (a graph replays the same addresses); warm-up runs on
    a side stream first, as torch.cuda.graphs requires."""
    torch = _require_cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph.replay


def _cuda_round(torch, fn, iters: int) -> list[float]:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def _cpu_round(fn, iters: int) -> list[float]:
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def time_callable(fn: Callable[[], object], *, device: str = "cuda", warmup: int = 20,
                  cuda_graph: bool = False, iters_per_round: int = 0, min_rounds: int = 5,
                  max_rounds: int = 50, window: int = 5, target_cv: float = 0.02,
                  max_seconds: float = 5.0) -> Timing:
    """Time `fn()` per call. Rounds of `iters_per_round` calls (0: sized from the warm-up to
    ~50 ms a round, 10..1000 calls) until `is_stable` over `window` round medians, at least
    `min_rounds`, at most `max_rounds` rounds or `max_seconds` of timing."""
    if device not in ("cuda", "cpu"):
        raise GpuBenchError(f"device must be 'cuda' or 'cpu', not {device!r}")
    if device == "cpu" and cuda_graph:
        raise GpuBenchError("CUDA graphs need device='cuda'")
    torch = _require_cuda() if device == "cuda" else None
    if cuda_graph:
        fn = capture_cuda_graph(fn)

    def run_round(n: int) -> list[float]:
        return _cuda_round(torch, fn, n) if torch else _cpu_round(fn, n)

    warm = run_round(max(warmup, 1))
    if not iters_per_round:
        per_call = max(percentile(warm, 50), 1e-3)
        iters_per_round = int(min(1000, max(10, 50.0 / per_call)))
    samples: list[float] = []
    medians: list[float] = []
    t0 = time.perf_counter()
    while len(medians) < max_rounds:
        chunk = run_round(iters_per_round)
        samples.extend(chunk)
        medians.append(percentile(chunk, 50))
        if len(medians) >= min_rounds and (
                is_stable(medians, target_cv, window)
                or time.perf_counter() - t0 > max_seconds):
            break
    tail = medians[-window:]
    return Timing(samples_ms=samples, round_medians_ms=medians, cv=cv(tail),
                  stable=is_stable(medians, target_cv, window),
                  timer="cuda-events" if torch else "perf_counter", cuda_graph=cuda_graph,
                  warmup=warmup, stats=summarize(samples))


# ---------------------------------------------------------------- FLOPs, peak, device

def count_flops(model: Callable, inputs: tuple) -> int:
    """FLOPs of one forward call, from torch.utils.flop_counter.FlopCounterMode (matmuls and
    convolutions; 2 per multiply-add). Count once per shape, on the eager model."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*inputs)
    return int(counter.get_total_flops())


@dataclass
class Peak:
    dtype: str  # fp16 / bf16 / fp32 / tf32
    tflops: float
    source: str  # "measured: ..." or "datasheet: ..."


def datasheet_peak(device_name: str, dtype: str) -> Peak | None:
    """The datasheet dense peak for a known device name (None when unknown)."""
    for key, table in DATASHEET_TFLOPS.items():
        words = key.split()
        if all(w.lower() in device_name.lower() for w in words) and dtype in table:
            return Peak(dtype, table[dtype], f"datasheet: NVIDIA {key}")
    if "H100" in device_name and dtype in DATASHEET_TFLOPS["H100 SXM"]:  # e.g. "H100 80GB HBM3"
        return Peak(dtype, DATASHEET_TFLOPS["H100 SXM"][dtype],
                    "datasheet: NVIDIA H100 SXM (HBM3 name)")
    return None


def dtype_name(dtype, tf32: bool = False) -> str:
    import torch

    names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
    name = names[dtype]
    return "tf32" if name == "fp32" and tf32 else name


def measure_peak(dtype, *, n: int = 8192, tf32: bool = False, reps: int = 5,
                 iters: int = 20) -> Peak:
    """Best of `reps` mean matmul rates of an n x n x n product (random normal operands) in
    `dtype`; for float32, TF32 tensor cores on or off as `tf32` says (restored after)."""
    torch = _require_cuda()
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        a = torch.randn(n, n, device="cuda", dtype=dtype)
        b = torch.randn(n, n, device="cuda", dtype=dtype)
        c = torch.empty(n, n, device="cuda", dtype=dtype)
        for _ in range(3):
            torch.mm(a, b, out=c)
        best = 0.0
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                torch.mm(a, b, out=c)
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end) / iters
            best = max(best, 2 * n**3 / (ms * 1e-3) / 1e12)
        del a, b, c
        torch.cuda.empty_cache()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    name = dtype_name(dtype, tf32)
    return Peak(name, best, f"measured: {n}^3 torch.mm {name}, best of {reps}x{iters}")


def device_info() -> dict:
    """Device name, capability, SMs, memory, and clocks (NVML, when importable)."""
    torch = _require_cuda()
    props = torch.cuda.get_device_properties(0)
    info = {"name": props.name, "capability": f"{props.major}.{props.minor}",
            "sms": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version()}
    for attr in ("clock_rate", "memory_clock_rate"):  # kHz, where this torch exposes them
        if getattr(props, attr, None):
            info[f"props_{attr}_mhz"] = getattr(props, attr) / 1e3
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        info.update(
            sm_clock_mhz=pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
            mem_clock_mhz=pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM),
            sm_clock_max_mhz=pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM),
            mem_clock_max_mhz=pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM),
            driver=pynvml.nvmlSystemGetDriverVersion(),
            power_limit_w=pynvml.nvmlDeviceGetPowerManagementLimit(h) / 1e3)
    except Exception as err:  # NVML missing or unreadable: clocks are optional
        info["nvml"] = f"unavailable: {type(err).__name__}: {err}"
    return info


# ---------------------------------------------------------------- rows and baselines

def report(timing: Timing, *, batch: int, flops: int | None = None,
           peak: Peak | None = None, baseline_p50_ms: float | None = None) -> dict:
    """One result row: latency stats, throughput (batch / p50, items/s), CVs, and where
    given TFLOP/s achieved, % of `peak` and speedup over `baseline_p50_ms`."""
    p50 = timing.stats["p50_ms"]
    row = {**timing.stats, "cv": timing.cv, "stable": timing.stable, "timer": timing.timer,
           "cuda_graph": timing.cuda_graph, "rounds": len(timing.round_medians_ms),
           "throughput_per_s": batch / (p50 * 1e-3)}
    if flops:
        row["gflop"] = flops / 1e9
        row["tflops"] = flops / (p50 * 1e-3) / 1e12
        if peak:
            row.update(pct_of_peak=100 * row["tflops"] / peak.tflops, peak_tflops=peak.tflops,
                       peak_dtype=peak.dtype, peak_source=peak.source)
    if baseline_p50_ms:
        row["speedup"] = baseline_p50_ms / p50
    return row


def bench_point(fn: Callable[[], object], *, warmup: int, batch: int,
                cuda_graph: bool = False) -> dict:
    """A backend's bench point (BenchPoint fields less shapes) of ``fn`` timed on the GPU."""
    timing = time_callable(fn, device="cuda", warmup=warmup, cuda_graph=cuda_graph)
    s = timing.stats
    return {**{k: s[k] for k in ("p50_ms", "p90_ms", "p95_ms", "p99_ms", "mean_ms", "min_ms")},
            "cv": timing.cv, "throughput_per_s": batch * 1e3 / s["p50_ms"],
            "iterations": len(timing.samples_ms), "warmup": warmup, "batch": batch,
            "extra": {"timer": timing.timer, "stable": timing.stable,
                      "sample_cv": s.get("sample_cv")}}


def with_cuda_graphs(mode: str, plain: Callable[[], dict],
                     graphed: Callable[[], dict]) -> tuple[dict, dict]:
    """A GPU backend's ``cuda_graphs`` setting (auto | on | off) applied to two timings, each
    a callable returning a :func:`bench_point`: ``plain`` always; ``graphed`` unless off.
    Returns (the reported point, facts for its ``extra``): ``on`` reports the graphed one,
    ``auto`` the faster; the other is kept (``with_cuda_graphs`` / ``without_cuda_graphs``).
    A graph that fails is a finding (``cuda_graphs_error``), fatal only under ``on``."""
    facts: dict = {}
    timed = {False: plain()}
    if mode != "off":
        try:
            timed[True] = graphed()
        except Exception as err:  # noqa: BLE001
            if mode == "on":
                raise BenchError(f"CUDA graph capture failed ({first_line(err, 200)})") from None
            facts["cuda_graphs_error"] = first_line(err, 200)
    pick = mode == "on" or (mode == "auto" and True in timed
                            and timed[True]["p50_ms"] < timed[False]["p50_ms"])
    facts["cuda_graphs"] = pick
    if len(timed) == 2:
        facts["without_cuda_graphs" if pick else "with_cuda_graphs"] = timed[not pick]
    return timed[pick], facts


def eager_baselines(model, example: tuple, *, dtypes=("fp32", "fp16"), device: str = "cuda",
                    **timing_kw) -> dict[str, Timing]:
    """Time the eager PyTorch model on the same inputs in fp32 and fp16 (weights and
    inputs cast, no autocast, no graphs). Returns {"fp32": Timing, "fp16": Timing}."""
    import copy

    import torch

    casts = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    out = {}
    for name in dtypes:
        m = copy.deepcopy(model).to(device=device, dtype=casts[name]).eval()
        xs = tuple(x.to(device=device, dtype=casts[name]) if x.is_floating_point()
                   else x.to(device) for x in example)
        with torch.no_grad():
            out[name] = time_callable(lambda m=m, xs=xs: m(*xs), device=device, **timing_kw)
    return out
