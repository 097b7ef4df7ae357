"""PyTorch's own compiler as a backend (``torch-inductor``): an AOTInductor package per
precision × profile, built from the export's ``torch.export`` program.

Build: the export's program (``<model>/export/model.pt2``) is cast to the precision (weights
and compute in fp16/bf16; inputs and outputs stay fp32, like AutoCast's ``keep_io_types``),
moved to the device (cuda when torch sees a GPU, else cpu), re-exported with the profile's
min/max as the dynamic dims' ranges and compiled with
``torch._inductor.aoti_compile_and_package``.

Run: a package is first loaded and run once in a child process (:func:`probe`), because
``aoti_load_package`` can crash the process (it segfaults on the H100 machine with torch
2.11): a crash there must not take the audit's or bench's worker down. When the probe fails,
the same cast program runs through ``torch.compile`` in this process instead, and the
fallback and its cause are recorded (build ``extra``, bench point ``extra``, summary note).

The fallback compiles each input shape it meets once, statically (``dynamic=False``: a
dynamic-batch compile of resnet50 takes ~5x longer on the H100, 106 s vs 19 s), with
inductor ``freezing`` (weights become constants: BatchNorm folds into the convolutions;
−9 % on resnet50 fp16 b32 there).

On a GPU, fp16/bf16 builds first fuse convolution epilogues into cuDNN and make the
weights channels_last (``torch_inductor.cudnn_fusion``, :mod:`engineforge.cudnn_fusion`);
fp32 engines run cuDNN without TF32.

CUDA graphs (``torch_inductor.cuda_graphs``) only apply on a GPU: the engine's call (package
or compiled module) is captured once in a CUDA graph and replayed (``gpubench``). ``auto``
and ``on`` time both, with and without; ``auto`` reports the faster, ``on`` the graphed one.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import signal
import subprocess
import sys
import time
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engineforge.backends.base import Availability, Backend, BuildRequest, gpu_device, precision_of
from engineforge.errors import BenchError, BuildError, first_line, key_line

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# torch.export's message for a dim the program cannot vary (group 1: its name, 2: its size)
SPECIALIZED = re.compile(r"You marked (\w+) as dynamic but your code specialized it to be a "
                         r"constant \((\d+)\)")
IO_FILE = "engineforge.json"    # in the export's model.pt2: input/output names, dims, dtypes
PROBE_TIMEOUT_S = 600
# Load and run a package once, in a fresh interpreter (argv: package, shapes, dtypes, device,
# the directory engineforge is imported from).
PROBE = """
import json, sys, torch
path, shapes, dtypes, device = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), \\
    sys.argv[4]
sys.path.insert(0, sys.argv[5])
from engineforge.backends.torch_inductor import share_libstdcxx
share_libstdcxx()
model = torch._inductor.aoti_load_package(path, run_single_threaded=True)
args = [torch.zeros(shapes[n], dtype=getattr(torch, dtypes[n]), device=device) for n in shapes]
with torch.inference_mode():
    model(*args)
if device == "cuda":
    torch.cuda.synchronize()
"""


def share_libstdcxx() -> None:
    """Put the process's libstdc++ in the global symbol scope before a package loads.
    A package's wrapper library does not link libstdc++ itself; torch's libstdc++ came in
    with libtorch, loaded local to it, so the wrapper's inlined std::regex/locale code
    binds its own facet ids and crashes (the H100 machine, torch 2.11 + GCC 13: SIGSEGV in
    ``parse_device_str``'s std::regex; the same load with libstdc++ preloaded works)."""
    import ctypes

    try:
        ctypes.CDLL("libstdc++.so.6", mode=ctypes.RTLD_GLOBAL)
    except OSError:
        pass


def target_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def program_of(engine: Path) -> Path:
    """The export's program an engine was built from (``<root>/<model>/export/model.pt2``;
    the engine is ``<root>/<model>/build/<backend>/<precision>/<profile>/<artifact>``)."""
    return Path(engine).parents[4] / "export" / "model.pt2"


def read_io(program: Path) -> dict:
    """The program's {inputs: [names], outputs: [names], dims: {input: {axis: name}},
    dtypes: {input: dtype}} (read from the archive, without loading the program).
    An empty file: the export kept no program; its reason is in export.json."""
    program = Path(program)
    if not program.is_file() or program.stat().st_size == 0:
        raise FileNotFoundError(f"the export kept no torch.export program ({program} is "
                                "empty: see export.json 'program')")
    with zipfile.ZipFile(program) as z:
        name = next(n for n in z.namelist() if n.endswith(f"extra/{IO_FILE}"))
        io = json.loads(z.read(name))
    io["dims"] = {i: {int(a): d for a, d in axes.items()} for i, axes in io["dims"].items()}
    return io


def cast_module(program: Path, precision: str, device: str, cudnn_fusion: bool = False,
                channels_last: bool = True):
    """The export's program as a module computing in ``precision`` on ``device``, with
    fp32 inputs and outputs; ``cudnn_fusion`` (the fused ops run on cuda only): conv
    epilogues fused into cuDNN first (engineforge.cudnn_fusion, on the fp32 weights;
    ``channels_last`` weights). Returns (module, the fusion's counts or None)."""
    import torch
    from torch.export.passes import move_to_device_pass
    from torch.utils._pytree import tree_map

    dtype = getattr(torch, DTYPES[precision])
    inner = move_to_device_pass(torch.export.load(str(program)), device).module()
    fused = None
    if cudnn_fusion:
        from engineforge import cudnn_fusion as fusion

        fused = fusion.fuse(inner, channels_last=channels_last)
    inner = inner.to(dtype)
    if dtype != torch.float32:
        retype_float32(inner, dtype)

    class IOCast(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            out = self.inner(*(a.to(dtype) if a.is_floating_point() else a for a in args))
            return tree_map(lambda o: o.float() if isinstance(o, torch.Tensor)
                            and o.is_floating_point() else o, out)

    return IOCast(), fused  # no .eval(): an exported module has no train mode (it is fixed)


def retype_float32(gm, dtype) -> None:
    """The graph's explicit float32 dtypes (``mask.to(h.dtype)`` traced as ``_to_copy(dtype=
    float32)``, ``zeros_like(..., dtype=float32)``) become ``dtype``, as the weights did: left
    float32, they mix into the cast program (a Linear then gets Float and Half)."""
    import torch

    for node in gm.graph.nodes:
        if node.op == "call_function":
            node.args = tuple(dtype if a is torch.float32 else a for a in node.args)
            node.kwargs = {k: dtype if v is torch.float32 else v for k, v in node.kwargs.items()}
    gm.recompile()


def dynamic_shapes(io: dict, profile: dict) -> tuple[tuple, tuple]:
    """Example inputs' shapes (the profile's max) and torch.export dynamic_shapes giving
    each named dim the profile's [min, max] (static where min == max)."""
    import torch

    dims: dict[str, torch.export.Dim] = {}
    specs = []
    for name in io["inputs"]:
        axes = {}
        for axis, dim in io["dims"].get(name, {}).items():
            lo, hi = profile[name]["min"][axis], profile[name]["max"][axis]
            if lo != hi:
                axes[axis] = dims.setdefault(dim, torch.export.Dim(dim, min=lo, max=hi))
        specs.append(axes or None)
    return tuple(profile[n]["max"] for n in io["inputs"]), (tuple(specs),)


_PROBED: dict[tuple, str | None] = {}  # (package, size, mtime, device) -> cause


def probe(engine: Path, shapes: dict[str, list[int]], dtypes: dict[str, str],
          device: str) -> str | None:
    """None when the package loads, and runs once at ``shapes``, in a child process; else
    the cause. Once per package file and device in this process."""
    st = Path(engine).stat()
    key = (str(engine), st.st_size, st.st_mtime_ns, device)
    if key not in _PROBED:
        built = built_here(Path(engine), device)
        _PROBED[key] = (built["fallback_reason"] if built
                        else _probe(engine, shapes, dtypes, device))
    return _PROBED[key]


def built_here(engine: Path, device: str) -> dict | None:
    """What the build recorded of this very package (its sidecar ``build.json`` beside it,
    same content hash, same device), or None. Its probe saves the audit and the bench a
    child process each (~8 s on the H100); its cudnn_fusion tells the fallback how the
    package's program was rewritten."""
    from engineforge.sidecar import read_json, sha256_file

    try:
        record = read_json(engine.with_name("build.json"))
        extra = record["result"]["extra"]
        same = (record["outputs"]["engine"]["sha256"] == sha256_file(engine)
                and extra["device"] == device and "runtime" in extra)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {"fallback_reason": extra.get("fallback_reason"),
            "cudnn_fusion": extra.get("cudnn_fusion")} if same else None


def _probe(engine: Path, shapes: dict, dtypes: dict, device: str) -> str | None:
    try:
        proc = subprocess.run([sys.executable, "-c", PROBE, str(engine), json.dumps(shapes),
                               json.dumps(dtypes), device, str(Path(__file__).parents[2])],
                              capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"aoti_load_package did not finish in {PROBE_TIMEOUT_S} s (child process)"
    if proc.returncode == 0:
        return None
    if proc.returncode < 0:
        sig = signal.Signals(-proc.returncode).name
        return (f"aoti_load_package crashed the child process (exit {proc.returncode}, "
                f"{sig})")
    return (f"aoti_load_package failed in the child process (exit {proc.returncode}): "
            f"{key_line(proc.stderr)}")


@dataclass
class Loaded:
    """A callable engine (fp32 torch tensors in, a flat list of fp32 tensors out)."""

    call: Callable
    runtime: str                   # "aotinductor" | "torch.compile"
    fallback_reason: str | None
    device: str
    io: dict

    def facts(self) -> dict:
        note = (f"the AOTInductor package does not load here ({self.fallback_reason}): ran "
                "torch.compile instead") if self.fallback_reason else None
        return {"runtime": self.runtime, "fallback_reason": self.fallback_reason,
                "device": self.device, "note": note}


_LAST: dict[tuple, Loaded] = {}  # the last engine loaded (a bench's points, an audit's runs)


def load(engine: Path, shapes: dict[str, list[int]]) -> Loaded:
    """The package through AOTInductor when it loads in a child; else ``torch.compile``
    of the cast program (static per shape, frozen weights). The last one loaded is kept for
    the next call on the same file."""
    st = Path(engine).stat()
    key = (str(engine), st.st_size, st.st_mtime_ns)
    if key not in _LAST:
        _LAST.clear()
        _LAST[key] = _load(engine, shapes)
    return _LAST[key]


# every shape a bench or an audit meets compiles once (bench points: min/opt/max)
RECOMPILE_LIMIT = 16


def _load(engine: Path, shapes: dict[str, list[int]]) -> Loaded:
    import torch
    import torch._inductor.config as inductor_config
    from torch.utils._pytree import tree_leaves

    from engineforge.errors import EngineforgeError

    device = target_device()
    if device == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN times its algorithms
        # an fp32 engine computes in fp32, as its audit's limits assume: with TF32 allowed
        # (PyTorch's cuDNN default) and benchmark on, mobilenet_v3_small's fp32 package
        # drifted to SNR 59.3 dB on the H100, under the fp32 audit's 60 dB
        torch.backends.cudnn.allow_tf32 = precision_of(engine) != "fp32"
    try:
        io = read_io(program_of(engine))
    except (OSError, KeyError, StopIteration, zipfile.BadZipFile) as err:
        raise EngineforgeError(str(err)) from None
    flat = lambda out: [o for o in tree_leaves(out) if isinstance(o, torch.Tensor)]
    cause = probe(engine, shapes, io["dtypes"], device)
    if cause is None:
        share_libstdcxx()
        # run_single_threaded: no container locks or event queries, which a CUDA graph
        # capture forbids (and a worker calls it from one thread)
        model = torch._inductor.aoti_load_package(str(engine), run_single_threaded=True)
        return Loaded(lambda *a: flat(model(*a)), "aotinductor", None, device, io)
    fused = (built_here(Path(engine), device) or {}).get("cudnn_fusion")
    module, _ = cast_module(program_of(engine), precision_of(engine), device,
                            cudnn_fusion=bool(fused),
                            channels_last=bool(fused and fused["channels_last_weights"]))
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                               RECOMPILE_LIMIT)
    compiled = torch.compile(module, dynamic=False)
    seen: set[tuple] = set()

    def call(*args):
        shapes = tuple(tuple(a.shape) for a in args)
        if shapes in seen:
            return flat(compiled(*args))
        # a new shape compiles now: with freezing (torch.compile's `options` does not reach
        # inductor's freezing pass; the config patch does)
        with inductor_config.patch(freezing=True):
            out = flat(compiled(*args))
        seen.add(shapes)
        return out

    return Loaded(call, "torch.compile", cause, device, io)


def fuses(settings: dict, precision: str, device: str) -> bool:
    """Whether a build fuses conv epilogues into cuDNN: on a GPU, fp16/bf16 engines only.
    fp32 engines stay unfused and run without TF32 (:func:`_load`): on the H100,
    mobilenet_v3_small's fused fp32 engine with TF32 drifted to SNR 56.3 dB, under the fp32
    audit's 60 dB."""
    return bool(settings.get("cudnn_fusion", True)) and device == "cuda" and \
        precision in ("fp16", "bf16")


def _export_cast(req: BuildRequest, device: str, args: tuple, dyn: tuple, fusion: bool):
    """The cast (and, with ``fusion``, cuDNN-fused) program re-exported with the profile's
    dynamic dims, and the fusion's counts. A model that views a convolution's output with
    NCHW strides cannot run channels_last: it is fused without the layout change."""
    import torch

    module, fused = cast_module(req.program, req.precision, device, cudnn_fusion=fusion)
    try:
        return torch.export.export(module, args, dynamic_shapes=dyn), fused
    except Exception as err:  # noqa: BLE001 - retried without the layout, else raised
        if not (fused and fused["channels_last_weights"]):
            raise
        cause = first_line(err, 200)
    module, fused = cast_module(req.program, req.precision, device, cudnn_fusion=fusion,
                                channels_last=False)
    return torch.export.export(module, args, dynamic_shapes=dyn), {
        **fused, "channels_last_error": cause}


class TorchInductorBackend(Backend):
    name = "torch-inductor"
    builds_from = "torch"
    artifact = "package.pt2"
    device_class = "cpu or gpu (cuda when torch sees one)"
    precisions = ("fp32", "fp16", "bf16")
    settings_section = "torch_inductor"
    tools = ("torch",)

    @classmethod
    def needs_gpu(cls, stage: str, device: str) -> bool:
        return device == "cuda"

    def availability(self) -> Availability:
        if importlib.util.find_spec("torch") is None:
            return Availability(False, "torch is not installed", "make env")
        from importlib import metadata

        return Availability(True, version=metadata.version("torch"))

    def device(self) -> str:
        from engineforge.sidecar import cpu_device

        return gpu_device() if target_device() == "cuda" else cpu_device()

    def runnable(self, precision: str) -> tuple[bool, str]:
        if precision not in self.precisions:
            return False, f"{precision} is not one of {self.name}'s precisions"
        return True, ""

    def build(self, req: BuildRequest) -> dict:
        import torch

        t0 = time.perf_counter()
        device = target_device()
        try:
            io = read_io(req.program)
        except FileNotFoundError as err:
            req.engine_path.write_bytes(b"")  # nothing to build from: a result, not an error
            return {"status": "not_runnable", "reason": f"not runnable on {self.name}: {err}",
                    "build_time_s": 0.0, "device": device}
        profile = req.profiles[0]
        example, dyn = dynamic_shapes(io, profile)
        args = tuple(torch.rand(s, device=device).to(getattr(torch, io["dtypes"][n]))
                     for s, n in zip(example, io["inputs"]))
        tmp = req.engine_path.with_name(f".{req.engine_path.name}.building")
        try:
            program, fused = _export_cast(
                req, device, args, dyn,
                fusion=fuses(req.settings, req.precision, device))
            with open(tmp, "wb") as f:
                torch._inductor.aoti_compile_and_package(
                    program, package_path=f, inductor_configs={"freezing": True})
        except Exception as err:  # noqa: BLE001 - the compiler's message is the cause
            tmp.unlink(missing_ok=True)
            fixed = SPECIALIZED.search(str(err))
            if fixed:  # e.g. a GRU's time dim: re-tracing the program fixes it
                raise BuildError(
                    f"{self.name} {req.precision}: torch.export fixes dim '{fixed[1]}' at "
                    f"{fixed[2]} when it re-traces the program; the profile lets it vary",
                    model=req.model, key=f"models.{req.model}.profiles",
                    fix=f"give '{fixed[1]}' one size in the profile (min = opt = max), or "
                        "drop torch-inductor for this model") from None
            raise BuildError(f"{self.name} {req.precision}: {first_line(err)}",
                             model=req.model, key=f"models.{req.model}.backends",
                             fix="drop torch-inductor for this model or this precision "
                                 "(docs/backends.md)") from None
        tmp.replace(req.engine_path)
        build_s = time.perf_counter() - t0
        cause = probe(req.engine_path, {n: profile[n]["min"] for n in io["inputs"]},
                      io["dtypes"], device)
        return {"status": "ok", "reason": None, "build_time_s": round(build_s, 3),
                "device": device, "dtype": DTYPES[req.precision],
                "dynamic_dims": {d.__name__: [d.min, d.max] for spec in dyn[0] if spec
                                 for d in spec.values()},
                "cudnn_fusion": fused,
                "runtime": "torch.compile" if cause else "aotinductor",
                "fallback_reason": cause,
                "note": (f"the AOTInductor package does not load here ({cause}): "
                         "runs torch.compile instead") if cause else None,
                "version": torch.__version__}

    def runner(self, engine_path: Path):
        return runner_class()(engine_path)

    @staticmethod
    def note(precision: str, ran: dict) -> str | None:
        if ran.get("device") == "cpu" and precision == "fp16":
            return ("fp16 on the CPU is slow (oneDNN's fast fp16 kernels need AVX512-FP16 or "
                    "AMX-FP16): slower than fp32 expected, not a speedup")
        return None

    def bench(self, engine_path: Path, shapes: dict[str, list[int]], settings: dict,
              work_dir: Path) -> dict:
        import torch

        from engineforge.errors import EngineforgeError

        mode = settings.get("cuda_graphs", "auto")
        try:
            loaded = load(engine_path, shapes)
        except EngineforgeError as err:
            raise BenchError(err.message) from None
        batch = next(iter(shapes.values()))[0]
        args = [torch.rand(shapes[n], device=loaded.device).to(
            getattr(torch, loaded.io["dtypes"][n])) for n in loaded.io["inputs"]]
        torch.set_num_threads(settings["threads"])
        extra = loaded.facts()
        with torch.inference_mode():
            if loaded.device == "cpu":
                from engineforge.stages.bench import time_callable

                stats = time_callable(lambda: loaded.call(*args), settings["warmup"],
                                      settings["iterations"], batch=batch)
                extra["cuda_graphs"] = "n/a (cpu)"
            else:
                from engineforge import gpubench

                def timed(graph: bool) -> dict:
                    return gpubench.bench_point(lambda: loaded.call(*args), batch=batch,
                                                warmup=settings["warmup"], cuda_graph=graph)

                stats, facts = gpubench.with_cuda_graphs(mode, lambda: timed(False),
                                                         lambda: timed(True))
                extra |= facts
                extra |= compute_rate(engine_path, args, stats["p50_ms"])
        stats["extra"] = {**stats.get("extra", {}), **extra}
        return stats


def compute_rate(engine: Path, args: list, p50_ms: float) -> dict:
    """Achieved TFLOP/s (FlopCounterMode on the exported program run eagerly in fp32 on the
    same inputs: FLOPs do not depend on the precision) and % of the device's measured
    matmul peak in the engine's precision (fp32 engines run without TF32: the fp32 peak).
    A count that fails is recorded, not fatal: the timing stands."""
    from engineforge import gpubench

    program = program_of(engine)
    try:
        eager = _eager_on_gpu(str(program), program.stat().st_mtime_ns)
        flops = gpubench.count_flops(eager, tuple(a.float() for a in args))
    except Exception as err:  # noqa: BLE001
        return {"flops_error": first_line(err, 200)}
    peak = _peak(precision_of(engine))
    tflops = flops / (p50_ms * 1e-3) / 1e12
    return {"gflop": flops / 1e9, "tflops": tflops, "pct_of_peak": 100 * tflops / peak.tflops,
            "peak_tflops": peak.tflops, "peak_source": peak.source}


@functools.lru_cache(maxsize=1)  # a bench's points share it; the next engine replaces it
def _eager_on_gpu(program: str, mtime_ns: int):
    import torch
    from torch.export.passes import move_to_device_pass

    return move_to_device_pass(torch.export.load(program), "cuda").module()


@functools.cache
def _peak(precision: str):
    import torch

    from engineforge import gpubench

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    return gpubench.measure_peak(dtype, tf32=False)


@functools.cache
def runner_class():
    """The audit's Polygraphy runner class (defined on first use: importing this module
    stays light)."""
    from polygraphy.backend.base import BaseRunner

    class InductorRunner(BaseRunner):
        """A Polygraphy runner over a package (or its torch.compile fallback), for the audit.
        Loading waits for the first batch: the child-process probe runs at its shapes."""

        def __init__(self, engine: str | Path, name: str | None = None):
            super().__init__(name=name, prefix="torch-inductor-runner")
            self.engine = Path(engine)

        def activate_impl(self):
            self.io = read_io(program_of(self.engine))
            self.loaded = None

        def get_input_metadata_impl(self):
            import numpy as np
            from polygraphy.common import TensorMetadata
            from polygraphy.datatype import DataType

            meta = TensorMetadata()
            for name in self.io["inputs"]:
                dims = self.io["dims"].get(name, {})
                meta.add(name, dtype=DataType.from_dtype(np.dtype(self.io["dtypes"][name])),
                         shape=[dims.get(a, -1) for a in range(self.io["ranks"][name])])
            return meta

        def infer_impl(self, feed_dict):
            import numpy as np
            import torch

            if self.loaded is None:
                shapes = {n: list(np.shape(feed_dict[n])) for n in self.io["inputs"]}
                self.loaded = load(self.engine, shapes)
            start = time.time()
            args = [torch.from_numpy(np.ascontiguousarray(feed_dict[n])).to(self.loaded.device)
                    for n in self.io["inputs"]]
            with torch.inference_mode():
                outs = self.loaded.call(*args)
            self.inference_time = time.time() - start
            return OrderedDict((n, o.detach().float().cpu().numpy())
                               for n, o in zip(self.io["outputs"], outs))

        def deactivate_impl(self):
            self.loaded = None

    return InductorRunner
