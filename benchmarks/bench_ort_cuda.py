"""ONNX Runtime's CUDA provider options, timed on engines the workflow built (issue 10).

Usage (on a GPU machine with onnxruntime-gpu, after the workflow built the engines):
    python benchmarks/bench_ort_cuda.py ENGINE.onnx... --batches 1 8 32 \
        --options '{}' '{"prefer_nhwc": "1"}' '{"use_tf32": "1"}'
Each engine x option set x batch is timed as the onnxruntime backend's bench does (inputs
and outputs bound on the device, engineforge.gpubench, with and without ORT's CUDA graphs);
the options go on top of the backend's own (engine_cuda_options). One JSON line per row, then a
table. A dynamic leading dim takes the batch; other dynamic dims are not supported here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))


def shapes_of(sess, batch: int) -> dict[str, list[int]]:
    return {i.name: [batch if k == 0 and not isinstance(d, int) else d
                     for k, d in enumerate(i.shape)] for i in sess.get_inputs()}


def main() -> int:
    from engineforge.backends import onnxruntime as ortb

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("engines", nargs="+")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--options", nargs="+", default=["{}"], help="JSON provider options")
    ap.add_argument("--warmup", type=int, default=10)
    args = ap.parse_args()
    rows = []
    for engine in args.engines:
        for opts in map(json.loads, args.options):
            sess = ortb.session(engine, use=[ortb.CUDA, "CPUExecutionProvider"],
                                cuda_options=opts)
            ran = sess.get_providers()[0]
            for batch in args.batches:
                row = {"engine": engine, "options": opts, "batch": batch, "provider": ran}
                try:
                    feed = ortb.feed_for(sess, shapes_of(sess, batch))
                    stats, facts = ortb.bench_cuda(sess, Path(engine), feed,
                                                   {"warmup": args.warmup,
                                                    "cuda_graphs": "auto"}, batch, opts)
                    other = facts.get("with_cuda_graphs") or facts.get("without_cuda_graphs")
                    row |= {"p50_ms": stats["p50_ms"], "cv": stats["cv"],
                            "cuda_graphs": facts["cuda_graphs"],
                            "other_p50_ms": other["p50_ms"] if other else None,
                            "graph_error": facts.get("cuda_graphs_error")}
                except Exception as err:  # noqa: BLE001 - one failed row never hides the rest
                    row["error"] = f"{type(err).__name__}: {err}"[:300]
                print(json.dumps(row), flush=True)
                rows.append(row)
    print("\n| engine | options | batch | p50 ms | CUDA graphs (other p50) | CV % |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        name = "/".join(Path(r["engine"]).parts[-6:-1])
        if "error" in r:
            print(f"| {name} | {json.dumps(r['options'])} | {r['batch']} | failed: "
                  f"{r['error'][:80]} | | |")
            continue
        other = f"{r['other_p50_ms']:.3f}" if r["other_p50_ms"] else "—"
        print(f"| {name} | {json.dumps(r['options'])} | {r['batch']} | {r['p50_ms']:.3f} | "
              f"{'on' if r['cuda_graphs'] else 'off'} ({other}) | {100 * r['cv']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
