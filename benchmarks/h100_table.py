"""The H100 pipeline table (docs/benchmarks.md) from a run's sidecars.

Usage: python benchmarks/h100_table.py ARTIFACTS_DIR  (after benchmarks/run_h100_pipeline.sh)
Per model x precision x batch (the profile's min/opt/max points): p50/p99, throughput,
speedup over eager fp32 on the GPU, achieved TFLOP/s and % of the measured peak, CV, and
whether the headline ran with CUDA graphs (the other timing in brackets).
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
    for bench in sorted(root.glob("*/bench/torch-inductor/*/*.json")):
        model, precision, profile = bench.parts[-5], bench.parts[-2], bench.stem
        base = _points(root / model / "bench" / "pytorch" / f"{profile}.json")
        for which, p in _points(bench).items():
            x = p.get("extra", {})
            eager = base.get(which, {}).get("extra", {})
            other = x.get("with_cuda_graphs") or x.get("without_cuda_graphs") or {}
            yield {"model": model, "precision": precision, "profile": profile,
                   "batch": p["batch"], "point": which,
                   "shape": "×".join(map(str, next(iter(p["shapes"].values())))),
                   "p50": p["p50_ms"], "p99": p["p99_ms"],
                   "tput": p["throughput_per_s"], "cv": 100 * p["cv"],
                   "eager_fp32": eager.get("cuda_fp32_p50_ms"),
                   "eager_fp16": eager.get("cuda_fp16_p50_ms"),
                   "tflops": x.get("tflops"), "pct": x.get("pct_of_peak"),
                   "graphs": x.get("cuda_graphs"), "other_p50": other.get("p50_ms"),
                   "runtime": x.get("runtime"), "fallback": x.get("fallback_reason")}


def fmt(v, spec):
    return "—" if v is None else format(v, spec)


PRECISIONS = ("fp32", "fp16", "bf16")
POINTS = ("min", "opt", "max")


def main(root: Path) -> None:
    out = ["| model | precision | profile | input | p50 ms | p99 ms | items/s | eager fp32 ms | "
           "speedup | eager fp16 ms | TFLOP/s | % peak | CV % | CUDA graphs (other p50) | "
           "runtime |", "|" + "---|" * 15]
    causes = set()
    order = lambda r: (r["model"], PRECISIONS.index(r["precision"]), r["profile"],  # noqa: E731
                       POINTS.index(r["point"]))
    for r in sorted(rows(root), key=order):
        speed = r["eager_fp32"] / r["p50"] if r["eager_fp32"] else None
        graphs = {True: "on", False: "off"}.get(r["graphs"], str(r["graphs"]))
        out.append(f"| {r['model']} | {r['precision']} | {r['profile']} | {r['shape']} | "
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
