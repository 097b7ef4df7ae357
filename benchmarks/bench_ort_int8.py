"""int8 on ONNX Runtime's CPU provider: ORT's own quantizer vs ModelOpt's Q/DQ vs fp32.

Reads a pipeline run's artifacts (run the pipeline first, e.g. `make run`, or snakemake
with the resnet18 onnxruntime bench targets) and times, on the CPU provider with
``--threads`` intra-op threads, at batch 1 and at the profile's opt batch:
- fp32: the onnxruntime engine (build/onnxruntime/fp32/<profile>/engine.onnx);
- int8 (ORT quantize_static): the onnxruntime int8 engine, built from stages/ort_quantize;
- int8 (ModelOpt Q/DQ): ModelOpt's graph (precision/int8/model.onnx) at the same ORT
  optimization level as the engines (what the onnxruntime backend built before);
- fp16 (ModelOpt AutoCast) where built: ORT CPU has no fast fp16 kernels;
- fp32 folded: the fp32 graph after ``onnxscript.optimizer.optimize`` (the folding
  ort_quantize does first; BatchNormalization then fuses into the convolutions), not a
  pipeline artifact: it separates the int8 gain from the folding gain.

Each run: ``--warmup`` calls, then ``--iterations`` timed calls, its median kept; runs go
round-robin over the variants (a noisy shared machine slows all of them alike), and the
table shows the median over ``--runs`` runs. Cosine vs fp32 on the export's reference inputs.

Usage: .venv/bin/python benchmarks/bench_ort_int8.py [--artifacts artifacts] [--model resnet18]
Writes benchmarks/results/ort_int8-<model>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))

from engineforge.backends.onnxruntime import OPT_LEVEL  # noqa: E402
from engineforge.layout import Layout  # noqa: E402
from engineforge.sidecar import read_json  # noqa: E402


def cpu() -> dict:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    return {"model": fields.get("Model name", platform.processor()).strip(),
            "cpus": fields.get("CPU(s)", "?").strip(), "avx512_vnni": "avx512_vnni" in flags,
            "avx_vnni": "avx_vnni" in flags}


def variants(lay: Layout, model: str, profile: str) -> dict[str, tuple[Path, str]]:
    """name -> (ONNX file, who made it); only those that exist."""
    engine = lambda p: Path(lay.engine("onnxruntime", model, p, profile))  # noqa: E731
    ort_graph = Path(lay.quantized("precision.json", "onnxruntime", model, "int8"))
    found = {
        "fp32": (engine("fp32"), "as exported (ORT engine)"),
        "int8 ORT": (engine("int8"), read_json(ort_graph)["result"]["extra"]["quantizer"]
                     if ort_graph.exists() else "?"),
        "int8 ModelOpt": (Path(lay.precision("model.onnx", model, "int8")), "ModelOpt Q/DQ"),
        "fp16": (engine("fp16"), "ModelOpt AutoCast (ORT engine)"),
    }
    return {k: v for k, v in found.items() if v[0].exists()}


def folded(fp32: Path, out: Path) -> Path:
    import onnx
    import onnxscript.optimizer

    onnx.save(onnxscript.optimizer.optimize(onnx.load(str(fp32))), str(out))
    return out


def session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVEL)
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def one_run(sess, feed: dict, warmup: int, iterations: int) -> float:
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifacts", default="artifacts")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--profile", default="bs1-8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iterations", type=int, default=20)
    args = ap.parse_args()

    lay = Layout(args.artifacts)
    found = variants(lay, args.model, args.profile)
    if "fp32" not in found:
        sys.exit(f"no fp32 onnxruntime engine of {args.model} under {args.artifacts}: "
                 "run the pipeline first")
    tmp = Path(tempfile.mkdtemp(prefix="ort-int8-bench-"))
    found["fp32 folded"] = (folded(Path(lay.precision("model.onnx", args.model, "fp32")),
                                   tmp / "fp32-folded.onnx"),
                            "fp32 + onnxscript.optimizer.optimize (not in the pipeline)")
    shapes = read_json(Path(lay.build("onnxruntime", args.model, "fp32", args.profile))
                       )["config"]["profiles"][0]
    (name, dims), = shapes.items()
    batches = sorted({1, dims["opt"][0]})
    ref = np.load(lay.export("reference.npz", args.model))
    sample = ref[f"in:{name}"]  # the export's reference inputs (in:<input>)
    feeds = {b: {name: np.resize(sample, [b, *dims["opt"][1:]]).astype(np.float32)}
             for b in batches}
    sessions = {k: session(path, args.threads) for k, (path, _) in found.items()}
    outputs = {k: s.run(None, feeds[batches[-1]])[0] for k, s in sessions.items()}

    times: dict = {k: {b: [] for b in batches} for k in found}
    for _ in range(args.runs):  # round-robin: noise hits every variant alike
        for b in batches:
            for k, s in sessions.items():
                times[k][b].append(one_run(s, feeds[b], args.warmup, args.iterations))
    fp32_bytes = found["fp32"][0].stat().st_size
    rows = []
    for k, (path, made_by) in found.items():
        med = {b: statistics.median(times[k][b]) for b in batches}
        rows.append({"variant": k, "made_by": made_by, "mib": path.stat().st_size / 2**20,
                     "size_vs_fp32": path.stat().st_size / fp32_bytes,
                     "p50_ms": med, "runs_ms": times[k],
                     "speedup_vs_fp32": {b: statistics.median(times["fp32"][b]) / med[b]
                                         for b in batches},
                     "cosine_vs_fp32": cosine(outputs[k], outputs["fp32"])})
    shutil.rmtree(tmp)
    result = {"model": args.model, "profile": args.profile, "threads": args.threads,
              "runs": args.runs, "iterations": args.iterations, "warmup": args.warmup,
              "batches": batches, "cpu": cpu(), "onnxruntime": ort.__version__,
              "rows": rows}
    out = ROOT / "benchmarks" / "results" / f"ort_int8-{args.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")

    c = result["cpu"]
    print(f"{c['model']} ({c['cpus']} CPUs, avx512_vnni: {c['avx512_vnni']}), onnxruntime "
          f"{ort.__version__}, {args.threads} threads, median of {args.runs} runs x "
          f"{args.iterations} iterations")
    head = ["variant", "made by", "MiB", "size vs fp32"]
    head += [f"b{b} p50 ms" for b in batches] + [f"b{b} vs fp32" for b in batches]
    print("| " + " | ".join(head + ["cosine vs fp32"]) + " |")
    print("|" + "---|" * (len(head) + 1))
    for r in rows:
        cells = [r["variant"], r["made_by"], f"{r['mib']:.1f}", f"{r['size_vs_fp32']:.0%}"]
        cells += [f"{r['p50_ms'][b]:.2f}" for b in batches]
        cells += [f"{r['speedup_vs_fp32'][b]:.2f}x" for b in batches]
        print("| " + " | ".join(cells + [f"{r['cosine_vs_fp32']:.5f}"]) + " |")


if __name__ == "__main__":
    main()
