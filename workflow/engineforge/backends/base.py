"""The contract every backend follows.

A backend turns a precision variant's ONNX into an engine for one optimization
profile (``build``), says whether it can do so here (``availability``), and,
where the engine can execute on this machine, times it (``bench``) and hands a
Polygraphy runner to the audit (``runner``). Heavy libraries are imported
lazily inside methods, so importing a backend never needs TensorRT.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


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
    engine_path: Path                   # where the engine goes (written atomically)
    work_dir: Path                      # logs, layer info, timing cache links
    profiles: list[dict]                # [{input: {min, opt, max}}], one engine, >=1 profile
    settings: dict = field(default_factory=dict)   # the model's `tensorrt:` (or bench) settings
    calib_cache: Path | None = None     # TensorRT 10 flags-mode int8
    timing_cache: Path | None = None


class Backend:
    name = "base"
    engine_suffix = ".engine"

    def availability(self) -> Availability:
        raise NotImplementedError

    def build(self, req: BuildRequest) -> dict:
        """Build ``req.engine_path``; return facts (build_time_s, log, layers, ...)."""
        raise NotImplementedError

    def runnable(self, precision: str) -> tuple[bool, str]:
        """Can an engine of this backend execute here? (False, reason) if not."""
        return False, f"{self.name} engines cannot execute on this machine"

    def bench(self, engine_path: Path, shapes: dict[str, list[int]], settings: dict,
              work_dir: Path) -> dict:
        """Latency stats at one set of input shapes."""
        raise NotImplementedError

    def runner(self, engine_path: Path):
        """A Polygraphy runner for the audit."""
        raise NotImplementedError
