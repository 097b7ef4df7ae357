"""Pipeline wall time, the way a user meets it (run on demand; figures go to docs/benchmarks.md).

1. resnet18: checkpoint -> ONNX -> simplify -> fp32 + fp16 + int8 variants -> audit ->
   ONNX Runtime build -> 30-run batch-1 latency (+ PyTorch baseline, MLflow tracking),
   cold, then an unchanged rerun (Snakemake decides "nothing to do"), then one int8 setting
   changed (calib_size). Repeated --runs times; medians are reported.
2. A zoo of >= 40 variants (the demo zoo x 4 precisions x 2 backends + extra resnet18
   profiles): the no-op decision time, and a one-precision change (resnet18 int8
   calibration size): jobs planned and wall time vs the full build.

Usage: .venv/bin/python benchmarks/bench_pipeline.py [--skip-zoo] [--runs N] [--repo DIR]
(--repo: another checkout, e.g. a `git worktree` of an older commit, for before/after.)
Writes benchmarks/results/pipeline[-<label>].json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
REPO = ROOT  # the checkout whose Snakefile runs (--repo)
KEEP = False  # --keep: leave each measured workspace on disk
SNAKEMAKE = Path(sys.executable).with_name("snakemake")


def workspace(raw: dict) -> Path:
    ws = Path(tempfile.mkdtemp(prefix="ef-bench-"))
    shutil.copytree(ROOT / "models", ws / "models", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "calib", ws / "calib")
    (ws / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return ws


def smk(ws: Path, *args: str) -> tuple[float, str]:
    cmd = [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "--directory", str(ws),
           "--cores", "2", *args]
    old_profile = REPO / "workflow/profiles/default"
    if old_profile.is_dir():  # checkouts from before profiles/default
        cmd[3:3] = ["--workflow-profile", str(old_profile)]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{ws}/mlflow.db"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ws)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"snakemake failed in {ws} (kept):\n{proc.stderr[-3000:]}")
    return wall, proc.stdout + proc.stderr


def done_with(ws: Path) -> dict:
    """Deletes a measured workspace (hundreds of MiB) unless --keep: {"workspace": kept path}."""
    if KEEP:
        return {"workspace": str(ws)}
    shutil.rmtree(ws)
    return {}


def jobs_run(log: str) -> int:
    return log.count("Finished jobid")


def stage_times(ws: Path, model: str) -> dict:
    out = {}
    for side in sorted((ws / "artifacts" / model).rglob("*.json")):
        data = json.loads(side.read_text())
        if isinstance(data, dict) and "stage" in data:
            r = data["result"]
            t = r.get("time_s", r.get("build_time_s"))
            if t is not None:
                out[str(side.relative_to(ws / "artifacts" / model))] = t
    return out


def resnet_case() -> dict:
    raw = yaml.safe_load((ROOT / "config.yaml").read_text())
    m = raw["models"]["resnet18"]
    # The peers' task: fp32/fp16/int8 variants and one 30-run latency evaluation (batch 1).
    m.update(precisions=["fp32", "fp16", "int8"], backends=["onnxruntime"])
    m["profiles"] = {"bs1": {"image": {"min": [1, 3, 224, 224], "opt": [1, 3, 224, 224],
                                       "max": [1, 3, 224, 224]}}}
    raw["models"] = {"resnet18": m}
    raw["defaults"]["bench"] = {"warmup": 3, "iterations": 30, "threads": 2, "points": ["opt"]}
    ws = workspace(raw)
    cold, log = smk(ws)
    rerun, log2 = smk(ws)
    assert "Nothing to be done" in log2
    m["precision"]["int8"]["calib_size"] = 8
    (ws / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    change, log3 = smk(ws)
    return {"cold_s": round(cold, 2), "jobs": jobs_run(log), "noop_rerun_s": round(rerun, 2),
            "int8_change_s": round(change, 2), "int8_change_jobs": jobs_run(log3),
            "stage_times_s": stage_times(ws, "resnet18"), **done_with(ws)}


def zoo_case() -> dict:
    raw = yaml.safe_load((ROOT / "config.yaml").read_text())
    raw["defaults"]["backends"] = ["onnxruntime", "tensorrt-rtx"]
    raw["defaults"]["bench"] = {"warmup": 2, "iterations": 10, "threads": 2}
    raw["models"]["resnet18"]["profiles"]["bs1"] = {
        "image": {"min": [1, 3, 224, 224], "opt": [1, 3, 224, 224], "max": [1, 3, 224, 224]}}
    ws = workspace(raw)
    full, log = smk(ws)
    variants = len(list((ws / "artifacts").glob("*/build/*/*/*/build.json")))
    noop = [smk(ws, "--dry-run")[0] for _ in range(3)]
    raw["models"]["resnet18"]["precision"]["int8"]["calib_size"] = 8
    (ws / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    change, log3 = smk(ws)
    return {"engines_and_ort_builds": variants, "full_build_s": round(full, 2),
            "full_jobs": jobs_run(log), "noop_decision_s": [round(t, 2) for t in noop],
            "int8_change_s": round(change, 2), "int8_change_jobs": jobs_run(log3),
            **done_with(ws)}


def median(values):
    return sorted(values)[len(values) // 2]


def main() -> None:
    global REPO, KEEP
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-zoo", action="store_true")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--repo", type=Path, default=ROOT)
    ap.add_argument("--label", default="")
    ap.add_argument("--keep", action="store_true", help="keep the workspaces (printed)")
    args = ap.parse_args()
    REPO, KEEP = args.repo.resolve(), args.keep
    runs = [resnet_case() for _ in range(args.runs)]
    results = {"repo": str(REPO), "resnet18_fp32_fp16_int8": {
        "runs": runs, **{f"median_{k}": median([r[k] for r in runs])
                         for k in ("cold_s", "noop_rerun_s", "int8_change_s")}}}
    print(json.dumps(results, indent=1))
    if not args.skip_zoo:
        results["zoo"] = zoo_case()
    out = ROOT / f"benchmarks/results/pipeline{'-' + args.label if args.label else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
