"""The build cache across clones on the team server: the demo zoo (config.yaml) cold in one
clone, then the same inputs in a second clone where every export, precision and build is a
signed cache hit (audits and benches still run: they are measurements). Pairs run back to
back, so a ratio is measured side by side on the same (shared, noisy) machine.

Each pair gets fingerprints no earlier run made (a nonce in the tool versions of ONNX, ONNX
Runtime (its onnxruntime-gpu entry) and TensorRT-RTX, through ENGINEFORGE_TOOL_VERSIONS,
which every cached stage's fingerprint holds), so the first clone is really cold. Needs the
team stack (`make stack-up`).

    .venv/bin/python benchmarks/bench_team_cache.py [--pairs 3] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from bench_slurm_zoo import run, stack_env, workspace
from benchstats import med
from engineforge.versions import version

CACHED = ("export", "simplify", "precision", "ort_quantize", "build")


def hits(ws: Path) -> tuple[int, int]:
    """(cache hits, cacheable sidecars) of the cached stages."""
    n = hit = 0
    for side in (ws / "artifacts").rglob("*.json"):
        try:
            data = json.loads(side.read_text())
        except ValueError:
            continue
        if isinstance(data, dict) and data.get("stage") in CACHED:
            n += 1
            hit += bool((data.get("cache") or {}).get("hit"))
    return hit, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the workspaces")
    args = ap.parse_args()
    stack = stack_env()
    rows = []
    for i in range(args.pairs):
        nonce = uuid.uuid4().hex[:8]
        # not "onnxruntime": a backend's own version entry has the backend's name, so for
        # ONNX Runtime builds that key is the installed version whatever the override says
        tools = {d: f"{version(d)}+bench{nonce}" for d in (
            "onnx", "onnxruntime-gpu", "tensorrt_rtx_cu13_bindings")}
        env = {"MLFLOW_TRACKING_URI": stack["MLFLOW_TRACKING_URI"],
               "ENGINEFORGE_TOOL_VERSIONS": json.dumps(tools)}
        tmp = Path(tempfile.mkdtemp(prefix="bench-team-cache-"))
        try:
            cold_ws, warm_ws = workspace(tmp / "cold"), workspace(tmp / "cached")
            cold, _ = run(cold_ws, env)
            cached, _ = run(warm_ws, env)
            rows.append({"pair": i, "cold_s": round(cold, 1), "cached_s": round(cached, 1),
                         "ratio": round(cached / cold, 3), "cold_hits": hits(cold_ws),
                         "cached_hits": hits(warm_ws), "load": round(os.getloadavg()[0], 2)})
            print(json.dumps(rows[-1]), flush=True)
        finally:
            if not args.keep:
                shutil.rmtree(tmp, ignore_errors=True)
    print("| pair | cold (s) | every export/precision/build a hit (s) | ratio "
          "| hits (cold, cached) | load |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['pair']} | {r['cold_s']} | {r['cached_s']} | {r['ratio']} | "
              f"{r['cold_hits'][0]}/{r['cold_hits'][1]}, {r['cached_hits'][0]}/"
              f"{r['cached_hits'][1]} | {r['load']} |")
    print(f"median: cold {med([r['cold_s'] for r in rows])} s, cached "
          f"{med([r['cached_s'] for r in rows])} s, ratio {med([r['ratio'] for r in rows])}")


if __name__ == "__main__":
    main()
