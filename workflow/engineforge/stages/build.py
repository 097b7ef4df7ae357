"""Stage 5 — engine build per backend × precision × optimization profile.

Dispatches to the backend module (onnxruntime, tensorrt-rtx, tensorrt,
trtexec). Graph mode builds from the precision's ONNX (strongly typed, the
only mode of TensorRT 11); TensorRT 10's ``precision_mode: flags`` builds the
fp32 ONNX with builder flags instead. The profile name ``all`` builds one
engine holding every profile of the model.
"""

from __future__ import annotations

from pathlib import Path

from engineforge import cache
from engineforge.backends import BuildRequest, get_backend
from engineforge.config import stage_slice
from engineforge.errors import BuildError, EngineforgeError
from engineforge.sidecar import cpu_device, make_sidecar, read_json, write_json
from engineforge.versions import tool_versions

ALL_PROFILES = "all"


def profiles_for(m: dict, profile: str) -> list[dict]:
    if profile == ALL_PROFILES:
        return list(m["profiles"].values())
    return [m["profiles"][profile]]


def device_class(backend: str) -> str:
    """What an engine is specific to: the target GPU class, or the CPU for ORT."""
    if backend == "onnxruntime":
        return cpu_device()
    if backend == "tensorrt-rtx":
        return "rtx:sm80/86/89/12x (ahead-of-time, built on CPU)"
    try:
        import torch

        if torch.cuda.is_available():
            cc = ".".join(map(str, torch.cuda.get_device_capability(0)))
            return f"{torch.cuda.get_device_name(0)}:sm{cc}"
    except Exception:  # noqa: BLE001
        pass
    return "gpu:unknown"


def run(model: str, m: dict, backend: str, precision: str, profile: str, onnx_in: Path,
        engine_out: Path, sidecar_path: Path, work_dir: Path, fp32_onnx: Path | None = None,
        calib: Path | None = None, timing_cache_dir: Path | None = None) -> dict:
    be = get_backend(backend)
    avail = be.availability()
    if not avail.ok:
        raise BuildError(avail.line(backend), model=model, key=f"models.{model}.backends",
                         fix=avail.how or "remove the backend from the list")
    settings = dict(m["tensorrt"])
    flags_mode = backend in ("tensorrt", "trtexec") and settings["precision_mode"] == "flags"
    source = Path(fp32_onnx) if flags_mode and fp32_onnx else Path(onnx_in)
    if calib is not None:
        settings["calib_npz"] = str(calib)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    dev = device_class(backend)
    timing_cache = None
    if timing_cache_dir is not None and backend != "onnxruntime":
        safe = "".join(c if c.isalnum() or c in "-._" else "_" for c in f"{dev}-{avail.version}")
        timing_cache = Path(timing_cache_dir) / f"timing-{safe}.cache"
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
    tools = tool_versions("build", backend) | {backend: str(avail.version)}
    config_slice = stage_slice(m, "build", precision=precision, profile=profile, backend=backend)
    if cache.try_restore("build", inputs={"onnx": source}, config_slice=config_slice,
                         tools=tools, outputs={"engine": Path(engine_out)},
                         sidecar_path=Path(sidecar_path), device=dev):
        return read_json(sidecar_path)
    calib_cache = settings.get("int8_calibration_cache")
    req = BuildRequest(model=model, precision=precision, onnx_path=source,
                       calib_cache=Path(calib_cache) if calib_cache else None,
                       engine_path=Path(engine_out), work_dir=work_dir,
                       profiles=profiles_for(m, profile), settings=settings,
                       timing_cache=timing_cache)
    try:
        result = be.build(req)
    except EngineforgeError as err:
        err.model = err.model or model
        raise
    result |= {"backend": backend, "precision": precision, "profile": profile,
               "precision_mode": "flags" if flags_mode else "graph",
               "backend_version": avail.version}
    side = make_sidecar(stage="build", model=model, inputs={"onnx": source},
                        config_slice=config_slice, tools=tools,
                        outputs={"engine": engine_out}, result=result, device=dev)
    write_json(sidecar_path, side)
    return side
