"""GPU benchmark of PyTorch eager vs torch.compile (inductor) with and without CUDA graphs.

Reproduces the H100 table in docs/benchmarks.md ("GPU (H100): torch-inductor"):

    python benchmarks/bench_gpu.py --out benchmarks/results/gpu            # full sweep
    python benchmarks/bench_gpu.py --out DIR --ablation --aoti             # + what-helped rows
    python benchmarks/bench_gpu.py --render DIR/rows.jsonl [...]           # table only

Models: torchvision resnet50 (224) and mobilenet_v3_small (256) with seeded random weights
(nothing downloaded), and the demo zoo's digits_cnn (8x8) and tiny_sr (256x256). Per model x
precision (fp32/fp16/bf16: weights and inputs cast) x batch (1/8/32), variants:
  eager           plain PyTorch (NCHW)                 eager-graph     the same, CUDA graph
  compile         torch.compile(dynamic=False), channels_last   compile-graph   + CUDA graph
Speedups are over eager fp32 at the same batch; % of peak is against the matmul peak measured
on the device (fp32 rows: TF32, as cuDNN convolutions run TF32 by default). Each model runs
in its own child process with a timeout; rows are appended to DIR/rows.jsonl as they come,
so a timeout or crash keeps what was measured. Timing: engineforge.gpubench (CUDA events,
rounds until the median is stable).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT / "workflow", ROOT):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

MODELS = {  # name: (input shape without batch, builder)
    "resnet50": ((3, 224, 224), "torchvision"),
    "mobilenet_v3_small": ((3, 256, 256), "torchvision"),
    "digits_cnn": ((1, 8, 8), "models.digits_cnn:DigitsCNN:models/digits_cnn.safetensors"),
    "tiny_sr": ((1, 256, 256), "models.sr_net:TinySR:models/tiny_sr.safetensors"),
}
DTYPES = ("fp32", "fp16", "bf16")
# BENCH_GPU_DEVICE=cpu: a smoke run of the whole script on CPU (CUDA-graph rows fail there).
DEVICE = os.environ.get("BENCH_GPU_DEVICE", "cuda")
START = time.monotonic()
TIMING = dict(device=DEVICE, warmup=20, min_rounds=5, window=5, max_rounds=40, max_seconds=2.0)


# Seeded random mobilenet_v3_small decays its activations to ~1e-7 (output ~1e-9): fp16
# flushes them to zero (relative error 1.0). Its BatchNorm statistics are therefore taken
# from two random batches, which keeps activations O(1) and fp16 meaningful.
CALIBRATE_BN = {"mobilenet_v3_small"}


@functools.cache
def _torchvision_state(name: str) -> dict:
    import torch
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None)
    if name in CALIBRATE_BN:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the calibration batches
        model.train()
        gen = torch.Generator().manual_seed(1234)
        with torch.no_grad():
            for _ in range(2):
                model(torch.randn(16, *MODELS[name][0], generator=gen))
    return model.state_dict()


def build_model(name: str):
    shape, how = MODELS[name]
    if how == "torchvision":
        import torchvision

        model = getattr(torchvision.models, name)(weights=None)
        model.load_state_dict(_torchvision_state(name))
    else:
        import importlib

        from safetensors.torch import load_file

        module, attr, weights = how.split(":")
        model = getattr(importlib.import_module(module), attr)()
        model.load_state_dict(load_file(str(ROOT / weights)))
    return model.eval(), shape


def emit(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps({k: row.get(k) for k in ("model", "precision", "batch", "variant",
                                               "p50_ms", "speedup", "cv", "error")}),
          flush=True)


def rel_err(out, ref) -> float:
    out, ref = out.float(), ref.float()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def peak_of(peaks: dict, prec: str):
    """The measured peak for a precision's rows (fp32 rows: TF32, cuDNN's default)."""
    from engineforge.gpubench import Peak

    key = "tf32" if prec == "fp32" else prec
    return Peak(**peaks[key]) if key in peaks else None


def bench_model(name: str, args, peaks: dict) -> None:
    """Child process: every precision x batch x variant of one model. Eager fp32 at each batch
    runs first: it is that batch's baseline. One compile serves compile and compile-graph."""
    import torch
    from engineforge import gpubench

    torch.backends.cudnn.benchmark = True
    casts = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    rows = Path(args.out) / "rows.jsonl"
    fp32_model, shape = build_model(name)
    for batch in args.batches:
        gen = torch.Generator().manual_seed(batch)
        x32 = torch.randn(batch, *shape, generator=gen)
        if name in ("digits_cnn", "tiny_sr"):
            x32 = x32.abs().clamp(0, 1)  # their inputs live in [0, 1]
        flops = gpubench.count_flops(fp32_model, (x32,))
        with torch.no_grad():
            ref = fp32_model.to(DEVICE)(x32.to(DEVICE))
        fp32_model.cpu()
        baseline = None
        for prec in args.precisions:
            peak = peak_of(peaks, prec)
            prepared = {}  # "eager" / "compile" -> (callable, input, extra) or an error
            for variant in args.variants:
                kind = variant.split("-")[0]
                base = dict(model=name, precision=prec, batch=batch, variant=variant,
                            compile_mode=args.compile_mode if kind == "compile" else None,
                            input_shape=[batch, *shape])
                try:
                    if kind not in prepared:
                        prepared.clear()  # free the other kind's model and graphs first
                        torch.cuda.empty_cache()
                        compiled = kind == "compile"
                        prepared[kind] = prepare(name, casts[prec], x32, ref,
                                                 args.compile_mode if compiled else None,
                                                 channels_last=compiled,
                                                 freezing=compiled and args.freezing)
                    fn, x, extra = prepared[kind]
                    with torch.no_grad():
                        timing = gpubench.time_callable(lambda fn=fn, x=x: fn(x),
                                                        cuda_graph=variant.endswith("-graph"),
                                                        **TIMING)
                    row = gpubench.report(timing, batch=batch, flops=flops, peak=peak,
                                          baseline_p50_ms=baseline)
                except Exception as err:  # one failed variant never hides the others
                    emit(rows, {**base, "error": f"{type(err).__name__}: {err}"[:500]})
                    continue
                if prec == "fp32" and variant == "eager":
                    baseline = row["p50_ms"]
                    row["speedup"] = 1.0
                emit(rows, {**base, **row, **extra})
            prepared.clear()
            torch.cuda.empty_cache()


def PaddedStem(net, channels: int):  # noqa: N802 - a module factory
    """A torchvision ResNet whose 3-channel stem input is zero-padded to ``channels`` (its
    weight too): the same function."""
    import torch

    class Padded(torch.nn.Module):
        def __init__(self):
            super().__init__()
            conv = net.conv1
            wide = torch.nn.Conv2d(channels, conv.out_channels, conv.kernel_size, conv.stride,
                                   conv.padding, bias=False).to(conv.weight.device)
            with torch.no_grad():
                wide.weight.zero_()
                wide.weight[:, :conv.in_channels] = conv.weight
            net.conv1, self.net, self.pad = wide, net, channels - conv.in_channels

        def forward(self, x):
            return self.net(torch.nn.functional.pad(x, (0, 0, 0, 0, 0, self.pad)))

    return Padded().eval()


def prepare(name, dt, x32, ref, mode: str | None, channels_last: bool,
            freezing: bool = False, options: dict | None = None):
    """The model in `dt` on the GPU, eager (`mode` None) or torch.compile'd with `mode`
    ("default", "reduce-overhead", "max-autotune-no-cudagraphs", ...); `freezing`: inductor
    folds the weights in as constants (conv-BN folding, weight layouts chosen once);
    `options`: more inductor config, patched while compiling."""
    import torch
    import torch._inductor.config as inductor_config

    options = dict(options or {})
    cudnn_fused = options.pop("cudnn_fusion", False)
    min_kernel = options.pop("cudnn_min_kernel", 1)
    options.pop("profile", None)
    if "cudnn_benchmark_limit" in options:  # 0: cuDNN tries every algorithm
        torch.backends.cudnn.benchmark_limit = options.pop("cudnn_benchmark_limit")
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(name)[0].to(DEVICE)
    if options.get("stem_pad"):
        model = PaddedStem(model, options.pop("stem_pad")).to(DEVICE)
    extra = {"channels_last": channels_last, "freezing": freezing, **options}
    if cudnn_fused:  # the torch-inductor backend's rewrite, on the exported fp32 program
        from engineforge import cudnn_fusion

        model = torch.export.export(model, (x32.to(DEVICE),)).module()
        extra["cudnn_fusion"] = cudnn_fusion.fuse(model, min_kernel=min_kernel)
    model = model.to(DEVICE, dt).to(memory_format=layout)
    x = x32.to(DEVICE, dt).contiguous(memory_format=layout)
    fn = model
    if mode == "jit":  # TorchScript's own conv-bias-add-relu rewrite (optimize_for_inference)
        with torch.no_grad():
            fn = torch.jit.optimize_for_inference(torch.jit.freeze(
                torch.jit.trace(model, x).eval()))
            fn(x)
            fn(x)
    elif mode:
        torch._dynamo.reset()  # a fresh cache: no recompile limit across shapes
        fn = torch.compile(model, mode=None if mode == "default" else mode, dynamic=False)
        t0 = time.perf_counter()
        with torch.no_grad(), inductor_config.patch(freezing=freezing, **options):
            fn(x)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        extra["compile_s"] = round(time.perf_counter() - t0, 1)
    with torch.no_grad():
        out = fn(x)
    extra["rel_err_vs_fp32"] = rel_err(out, ref)
    extra["finite"] = bool(torch.isfinite(out).all())
    return fn, x, extra


MAX_AUTOTUNE = "max-autotune-no-cudagraphs"
MM_1X1 = {"conv_1x1_as_mm": True}  # 1x1 convolutions (most of resnet50's) as matmuls
AUTOTUNE_MM = {**MM_1X1, "max_autotune_gemm": True, "max_autotune_gemm_backends": "ATEN,TRITON"}
ABLATION = (  # variant, compile mode (None: eager), channels_last, our CUDA graph, freezing,
    #           more inductor config
    ("eager-cl", None, True, False, False, {}), ("eager-cl-graph", None, True, True, False, {}),
    ("compile-nchw", "default", False, False, False, {}),
    ("compile-nchw-graph", "default", False, True, False, {}),
    ("compile-reduce-overhead", "reduce-overhead", True, False, False, {}),
    ("compile-freezing", "default", True, False, True, {}),
    ("compile-freezing-graph", "default", True, True, True, {}),
    ("compile-freezing-1x1mm-graph", "default", True, True, True, MM_1X1),
    ("compile-freezing-coordinate-descent-graph", "default", True, True, True,
     {"coordinate_descent_tuning": True}),
    ("compile-freezing-1x1mm-autotune-mm-graph", "default", True, True, True, AUTOTUNE_MM),
    ("compile-freezing-1x1mm-autotune-mm-coordinate-descent-graph", "default", True, True,
     True, {**AUTOTUNE_MM, "coordinate_descent_tuning": True}),
    ("compile-freezing-max-autotune", MAX_AUTOTUNE, True, False, True, {}),
    ("compile-freezing-max-autotune-graph", MAX_AUTOTUNE, True, True, True, {}),
    # cuDNN runs conv + bias (+ residual add) + ReLU as one kernel (engineforge.cudnn_fusion)
    ("jit-optimize-for-inference-graph", "jit", True, True, False, {}),
    ("eager-cudnn-fused-graph", None, True, True, False, {"cudnn_fusion": True}),
    ("compile-freezing-cudnn-fused", "default", True, False, True, {"cudnn_fusion": True}),
    ("compile-freezing-cudnn-fused-graph", "default", True, True, True,
     {"cudnn_fusion": True}),
    ("compile-freezing-cudnn-fused-try-all-graph", "default", True, True, True,
     {"cudnn_fusion": True, "cudnn_benchmark_limit": 0}),
    ("compile-freezing-cudnn-fused-profile", "default", True, False, True,
     {"cudnn_fusion": True, "profile": True}),
    # the stem's 3 input channels zero-padded to 4 (cuDNN's first-layer kernel reads 4; it
    # pads the input itself otherwise)
    ("compile-freezing-cudnn-fused-stem4-graph", "default", True, True, True,
     {"cudnn_fusion": True, "stem_pad": 4}),
    # cuDNN-fused 3x3/7x7 convolutions, 1x1 ones as matmuls with inductor's epilogues
    ("compile-freezing-cudnn-fused-3x3-1x1mm-graph", "default", True, True, True,
     {"cudnn_fusion": True, "cudnn_min_kernel": 2, **MM_1X1}),
    ("compile-freezing-cudnn-fused-3x3-1x1mm-autotune-mm-graph", "default", True, True, True,
     {"cudnn_fusion": True, "cudnn_min_kernel": 2, **AUTOTUNE_MM}),
    ("compile-freezing-cudnn-fused-3x3-1x1mm-autotune-triton-mm-graph", "default", True, True,
     True, {"cudnn_fusion": True, "cudnn_min_kernel": 2, **AUTOTUNE_MM,
            "max_autotune_gemm_backends": "TRITON"}),
)


def ablation(args, peaks: dict) -> None:
    """What helped, on the target rows (resnet50 fp16 b32, mobilenet_v3_small fp16 b1):
    channels_last, CUDA graphs, inductor's own graphs, max-autotune."""
    import torch
    from engineforge import gpubench

    torch.backends.cudnn.benchmark = True
    rows = Path(args.out) / "rows.jsonl"
    targets = [(t.split(":")[0], int(t.split(":")[1])) for t in args.ablation_targets]
    for name, batch in targets:
        model32, shape = build_model(name)
        x32 = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(batch))
        flops = gpubench.count_flops(model32, (x32,))
        with torch.no_grad():
            ref = model32.to(DEVICE)(x32.to(DEVICE))
        baseline = None
        for variant, mode, cl, graph, freeze, options in (
                ("eager", None, False, False, False, {}), *ABLATION):
            if variant != "eager" and args.ablation_variants and \
                    variant not in args.ablation_variants:
                continue
            prec = "fp32" if baseline is None else "fp16"
            base = dict(model=name, precision=prec, batch=batch, variant=variant,
                        compile_mode=mode, ablation=True, input_shape=[batch, *shape])
            try:
                dt = torch.float32 if prec == "fp32" else torch.float16
                fn, x, extra = prepare(name, dt, x32, ref, mode, cl, freeze, options)
                with torch.no_grad():
                    t = gpubench.time_callable(lambda fn=fn, x=x: fn(x), cuda_graph=graph,
                                               **TIMING)
                row = gpubench.report(t, batch=batch, flops=flops,
                                      peak=peak_of(peaks, prec),
                                      baseline_p50_ms=baseline)
                if options.get("profile"):
                    row["profile"] = kernel_profile(fn, x)
                if mode == "reduce-overhead":
                    row["cuda_graph"] = True  # inductor's own CUDA graph trees
                if baseline is None:
                    baseline, row["speedup"] = row["p50_ms"], 1.0
                emit(rows, {**base, **row, **extra})
            except Exception as err:
                emit(rows, {**base, "error": f"{type(err).__name__}: {err}"[:500]})
            finally:
                fn = x = None
                torch.cuda.empty_cache()


def kernel_profile(fn, x, top: int = 30) -> dict:
    """GPU time per kernel over 20 calls (torch.profiler): the top ones and the total."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            fn(x)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    events.sort(key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in events)
    return {"total_ms_per_call": total / 20 / 1e3, "kernels": [
        [e.key[:90], e.count // 20, round(e.device_time_total / 20 / 1e3, 4)]
        for e in events[:top]]}


AOTI_BUILD = """
import sys, torch
sys.path[:0] = [{root!r}, {root!r} + "/workflow"]
from benchmarks.bench_gpu import build_model
from engineforge import cudnn_fusion
m, shape = build_model({name!r})
m = m.to("cuda")
x = torch.randn({batch}, *shape, device="cuda")
if {fuse!r}:
    m = torch.export.export(m, (x,)).module()
    print(cudnn_fusion.fuse(m))
m = m.to(torch.float16)
ep = torch.export.export(m, (x.half(),))
print(torch._inductor.aoti_compile_and_package(ep, package_path={pkg!r},
                                               inductor_configs={{"freezing": {freezing!r}}}))
"""
AOTI_LOAD = """
import sys, json, torch
sys.path[:0] = [{root!r} + "/workflow"]
from engineforge import gpubench
from engineforge.backends.torch_inductor import share_libstdcxx
share_libstdcxx()
# run_single_threaded: no container locks or event queries, which a CUDA graph capture forbids
runner = torch._inductor.aoti_load_package({pkg!r}, run_single_threaded=True)
x = torch.randn({batch}, *{shape!r}, device="cuda", dtype=torch.float16)
runner(x)
t = gpubench.time_callable(lambda: runner(x), max_seconds=2.0)
g = gpubench.time_callable(lambda: runner(x), max_seconds=2.0, cuda_graph=True)
print("AOTI_OK", json.dumps({{**t.stats, "cv": t.cv, "graph_p50_ms": g.stats["p50_ms"],
                             "graph_cv": g.cv}}))
"""


AOTI_VARIANTS = {  # variant: (engineforge.cudnn_fusion first, inductor freezing)
    "aoti-package": (False, False), "aoti-package-freezing": (False, True),
    "aoti-package-cudnn-fused": (True, True)}


def aoti_start(args) -> list:
    """Start the AOTInductor package builds (fp16, static batch 32), all at once, in the
    background: [(row base, package, process, start time)]."""
    jobs = []
    for name in args.aoti:
        for variant in args.aoti_variants:
            fuse, freezing = AOTI_VARIANTS[variant]
            pkg = f"/tmp/engineforge_{variant}_{name}_b32.pt2"
            base = dict(model=name, precision="fp16", batch=32, variant=variant,
                        ablation=True)
            proc = subprocess.Popen([sys.executable, "-c", AOTI_BUILD.format(
                root=str(ROOT), name=name, batch=32, pkg=pkg, fuse=fuse, freezing=freezing)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                start_new_session=True)
            jobs.append((base, pkg, proc, time.perf_counter()))
    return jobs


def aoti_finish(args, jobs: list) -> None:
    """Wait for each build (within the run budget), then load and time each package in a
    fresh process, one at a time; record the exit code (-11 = the segfault seen on the
    H100 before engineforge made libstdc++ global)."""
    rows = Path(args.out) / "rows.jsonl"
    for base, pkg, proc, t0 in jobs:
        left = args.budget_s - (time.monotonic() - START) if args.budget_s else 360
        try:
            out, err = proc.communicate(timeout=max(left - 30, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            emit(rows, {**base, "error": "not run: run budget spent while building"})
            continue
        build_s = round(time.perf_counter() - t0, 1)
        if proc.returncode:
            emit(rows, {**base, "error": f"build exit {proc.returncode}: {err[-300:]}"})
            continue
        try:
            ld = subprocess.run([sys.executable, "-c", AOTI_LOAD.format(
                root=str(ROOT), pkg=pkg, batch=base["batch"],
                shape=list(MODELS[base["model"]][0]))],
                capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired as exc:
            emit(rows, {**base, "error": f"timeout: {exc}"[:300]})
            continue
        ok = [ln for ln in ld.stdout.splitlines() if ln.startswith("AOTI_OK")]
        row = {**base, "build_s": build_s, "load_exit": ld.returncode,
               "build_log": out.strip().splitlines()[:1]}
        if ok:
            row.update(json.loads(ok[0].split(" ", 1)[1]))
        else:
            row["error"] = f"load exit {ld.returncode}: {ld.stderr[-300:]}"
        emit(rows, row)


def measure(args) -> dict:
    import torch
    from engineforge import gpubench

    if DEVICE == "cpu":
        return {"device": None, "peaks": {}, "settings": {"smoke": "cpu"}}
    info = gpubench.device_info()
    peaks = {}
    for dt, tf32 in ((torch.float16, False), (torch.bfloat16, False), (torch.float32, True),
                     (torch.float32, False)):
        p = gpubench.measure_peak(dt, tf32=tf32)
        sheet = gpubench.datasheet_peak(info["name"], p.dtype)
        peaks[p.dtype] = {"dtype": p.dtype, "tflops": round(p.tflops, 1), "source": p.source}
        peaks[p.dtype + "_datasheet"] = sheet.__dict__ if sheet else None
    settings = {"cudnn.benchmark": True,
                "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
                "matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                "compile_mode": args.compile_mode, "freezing": args.freezing,
                "timing": TIMING}
    return {"device": info, "peaks": peaks, "settings": settings}


def run_child(name: str, args, timeout: float | None = None) -> dict:
    timeout = timeout or args.model_timeout
    if args.budget_s:
        timeout = min(timeout, args.budget_s - (time.monotonic() - START))
        if timeout < 20:
            return {"model": name, "exit": "skipped: run budget spent", "seconds": 0}
    cmd = [sys.executable, __file__, "--child", name, "--out", args.out, "--compile-mode",
           args.compile_mode, "--batches", *map(str, args.batches), "--precisions",
           *args.precisions, "--variants", *args.variants, "--ablation-targets",
           *args.ablation_targets] + (["--freezing"] if args.freezing else []) + (
              ["--ablation-variants", *args.ablation_variants] if args.ablation_variants
              else [])
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the child and its compile workers
        proc.wait()
        rc = "timeout"
    return {"model": name, "exit": rc, "seconds": round(time.perf_counter() - t0, 1)}


# ---------------------------------------------------------------- the table

def fmt(v, spec, scale=1.0):
    return "—" if v is None else format(v * scale, spec)


def render(rows: list[dict], meta: dict | None) -> str:
    lines = []
    if meta and meta.get("device"):
        d = meta["device"]
        lines.append(f"Device: {d['name']} (sm {d['capability']}, {d['sms']} SMs, "
                     f"{d['memory_gib']} GiB), torch {d['torch']}, CUDA {d['cuda']}, "
                     f"cuDNN {d['cudnn']}; clocks SM {d.get('sm_clock_mhz', '?')}/"
                     f"{d.get('sm_clock_max_mhz', '?')} MHz, memory "
                     f"{d.get('mem_clock_mhz', '?')} MHz (NVML, at start)")
        pk = meta["peaks"]
        lines.append("Peaks (measured, 8192^3 torch.mm, best of 5): " + ", ".join(
            f"{k} {pk[k]['tflops']:.0f}" for k in ("fp16", "bf16", "tf32", "fp32") if k in pk)
            + " TFLOP/s; datasheet: " + ", ".join(
            f"{k} {pk[k + '_datasheet']['tflops']:.0f}" for k in ("fp16", "bf16", "tf32", "fp32")
            if pk.get(k + "_datasheet")) + (f" ({pk['fp16_datasheet']['source']})"
                                            if pk.get("fp16_datasheet") else ""))
        lines.append("")
    lines.append("| model | prec | batch | variant | graphs | p50 ms | p99 ms | items/s | "
                 "× eager fp32 | TFLOP/s | % peak | CV % |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['model']} | {r['precision']} | {r['batch']} | {r['variant']} "
                         f"| | failed: {r['error'][:80].replace('|', '/')} |||||||")
            continue
        if "p50_ms" not in r:
            continue
        lines.append(
            f"| {r['model']} | {r['precision']} | {r['batch']} | {r['variant']} | "
            f"{'on' if r.get('cuda_graph') else 'off'} | {fmt(r['p50_ms'], '.3f')} | "
            f"{fmt(r.get('p99_ms'), '.3f')} | {fmt(r.get('throughput_per_s'), ',.0f')} | "
            f"{fmt(r.get('speedup'), '.2f')} | {fmt(r.get('tflops'), '.2f')} | "
            f"{fmt(r.get('pct_of_peak'), '.1f')} | {fmt(r.get('cv'), '.2f', 100)} |")
    return "\n".join(lines)


def load_rows(paths) -> tuple[list[dict], dict | None]:
    """Rows of one or more runs, sweep rows first, each sorted by model, precision, batch."""
    rows, meta = [], None
    for p in map(Path, paths):
        rows += [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()]
        if (p.parent / "meta.json").exists():
            meta = json.loads((p.parent / "meta.json").read_text())
    order = {m: i for i, m in enumerate(MODELS)}
    rows.sort(key=lambda r: (bool(r.get("ablation")), order.get(r["model"], 99),
                             DTYPES.index(r["precision"]), r["batch"]))  # stable: variants
    return rows, meta


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu"))
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--precisions", nargs="+", default=list(DTYPES))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--variants", nargs="+",
                    default=["eager", "eager-graph", "compile", "compile-graph"])
    ap.add_argument("--compile-mode", default="default",
                    help="torch.compile mode: default or max-autotune-no-cudagraphs")
    ap.add_argument("--freezing", action="store_true",
                    help="sweep's compile variants with inductor freezing (fastest on resnet50)")
    ap.add_argument("--model-timeout", type=float, default=240.0)
    ap.add_argument("--ablation", action="store_true", help="what-helped rows (fp16 targets)")
    ap.add_argument("--aoti", nargs="*", default=[], metavar="MODEL",
                    help="try AOTInductor packages (fp16, batch 32) of these models")
    ap.add_argument("--aoti-variants", nargs="+", default=list(AOTI_VARIANTS),
                    choices=list(AOTI_VARIANTS))
    ap.add_argument("--ablation-targets", nargs="+", default=["resnet50:32",
                                                                "mobilenet_v3_small:1"])
    ap.add_argument("--ablation-timeout", type=float, default=420.0)
    ap.add_argument("--ablation-variants", nargs="*", default=[],
                    help="only these ablation variants (names in ABLATION; eager always runs)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="whole-run wall budget: no child runs past it")
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--render", nargs="+", help="rows.jsonl files: print the table only")
    args = ap.parse_args()
    if args.render:
        print(render(*load_rows(args.render)))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.child:
        peaks = json.loads((out / "meta.json").read_text())["peaks"]
        ablation(args, peaks) if args.child == "ablation" else bench_model(args.child, args, peaks)
        return 0
    meta = measure(args)
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    print(json.dumps(meta["peaks"]), flush=True)
    meta["children"] = []
    builds = aoti_start(args)  # builds run on the CPUs while the GPU rows are timed
    if args.ablation:
        meta["children"].append(run_child("ablation", args, args.ablation_timeout))
        print(meta["children"][-1], flush=True)
    if not args.skip_sweep:
        for name in args.models:
            meta["children"].append(run_child(name, args))
            print(meta["children"][-1], flush=True)
    aoti_finish(args, builds)
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    rows, _ = load_rows([out / "rows.jsonl"]) if (out / "rows.jsonl").exists() else ([], None)
    (out / "results.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    table = render(rows, meta)
    (out / "table.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
