"""The contract every backend follows, and the facts it declares about itself.

A backend module defines one :class:`Backend` subclass and adds one line to
``backends/__init__.py``. Its class attributes describe it — what it builds from,
its artifact's file name, device class, precisions, settings section, the tools
whose versions matter, timing-cache and multi-profile support — and everything
else (wildcard constraints, engine paths, build rules, tool-version params,
release file lists, drift-matrix order, the config schema's backend enum) is
derived from the registry. Heavy libraries are imported lazily inside methods,
so importing a backend never needs TensorRT.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from engineforge.settings import base_precision


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str = ""        # why not (one line)
    how: str = ""           # how to enable it
    version: str | None = None

    def line(self, backend: str) -> str:
        if self.ok:
            return f"{backend}: available ({self.version})"
        return f"{backend}: skipped: {self.reason}" + (f" ({self.how})" if self.how else "")


@dataclass
class BuildRequest:
    """Everything a backend needs to build one engine."""

    model: str
    precision: str                      # fp32/fp16/bf16/int8/fp8
    onnx_path: Path                     # the precision variant (graph mode) or fp32 (flags)
    engine_path: Path                   # where the engine goes
    work_dir: Path                      # logs, layer info
    profiles: list[dict]                # [{input: {min, opt, max}}], one engine, >=1 profile
    settings: dict = field(default_factory=dict)   # the backend's settings section
    calib_cache: Path | None = None     # TensorRT 10 flags-mode int8
    calib_npz: Path | None = None       # TensorRT 10 flags-mode int8 calibration batches
    timing_cache: Path | None = None
    program: Path | None = None         # builds_from "torch": the export's model.pt2


class Backend:
    # -- self-description (class attributes; read without instantiating or importing) --
    name: ClassVar[str] = "base"
    builds_from: ClassVar[Literal["onnx", "torch"]] = "onnx"   # precision ONNX or the model
    artifact: ClassVar[str] = "engine.plan"        # engine file name in the build directory
    device_class: ClassVar[str] = "gpu"            # cpu | gpu | rtx: what an engine targets
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "fp16", "bf16", "int8", "fp8")
    settings_section: ClassVar[str | None] = None  # config section passed as settings
    tools: ClassVar[tuple[str, ...]] = ()          # distributions whose version changes output
    timing_cache: ClassVar[bool] = False           # reuses a timing cache per device+version
    multi_profile: ClassVar[bool] = False          # can hold every profile in one engine
    flags_mode: ClassVar[bool] = False             # TensorRT 10 builder precision flags
    bench_threads: ClassVar[bool] = True           # CPU bench: takes every core
    # precision -> the quantizer whose graph it builds from instead of ModelOpt's Q/DQ
    # (Layout.quantized; e.g. onnxruntime: {"int8": "onnxruntime"}, stages/ort_quantize.py)
    quantizers: ClassVar[dict[str, str]] = {}

    @classmethod
    def quantizer(cls, variant: str) -> str | None:
        """The quantizer whose graph the variant builds from (its base precision's:
        ``int8-repaired`` is that quantizer's graph with the repair's exclusions), or None."""
        return cls.quantizers.get(base_precision(variant))

    @classmethod
    def needs_gpu(cls, stage: str, device: str) -> bool:
        """Whether its ``stage`` job (build, audit, bench) asks the scheduler for a GPU, for a
        model whose ``resources.device`` is ``device`` (engineforge/resources.py)."""
        return True

    def availability(self) -> Availability:
        """Cheap: no heavy import, no binary run (it is called while Snakemake parses)."""
        raise NotImplementedError

    def build(self, req: BuildRequest) -> dict:
        """Build ``req.engine_path``; return facts (build_time_s, log, layers, ...)."""
        raise NotImplementedError

    def runnable(self, precision: str) -> tuple[bool, str]:
        """Can an engine of this backend execute here? (False, reason) if not."""
        return False, f"{self.name} engines cannot execute on this machine"

    def bench(self, engine_path: Path, shapes: dict[str, list[int]], settings: dict,
              work_dir: Path) -> dict:
        """Latency stats at one set of input shapes (the fields of ``results.BenchPoint``)."""
        raise NotImplementedError

    def runner(self, engine_path: Path):
        """A Polygraphy runner for the audit."""
        raise NotImplementedError

    @staticmethod
    def note(precision: str, ran: dict) -> str | None:
        """What a reader must know about a bench figure, shown beside it in the summary
        (e.g. a CPU without fast fp16 kernels); ``ran``: the bench point's ``extra``."""
        return None

    def device(self) -> str:
        """The device class an engine is specific to (part of the build fingerprint)."""
        from engineforge.sidecar import cpu_device

        if self.device_class == "cpu":
            return cpu_device()
        return gpu_device() if self.device_class == "gpu" else self.device_class


def precision_of(engine: Path | str) -> str:
    """An engine's precision variant, from its place in the layout
    (``<model>/build/<backend>/<precision>/<profile>/<artifact>``)."""
    return Path(engine).parents[1].name


def gpu_device() -> str:
    """``<GPU name>:sm<cc>`` of the first CUDA GPU, ``gpu:unknown`` without one."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return "gpu:unknown"
    import torch

    if not torch.cuda.is_available():
        return "gpu:unknown"
    major, minor = torch.cuda.get_device_capability(0)
    return f"{torch.cuda.get_device_name(0)}:sm{major}.{minor}"
