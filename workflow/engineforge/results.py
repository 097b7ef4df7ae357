"""Typed stage results: the same fields from every backend, read by summary, tracking, release.

A stage body returns one of these; the runner stores ``model_dump()`` as the sidecar's
``result``; readers load it back with ``Model.model_validate``. Backend-specific facts go
in ``extra`` (free-form), never in differently named top-level keys.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Result(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ProfileCheckResult(Result):
    profile: str
    checked: list[str]            # which of min/opt/max ran (equal shapes run once)
    skipped: str | None = None    # why nothing ran (ONNX Runtime's CPU provider cannot)
    time_s: float


class ExportResult(Result):
    exporter: str
    fallback_reason: str | None = None
    reference: str
    reference_samples: int | None = Field(None, description="samples in reference.npz")
    reference_inputs: str | None = Field(None, description="where they come from: "
                                               "evaluation / calibration data or random")
    opset: int
    outputs: list[str]
    program: str | None = Field(None, description="what model.pt2 holds: the torch.export "
                                                  "program, or why it is empty")
    time_s: float


class SimplifyResult(Result):
    simplified: bool
    kept_reason: str | None = None
    nodes_before: int
    nodes_after: int
    ops_before: dict[str, int]
    ops_after: dict[str, int]
    time_s: float


class PrecisionResult(Result):
    precision: str
    method: str
    time_s: float
    bytes: int
    nodes: int
    cast: int
    quantize_linear: int
    dequantize_linear: int
    op_types: dict[str, int]
    initializer_dtypes: dict[str, int]
    opset: int | None = None
    extra: dict[str, Any] = {}


Status = Literal["ok", "not_runnable"]


class BuildResult(Result):
    status: Status = "ok"
    reason: str | None = None
    backend: str
    precision: str
    profile: str
    precision_mode: Literal["graph", "flags"] = "graph"
    backend_version: str | None = None
    build_time_s: float
    engine_bytes: int
    extra: dict[str, Any] = {}


class BenchPoint(Result):
    """Latency at one set of input shapes, in the same units for every backend."""

    shapes: dict[str, list[int]]
    batch: int
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    cv: float = Field(description="coefficient of variation of the latency (std / mean)")
    throughput_per_s: float = Field(description="samples per second (batch x queries/s)")
    iterations: int
    warmup: int | float
    extra: dict[str, Any] = {}


class BenchResult(Result):
    status: Status = "ok"
    reason: str | None = None
    backend: str
    precision: str | None = None
    profile: str
    points: dict[str, BenchPoint] = {}
    threads: int
    device: dict[str, Any] = {}


class ErrorHistogram(Result):
    """Counts of |variant - reference| per log-spaced bin (``edges``: ``len(counts) + 1``,
    trimmed to the occupied range); ``below``: errors under ``edges[0]`` (exact matches
    included), ``above``: over ``edges[-1]``, ``non_finite``: NaN/Inf errors."""
    edges: list[float]
    counts: list[int]
    below: int = 0
    above: int = 0
    non_finite: int = 0


class OutputDrift(Result):
    max_abs: float
    mean_abs: float
    median_abs: float
    p99_abs: float
    max_rel: float
    mean_rel: float
    median_rel: float
    p99_rel: float
    cosine: float
    snr_db: float | None = None           # 10 log10(signal / error power), within +-200 dB
    top1_agreement: float | None = None
    top5_agreement: float | None = None   # overlap of the five highest classes (>= 5 classes)
    abs_error_hist: ErrorHistogram | None = None  # for the report's histograms


class TaskAccuracy(Result):
    accuracy: float
    reference_accuracy: float
    accuracy_drop: float
    samples: int


class Measurement(Result):
    status: Literal["pass", "fail", "not_runnable"]
    reason: str | None = None   # not_runnable: why; fail: the failures, joined
    failures: list[str] = []
    samples: int | None = Field(None, description="samples compared (outputs of each)")
    outputs: dict[str, OutputDrift] = {}
    task: TaskAccuracy | None = None


class AuditResult(Measurement):
    backend: str
    precision: str
    tolerance: dict[str, float | None]
    emulated: Measurement | None = None
    time_s: float = 0.0


class NodeDrift(Result):
    """One node of the fp32 graph: the error of its output in a variant, and how much of it
    the node itself adds (``drop_db``)."""
    node: str
    op_type: str
    output: str                # the fp32 tensor compared (its first float output)
    snr_in_db: float           # worst SNR among its compared inputs (graph inputs: exact)
    snr_out_db: float          # SNR of its output, variant vs fp32
    drop_db: float             # min(snr_in, ceiling) - snr_out: the error the node adds
    cosine: float | None       # None: the variant's output is not finite
    fp32_peak_abs: float       # max |value| of the fp32 tensor (fp16 overflows above 65504)
    non_finite: int = 0        # NaN/Inf values in the variant's output


class Localisation(Result):
    """``localise.localise``'s result; as the localise stage's sidecar result it also says
    what triggered it; ``passes``: every audit of the variant's ONNX passed (nothing run)."""
    status: Literal["localised", "clean", "not_localisable", "passes"]
    reason: str | None = None
    precision: str | None = None         # the variant (fp16, int8-repaired, ...)
    audits: dict[str, str] = {}          # backend -> verdict read (pass/fail/not_runnable)
    trigger: list[str] = []              # the failures that triggered it ("backend: ...")
    runtime: str | None = None           # onnxruntime-cpu / onnx-reference (variant side)
    samples: int = 0
    compared: int = 0                    # node outputs compared
    unmatched: int = 0                   # fp32 float node outputs not compared: absent in
                                         # the variant, or no row per sample (constants)
    passes: int = 0
    ceiling_snr_db: float | None = None  # best output SNR: caps input SNRs in the drops
    drop_threshold_db: float = 0.0
    snr_threshold_db: float = 0.0
    first: NodeDrift | None = None       # earliest node over both thresholds
    worst: list[NodeDrift] = []          # largest drops first
    time_s: float = 0.0
    peak_mem_mb: float = 0.0             # tracemalloc peak (Python + numpy allocations)
    max_rss_mb: float = 0.0              # the process's peak RSS so far (getrusage)
