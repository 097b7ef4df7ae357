"""The demo zoo (config.yaml) as Slurm jobs vs locally: wall time, job count, per-job cost,
and whether both give the same fingerprints and the same ONNX / ORT bytes.

Needs the team stack (`make stack-up`). Each run works in a fresh copy of the demo zoo's
inputs under a temporary directory (deleted unless --keep), with its own MLflow experiment
on the stack's server and the build cache off (cold builds both times).

    .venv/bin/python benchmarks/bench_slurm_zoo.py [--runs 1] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")


def stack_env() -> dict:
    path = Path(os.environ.get("ENGINEFORGE_STACK_DIR", "/tmp/engineforge-stack")) / "stack.env"
    out = subprocess.run(["bash", "-c", f"set -a; . {shlex.quote(str(path))}; env -0"],
                         capture_output=True, check=True).stdout.decode()
    return dict(kv.split("=", 1) for kv in out.split("\0") if "=" in kv)


def workspace(root: Path) -> Path:
    """The demo zoo's inputs (config, models, calibration data) in a directory of its own."""
    root.mkdir(parents=True)
    for name in ("config.yaml", "models", "calib"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, root / name)
    return root


def run(ws: Path, env: dict, *args: str) -> tuple[float, str]:
    cmd = [str(SNAKEMAKE), "-s", str(ROOT / "Snakefile"), "--directory", str(ws),
           "--cores", "2", "--config", f"experiment=bench-slurm-{uuid.uuid4().hex[:8]}", *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ws, env={**os.environ, **env}, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"snakemake failed in {ws}:\n{proc.stderr[-3000:]}")
    return wall, proc.stdout + proc.stderr


def fingerprints(ws: Path) -> dict:
    out = {}
    for side in (ws / "artifacts").rglob("*.json"):
        try:
            data = json.loads(side.read_text())
        except ValueError:
            continue
        if isinstance(data, dict) and data.get("stage") in (
                "export", "simplify", "precision", "ort_quantize", "build"):
            rel = side.relative_to(ws / "artifacts").as_posix()
            comparable = "/build/tensorrt-rtx/" not in f"/{rel}"
            out[rel] = (data["fingerprint"], {k: v["sha256"] for k, v in data["outputs"].items()
                                              if k != "program"} if comparable else None)
    return out


def slurm_jobs(ws: Path) -> list[dict]:
    return [data["ran"] for side in (ws / "artifacts").rglob("*.json")
            if isinstance(data := _load(side), dict) and (data.get("ran") or {}).get(
                "slurm_job_id")]


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="keep the workspaces")
    args = ap.parse_args()
    stack = stack_env()
    env = {"MLFLOW_TRACKING_URI": stack["MLFLOW_TRACKING_URI"], "ENGINEFORGE_CACHE": "0"}
    rows = []
    for i in range(args.runs):
        tmp = Path(tempfile.mkdtemp(prefix="bench-slurm-zoo-"))
        try:
            local, cluster = workspace(tmp / "local"), workspace(tmp / "slurm")
            t_local, _ = run(local, env)
            t_slurm, log = run(cluster, env, "--workflow-profile",
                               str(ROOT / "profiles" / "slurm"))
            jobs = slurm_jobs(cluster)
            same = fingerprints(local) == fingerprints(cluster)
            spans = sorted(j["finished_at"] - j["started_at"] for j in jobs)
            rows.append({"run": i, "local_s": round(t_local, 1), "slurm_s": round(t_slurm, 1),
                         "slurm_jobs": len(jobs),
                         "local_jobs": log.count("localrule "),
                         "per_job_overhead_s": round((t_slurm - t_local) / max(len(jobs), 1), 2),
                         "job_work_median_s": round(spans[len(spans) // 2], 2) if spans else None,
                         "same_fingerprints_and_bytes": same,
                         "stages_compared": len(fingerprints(local)),
                         "load": os.getloadavg()[0]})
            print(json.dumps(rows[-1]), flush=True)
        finally:
            if not args.keep:
                shutil.rmtree(tmp, ignore_errors=True)
    print("| run | local (s) | Slurm (s) | Slurm jobs | overhead per job (s) | same bytes |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['local_s']} | {r['slurm_s']} | {r['slurm_jobs']} | "
              f"{r['per_job_overhead_s']} | {r['same_fingerprints_and_bytes']} |")


if __name__ == "__main__":
    main()
