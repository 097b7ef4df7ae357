"""The H100 pipeline table (docs/benchmarks.md) from a run's sidecars.

Usage: python benchmarks/h100_table.py ARTIFACTS_DIR  (after benchmarks/run_h100_pipeline.sh)
Per model x backend x precision x batch (the profile's min/opt/max points): p50/p99,
throughput, speedup over eager fp32 on the GPU, achieved TFLOP/s and % of the measured peak,
CV, whether the headline ran with CUDA graphs (the other timing in brackets) and what ran it
(AOTInductor or its fallback; the ONNX Runtime provider). FLOPs and the peak come from
torch-inductor's rows (FlopCounterMode on the exported program): an onnxruntime row at the
same shape and precision gets them from there.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _points(path: Path) -> dict:
    if not path.is_file():
        return {}
    result = json.loads(path.read_text())["result"]
    return result.get("points") or {}


def rows(root: Path):
    for bench in sorted(root.glob("*/bench/*/*/*.json")):
        model, backend, precision, profile = (bench.parts[-5], bench.parts[-3],
                                              bench.parts[-2], bench.stem)
        if backend == "pytorch":
            continue
        base = _points(root / model / "bench" / "pytorch" / f"{profile}.json")
        for which, p in _points(bench).items():
            x = p.get("extra", {})
            eager = base.get(which, {}).get("extra", {})
            other = x.get("with_cuda_graphs") or x.get("without_cuda_graphs") or {}
            yield {"model": model, "backend": backend, "precision": precision,
                   "profile": profile, "gflop": x.get("gflop"), "peak": x.get("peak_tflops"),
                   "batch": p["batch"], "point": which,
                   "shape": "×".join(map(str, next(iter(p["shapes"].values())))),
                   "p50": p["p50_ms"], "p99": p["p99_ms"],
                   "tput": p["throughput_per_s"], "cv": 100 * p["cv"],
                   "eager_fp32": eager.get("cuda_fp32_p50_ms"),
                   "eager_fp16": eager.get("cuda_fp16_p50_ms"),
                   "tflops": x.get("tflops"), "pct": x.get("pct_of_peak"),
                   "graphs": x.get("cuda_graphs"), "other_p50": other.get("p50_ms"),
                   "runtime": x.get("runtime") or (x.get("providers") or ["?"])[0],
                   "fallback": x.get("fallback_reason")}


def fmt(v, spec):
    return "—" if v is None else format(v, spec)


PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")
POINTS = ("min", "opt", "max")


def order(r: dict) -> tuple:
    base = r["precision"].split("-")[0]  # fp16-repaired sorts after fp16
    return (r["model"], r["backend"], PRECISIONS.index(base) if base in PRECISIONS else 99,
            r["precision"], r["profile"], POINTS.index(r["point"]))


def with_rates(found: list[dict]) -> list[dict]:
    """TFLOP/s and % of peak for rows without them, from a row of the same model and shape
    (FLOPs) and precision (peak) that has them."""
    gflop = {(r["model"], r["shape"]): r["gflop"] for r in found if r["gflop"]}
    peak = {r["precision"]: r["peak"] for r in found if r["peak"]}
    for r in found:
        g, pk = gflop.get((r["model"], r["shape"])), peak.get(r["precision"])
        if r["tflops"] is None and g:
            r["tflops"] = g / r["p50"]
            r["pct"] = 100 * r["tflops"] / pk if pk else None
    return found


def main(root: Path) -> None:
    out = ["| model | backend | precision | profile | input | p50 ms | p99 ms | items/s | "
           "eager fp32 ms | speedup | eager fp16 ms | TFLOP/s | % peak | CV % | "
           "CUDA graphs (other p50) | runtime |", "|" + "---|" * 16]
    causes = set()
    for r in sorted(with_rates(list(rows(root))), key=order):
        speed = r["eager_fp32"] / r["p50"] if r["eager_fp32"] else None
        graphs = {True: "on", False: "off"}.get(r["graphs"], str(r["graphs"]))
        out.append(f"| {r['model']} | {r['backend']} | {r['precision']} | {r['profile']} | "
                   f"{r['shape']} | "
                   f"{fmt(r['p50'], '.3f')} "
                   f"| {fmt(r['p99'], '.3f')} | {fmt(r['tput'], '.0f')} | "
                   f"{fmt(r['eager_fp32'], '.3f')} | {fmt(speed, '.2f')}x | "
                   f"{fmt(r['eager_fp16'], '.3f')} | {fmt(r['tflops'], '.1f')} | "
                   f"{fmt(r['pct'], '.1f')} | {fmt(r['cv'], '.2f')} | {graphs} "
                   f"({fmt(r['other_p50'], '.3f')}) | {r['runtime']} |")
        if r["fallback"]:
            causes.add(r["fallback"])
    print("\n".join(out))
    for c in sorted(causes):
        print(f"\ntorch.compile fallback cause: {c}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "artifacts-h100"))
