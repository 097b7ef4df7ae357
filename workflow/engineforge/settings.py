"""Typed settings: every config key's type, default and description, in one place.

These pydantic models are the source of truth. The built-in defaults are
``Settings().model_dump()``; the JSON schema's ``settings`` section is generated
from them (:func:`settings_schema`) and merged into
``workflow/schemas/config.schema.yaml`` when the config is validated, so the
schema, the defaults and the code cannot disagree. ``engineforge schema``
prints the full schema.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")
QUANTIZED = ("int8", "fp8")
Precision = Literal["fp32", "fp16", "bf16", "int8", "fp8"]
Repairable = Literal["fp16", "bf16", "int8", "fp8"]
REPAIRED = "-repaired"  # a repaired variant's name: <precision>-repaired
VARIANTS = PRECISIONS + tuple(p + REPAIRED for p in PRECISIONS if p != "fp32")


def base_precision(variant: str) -> str:
    """The precision a variant computes in: ``base_precision("fp16-repaired") == "fp16"``."""
    return variant.removesuffix(REPAIRED)


def is_repaired(variant: str) -> bool:
    return variant.endswith(REPAIRED)


def repaired_precisions(m: dict) -> list[str]:
    """The model's precisions that get a repaired variant (its ``repair`` key)."""
    repair = m.get("repair") or False
    if repair is False:
        return []
    wanted = (repair.get("precisions") if isinstance(repair, dict) else None) or PRECISIONS
    return [p for p in m["precisions"] if p != "fp32" and p in wanted]


def repair_settings(m: dict) -> RepairSettings:
    repair = m.get("repair")
    return RepairSettings(**repair) if isinstance(repair, dict) else RepairSettings()


def variants(m: dict) -> list[str]:
    """Every variant of a model: its precisions, then ``<p>-repaired`` for each repaired one."""
    return list(m["precisions"]) + [p + REPAIRED for p in repaired_precisions(m)]


class Section(BaseModel):
    """A config section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _unique(description: str, min_items: int = 1):
    return Field(description=description, min_length=min_items,
                 json_schema_extra={"uniqueItems": True})


class ExportSettings(Section):
    exporter: Literal["dynamo", "torchscript"] = Field(
        "dynamo", description="dynamo first; torchscript is the fallback (reason recorded).")
    fallback: bool = Field(True, description="Fall back to the TorchScript exporter when "
                                             "dynamo fails.")
    seed: int = Field(0, description="Seed of random reference inputs.")


class SimplifySettings(Section):
    enabled: bool = Field(True, description="Run onnxsim (the export is kept when it fails "
                                            "or grows the graph).")


class Fp32Settings(Section):
    pass


class AutocastSettings(Section):
    """ModelOpt AutoCast (``modelopt.onnx.autocast.convert_to_mixed_precision``)."""

    keep_io_types: bool = Field(True, description="Keep fp32 graph inputs and outputs.")
    data_max: float = Field(512, gt=0, description="Nodes whose activations exceed this "
                                                   "magnitude stay fp32.")
    init_max: float = Field(65504, gt=0, description="Nodes whose initializers exceed this "
                                                     "magnitude stay fp32.")
    nodes_to_exclude: list[str] = Field([], description="Node names kept in fp32.")
    op_types_to_exclude: list[str] = Field([], description="Op types kept in fp32.")


class QuantizeSettings(Section):
    """ModelOpt explicit Q/DQ (``modelopt.onnx.quantization.quantize``)."""

    calibration_method: Literal["max", "entropy"] = Field(
        "max", description="Activation range calibration.")
    calib_size: int = Field(32, ge=1, description="Calibration samples used from the model's "
                                                  "calibration data.")
    high_precision_dtype: Literal["fp32", "fp16", "bf16"] = Field(
        "fp32", description="Precision of the nodes left unquantized.")
    op_types_to_exclude: list[str] = Field([], description="Op types left unquantized.")
    nodes_to_exclude: list[str] = Field([], description="Node names left unquantized.")


class PrecisionSettings(Section):
    fp32: Fp32Settings = Field(Fp32Settings(), description="As exported.")
    fp16: AutocastSettings = Field(AutocastSettings(), description="ModelOpt AutoCast to fp16.")
    bf16: AutocastSettings = Field(AutocastSettings(), description="ModelOpt AutoCast to bf16.")
    int8: QuantizeSettings = Field(QuantizeSettings(), description="ModelOpt int8 Q/DQ.")
    fp8: QuantizeSettings = Field(QuantizeSettings(), description="ModelOpt fp8 Q/DQ.")


class Tolerance(Section):
    """Audit limits of one precision, checked on every output (docs/tolerances.md). The
    scale-free limits (SNR, cosine, top-1, task accuracy) judge by default; ``max_abs``
    depends on the output's scale, so it is checked only where set."""

    snr_min_db: float = Field(20.0, description="Smallest SNR of the output against the "
                                                "reference, 10 log10(signal / error power) "
                                                "in dB: 20 = 10% rms error, 40 = 1%, "
                                                "60 = 0.1%.")
    cosine_min: float = Field(0.99, ge=-1, le=1, description="Smallest cosine similarity.")
    max_abs: float | None = Field(None, ge=0, description="Largest absolute error of any "
                                                          "output value (in the output's "
                                                          "units; null: not checked).")
    top1_min: float = Field(0.9, ge=0, le=1, description="Smallest top-1 agreement "
                                                         "(classifiers).")
    accuracy_drop_max: float = Field(0.02, ge=0, le=1, description="Largest task-accuracy "
                                                                   "drop (labelled data).")


class Tolerances(Section):
    """Defaults per precision, from what each precision's rounding leaves (an fp16 value
    keeps ~71 dB, bf16 ~59 dB, a per-tensor int8 activation 30-40 dB) less the loss of a
    deep network; the reasoning and measured margins are in docs/tolerances.md."""

    fp32: Tolerance = Field(Tolerance(snr_min_db=60, cosine_min=0.99999, top1_min=1.0,
                                      accuracy_drop_max=0.0), description="fp32 limits.")
    fp16: Tolerance = Field(Tolerance(snr_min_db=40, cosine_min=0.9999, top1_min=0.98,
                                      accuracy_drop_max=0.01), description="fp16 limits.")
    bf16: Tolerance = Field(Tolerance(snr_min_db=30, cosine_min=0.999, top1_min=0.95,
                                      accuracy_drop_max=0.02), description="bf16 limits.")
    int8: Tolerance = Field(Tolerance(snr_min_db=20, cosine_min=0.99, top1_min=0.9,
                                      accuracy_drop_max=0.02), description="int8 limits.")
    fp8: Tolerance = Field(Tolerance(snr_min_db=20, cosine_min=0.99, top1_min=0.9,
                                     accuracy_drop_max=0.02), description="fp8 limits.")


class AuditSettings(Section):
    samples: int = Field(32, ge=1, description="Samples the audit compares (drawn from the "
                                               "evaluation data, else the calibration data, "
                                               "else seeded random; run in batches that fit "
                                               "the first profile).")


class LocaliseSettings(Section):
    """Where a failing variant's drift enters (engineforge/localise.py, docs/drift-audit.md)."""

    max_outputs_per_pass: int = Field(64, ge=1, description="Intermediate tensors compared "
                                                            "per inference pass (bounds "
                                                            "memory).")
    top: int = Field(10, ge=1, description="Worst nodes reported.")
    drop_db: float = Field(10.0, ge=0, description="A node lets drift in when its output SNR "
                                                   "is this many dB below its inputs'.")
    snr_db_below: float = Field(40.0, description="... and its output SNR is below this (dB).")


class RepairSettings(Section):
    """Mixed-precision repair: ``<p>-repaired`` variants keep the localised nodes in high
    precision (AutoCast / quantization ``nodes_to_exclude``), re-audited each round."""

    precisions: list[Repairable] | None = Field(
        None, description="Precisions to repair (default: every non-fp32 precision of the "
                          "model).")
    max_rounds: int = Field(4, ge=0, description="Rebuild + re-audit rounds at most (0: the "
                                                 "repaired variant is the plain one, "
                                                 "unrepaired).")
    nodes_per_round: int = Field(2, ge=1, description="Nodes added to nodes_to_exclude per "
                                                      "round.")


class TimeLimits(Section):
    """Seconds a job may run before it fails with one line (the run goes on). Not part of
    any fingerprint: changing a limit reruns nothing. ENGINEFORGE_JOB_TIMEOUT_S overrides
    every stage's limit."""

    export: float = Field(3600, gt=0, description="Checkpoint -> ONNX (and the reference).")
    simplify: float = Field(1800, gt=0, description="onnxsim.")
    precision: float = Field(3600, gt=0, description="AutoCast / Q/DQ calibration.")
    build: float = Field(3600, gt=0, description="One engine build.")
    audit: float = Field(1800, gt=0, description="One audit (variant vs reference).")
    emulated_audit: float = Field(300, gt=0, description="The ONNX-reference emulation of a "
                                                         "variant no runtime here can run "
                                                         "(pure Python: slow on big models).")
    bench: float = Field(1800, gt=0, description="One latency benchmark.")
    baseline: float = Field(1800, gt=0, description="The eager PyTorch baseline.")
    localise: float = Field(1800, gt=0, description="One localisation (variant vs fp32).")
    repair: float = Field(3600, gt=0, description="One repair (every round of it).")
    track: float = Field(600, gt=0, description="One MLflow upload.")


class StageResources(Section):
    """What one job of a stage asks its scheduler for."""

    cpus: int = Field(1, ge=1, description="CPU cores (Slurm: --cpus-per-task).")
    mem_mb: int = Field(4096, ge=64, description="Memory in MiB (Slurm: --mem; cgroups "
                                                 "enforce it).")
    exclusive: bool = Field(False, description="Slurm: the job gets its node to itself "
                                               "(--exclusive): timings with nothing beside "
                                               "them.")


class ResourceSettings(Section):
    """What each job asks the scheduler for (docs/scale-out.md): Slurm gets cpus, memory, a
    time limit (the stage's ``time_limits`` plus ``runtime_margin_min``, so our own limit
    fails the job in one line first), a partition and, for a GPU job, one GPU. A local run
    applies the same numbers to ``--resources``. Never part of a fingerprint."""

    device: Literal["cpu", "cuda"] = Field(
        "cpu", description="Where engines of backends that run on either device "
                           "(onnxruntime, torch-inductor) run. cuda: their build, audit and "
                           "bench jobs ask for one GPU. tensorrt and trtexec jobs always do; "
                           "CPU stages never do.")
    cpu_partition: str | None = Field(None, description="Slurm partition of CPU jobs "
                                                        "(null: the cluster's default).")
    gpu_partition: str | None = Field(None, description="Slurm partition of GPU jobs "
                                                        "(null: the cluster's default).")
    runtime_margin_min: int = Field(5, ge=1, description="Minutes the scheduler's time limit "
                                                         "adds to the stage's time limit.")
    export: StageResources = Field(StageResources(cpus=2, mem_mb=8192),
                                   description="Export, its profile checks and reference.")
    simplify: StageResources = Field(StageResources(mem_mb=8192), description="onnxsim.")
    precision: StageResources = Field(StageResources(cpus=2, mem_mb=8192),
                                      description="AutoCast, Q/DQ and ORT quantization.")
    build: StageResources = Field(StageResources(cpus=2, mem_mb=8192),
                                  description="One engine build.")
    audit: StageResources = Field(StageResources(), description="One audit.")
    localise: StageResources = Field(StageResources(mem_mb=8192),
                                     description="One localisation.")
    repair: StageResources = Field(StageResources(cpus=2, mem_mb=8192),
                                   description="One repair.")
    bench: StageResources = Field(StageResources(cpus=2, exclusive=True),
                                  description="One latency benchmark (and the eager PyTorch "
                                              "baseline); cpus at least bench.threads.")
    other: StageResources = Field(StageResources(mem_mb=2048),
                                  description="Drift matrix, gate, tracking, report, summary.")


class BenchSettings(Section):
    warmup: int = Field(5, ge=0, description="Untimed runs first.")
    iterations: int = Field(30, ge=1, description="Timed runs per shape.")
    threads: int = Field(2, ge=1, description="Intra-op threads (CPU runtimes and PyTorch).")
    points: Annotated[list[Literal["min", "opt", "max"]], _unique(
        "Which shapes of each profile are timed.")] = ["min", "opt", "max"]


BENCH_ONLY = {"bench_only": True}  # a backend key that changes how it is timed, not the engine


class TensorRTSettings(Section):
    """TensorRT-family builders (tensorrt, tensorrt-rtx, trtexec)."""

    precision_mode: Literal["graph", "flags"] = Field(
        "graph", description="graph: precision lives in the ONNX (strongly typed; the only "
                             "mode of TensorRT 11). flags: TensorRT 10 only; fp32 ONNX + "
                             "--fp16/--bf16/--int8/--fp8 builder flags.")
    workspace_mib: int = Field(2048, ge=1, description="Builder workspace limit (MiB).")
    builder_optimization_level: int = Field(3, ge=0, le=5, description="Builder "
                                                                       "optimization level.")
    multi_profile_engine: bool = Field(False, description="Also build one engine holding "
                                                          "every profile of the model.")
    use_cuda_graph: bool = Field(False, description="Bench with CUDA graphs.",
                                 json_schema_extra=BENCH_ONLY)
    no_data_transfers: bool = Field(False, description="Bench without host<->device copies.",
                                    json_schema_extra=BENCH_ONLY)
    use_spin_wait: bool = Field(False, description="trtexec --useSpinWait.",
                                json_schema_extra=BENCH_ONLY)
    warmup_ms: float = Field(200, ge=0, description="trtexec --warmUp (ms).",
                             json_schema_extra=BENCH_ONLY)
    duration_s: float = Field(3, ge=0, description="trtexec --duration (s).",
                              json_schema_extra=BENCH_ONLY)
    avg_runs: int = Field(10, ge=1, description="trtexec --avgRuns.",
                          json_schema_extra=BENCH_ONLY)
    compute_capabilities: list[Annotated[list[int], Field(min_length=2, max_length=2)]] | None = (
        Field(None, description="TensorRT-RTX target GPUs, e.g. [[8, 6], [8, 9]]; default "
                                "all."))
    trtexec: str = Field("trtexec", description="Path or name of the trtexec binary.")
    int8_calibration_cache: str | None = Field(
        None, description="TensorRT 10 flags mode only: an int8 calibration cache (trtexec "
                          "--calib) made on the target GPU.")


class GateMargins(Section):
    """How much worse than the baseline a drift-matrix metric may get (null: not compared).
    Drops are absolute (cosine, agreements, accuracy: fractions; snr_db: dB); growths of
    error magnitudes are relative to the baseline (0.5: +50 %)."""

    cosine: float | None = Field(0.001, ge=0, description="Largest cosine-similarity drop.")
    snr_db: float | None = Field(3.0, ge=0, description="Largest SNR drop (dB).")
    top1_agreement: float | None = Field(0.01, ge=0, description="Largest top-1 agreement "
                                                                  "drop.")
    top5_agreement: float | None = Field(0.01, ge=0, description="Largest top-5 agreement "
                                                                  "drop.")
    accuracy: float | None = Field(0.005, ge=0, description="Largest task-accuracy drop.")
    max_abs: float | None = Field(0.5, ge=0, description="Largest relative growth of the "
                                                         "max absolute error.")
    p99_abs: float | None = Field(0.5, ge=0, description="Largest relative growth of the "
                                                         "p99 absolute error.")
    mean_rel: float | None = Field(None, ge=0, description="Largest relative growth of the "
                                                           "mean relative error.")


class GateSettings(Section):
    """The baseline gate: this run's drift matrix against an earlier one (docs/gate.md)."""

    baseline: str = Field(description="Where the earlier drift matrix comes from: a file "
                                      "(drift.json, a release manifest.json or bundle "
                                      ".tar.gz), release:<version>, runs:/<run id>, "
                                      "models:/<registered model>@<alias> or /<version>, or "
                                      "tag:<key>=<value> (newest run of the model carrying "
                                      "that tag). {model} is replaced by the model's name.")
    margin: GateMargins = Field(GateMargins(), description="Allowed worsening per metric.")
    strict: bool = Field(False, description="A regression fails the run (one line); else it "
                                            "is recorded, summarised and tracked.")


CudaGraphs = Literal["auto", "on", "off"]
CUDA_GRAPHS = ("GPU only. auto: bench with and without CUDA graphs, report the faster; on: "
               "report with CUDA graphs (without kept too); off: without only. CUDA graphs "
               "help launch-bound (small) models.")


class OnnxRuntimeSettings(Section):
    """The onnxruntime backend."""

    cuda_graphs: CudaGraphs = Field("auto", description=CUDA_GRAPHS + " ONNX Runtime's own "
                                    "(CUDA provider option enable_cuda_graph).",
                                    json_schema_extra=BENCH_ONLY)


class TorchInductorSettings(Section):
    """The torch-inductor backend (AOTInductor packages; torch.compile fallback)."""

    cuda_graphs: CudaGraphs = Field("auto", description=CUDA_GRAPHS,
                                    json_schema_extra=BENCH_ONLY)
    cudnn_fusion: bool = Field(
        True, description="GPU, fp16/bf16 engines. Fold BatchNorm into convolutions and run "
                          "conv + bias (+ residual add) + ReLU as one cuDNN kernel, weights "
                          "channels_last, before compiling (resnet50 fp16 b32 on the H100: "
                          "1.466 -> 1.222 ms). false: inductor's own fusion only.")


class Settings(Section):
    """Keys allowed under ``defaults:`` and in every model."""

    opset: int = Field(18, ge=13, le=23, description="ONNX opset of the export.")
    precisions: Annotated[list[Precision], _unique("Precision variants to make.")] = [
        "fp32", "fp16", "bf16", "int8"]
    backends: Annotated[list[str], _unique("Engine backends (see docs/backends.md).")] = [
        "onnxruntime", "tensorrt-rtx", "tensorrt", "trtexec"]
    export: ExportSettings = Field(ExportSettings(), description="Checkpoint -> ONNX.")
    simplify: SimplifySettings = Field(SimplifySettings(), description="onnxsim.")
    precision: PrecisionSettings = Field(PrecisionSettings(), description="Settings of each "
                                                                          "precision variant.")
    tolerances: Tolerances = Field(Tolerances(), description="Audit limits per precision.")
    audit: AuditSettings = Field(AuditSettings(), description="Accuracy audit.")
    localise: LocaliseSettings = Field(LocaliseSettings(), description="Localisation of a "
                                                                       "failing variant.")
    repair: bool | RepairSettings = Field(
        False, description="Repair failing variants: true (every non-fp32 precision, default "
                           "bounds) or {precisions, max_rounds, nodes_per_round}. Each "
                           "repaired precision p adds a variant 'p-repaired' (built, "
                           "audited, benched, tracked and releasable like the others) that "
                           "keeps the localised nodes in high precision; see "
                           "docs/drift-audit.md.")
    time_limits: TimeLimits = Field(TimeLimits(), description="Per-job time limits (s).")
    resources: ResourceSettings = Field(ResourceSettings(), description="What each job asks "
                                                                        "the scheduler for.")
    bench: BenchSettings = Field(BenchSettings(), description="Latency benchmark.")
    tensorrt: TensorRTSettings = Field(TensorRTSettings(), description="TensorRT builders.")
    gate: GateSettings | None = Field(None, description="Baseline gate (off when null).")
    onnxruntime: OnnxRuntimeSettings = Field(OnnxRuntimeSettings(),
                                             description="onnxruntime backend.")
    torch_inductor: TorchInductorSettings = Field(TorchInductorSettings(),
                                                  description="torch-inductor backend.")


def build_settings(section: str, values: dict) -> dict:
    """A backend section's values less its bench-only keys: changing how an engine is timed
    never rebuilds it."""
    fields = Settings.model_fields[section].annotation.model_fields
    return {k: v for k, v in values.items()
            if not (fields[k].json_schema_extra or {}).get("bench_only")}


def builtin_defaults() -> dict:
    return Settings().model_dump(mode="json")


def settings_schema(backends: list[str]) -> dict:
    """JSON schema of :class:`Settings` with ``#/$defs`` refs; backends enum from the registry.

    Returns ``{"settings": <object schema>, **nested definitions}``. The top-level object
    allows other keys (a model's own keys sit beside its settings); nested sections do not.
    """
    schema = Settings.model_json_schema(ref_template="#/$defs/{model}", mode="validation")
    defs = schema.pop("$defs", {})
    schema.pop("additionalProperties", None)
    schema.pop("title", None)
    schema["properties"]["backends"]["items"] = {"enum": list(backends)}
    return {"settings": schema, **defs}
