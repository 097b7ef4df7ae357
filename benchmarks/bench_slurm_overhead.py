"""Per-job cost of Snakemake's Slurm path vs local execution (issue 18, "Figures").

A trivial Snakefile (written under a temp dir) of K independent jobs, each ``sleep 0`` plus a
time stamp (``date +%s.%N``: when the rule's shell started inside the job), is run

  local  ``snakemake --cores 2``
  slurm  ``snakemake --executor slurm --jobs 8 --slurm-init-seconds-before-status-checks 2
         --seconds-between-status-checks 2 --default-resources slurm_partition=cpu
         mem_mb=1000 runtime=5 cpus_per_task=1``

in a fresh directory each time, for each K and ``--repeats`` times (local and slurm
alternate, so drifting load hits both). Per Slurm run, from ``sacct`` (1-second
resolution): submit -> start (queue wait) and start -> end (the job: srun + Snakemake's
jobstep process + the rule) per job, median and p95; and start -> the rule's shell (the
Snakemake start inside the job, the stamp against sacct's whole-second start).
Per-job overhead = (slurm wall - local wall) / K.

Also measured (each ``--repeats`` x ``--micro`` times, medians): one ``sbatch --hold``
submission (cancelled at once: the scheduler's per-job submit cost), one ``sacct`` status
query of the kind the plugin runs each round, ``python -c "import torch, onnxruntime"`` in
a fresh process (what every engineforge Slurm job pays on top of Snakemake's start; "cold"
= a new process, the page cache is not dropped on a shared machine), and optionally
(``--engineforge-dry-run DIR``) ``snakemake -n`` of the engineforge workflow in DIR (the
Snakefile parse + DAG every engineforge Slurm job repeats).

The node is shared with other users' jobs: queue waits include theirs. Load (``uptime``) is
recorded before and after every run.

Usage: .venv/bin/python benchmarks/bench_slurm_overhead.py --k 8 32 --repeats 3
Writes JSON to --out (default /tmp/engineforge-bench/slurm_overhead.json).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from benchstats import med, pct

SNAKEFILE = """\
K = {k}

localrules: all

rule all:
    input: expand("out/{i}.txt", i=range(K))

rule job:
    output: "out/{i}.txt"
    shell: "sleep 0; echo $(date +%s.%N) ${{SLURM_JOB_ID:-local}} > {output}"
"""

# On PATH before the real sbatch in the Slurm runs: logs when each call starts and ends, so
# the scheduler's per-job submission cost (gap between back-to-back submissions) is seen.
SHIM = """#!/bin/sh
s=$(date +%s.%N)
"{real}" "$@"
rc=$?
echo "$s $(date +%s.%N)" >> "{log}"
exit $rc
"""

SLURM_ARGS = ["--executor", "slurm", "--jobs", "{jobs}",
              "--slurm-init-seconds-before-status-checks", "2",
              "--seconds-between-status-checks", "2",
              "--default-resources", "slurm_partition=cpu", "mem_mb=1000", "runtime=5",
              "cpus_per_task=1"]
JOBS = 8


def load() -> str:
    a, b, c = os.getloadavg()
    return f"{a:.2f} {b:.2f} {c:.2f}"




def snakemake_bin() -> str:
    return str(Path(sys.executable).with_name("snakemake"))


def env() -> dict:
    e = dict(os.environ)
    # no workflow profile of the repository applies in the temp dir; keep it that way
    e.pop("SNAKEMAKE_PROFILE", None)
    return e


def run_workflow(mode: str, k: int, base: Path, tag: str, extra: list[str]) -> dict:
    d = base / f"{mode}-k{k}-{tag}"
    d.mkdir(parents=True)
    (d / "Snakefile").write_text(SNAKEFILE.replace("{k}", str(k), 1))
    cmd = [snakemake_bin(), "-s", "Snakefile"]
    cmd += ["--cores", "2"] if mode == "local" else [
        a.replace("{jobs}", str(JOBS)) for a in SLURM_ARGS] + extra
    e = env()
    if mode != "local":
        shim = d / "shim"
        shim.mkdir()
        (shim / "sbatch").write_text(SHIM.format(real=shutil.which("sbatch"),
                                                 log=d / "sbatch.log"))
        (shim / "sbatch").chmod(0o755)
        e["PATH"] = f"{shim}:{e['PATH']}"
    lb = load()
    t0 = time.time()
    p = subprocess.run(cmd, cwd=d, capture_output=True, text=True, env=e)
    wall = time.time() - t0
    row = {"mode": mode, "k": k, "wall_s": wall, "rc": p.returncode, "load_before": lb,
           "load_after": load(), "t0": t0}
    log = p.stdout + p.stderr
    if p.returncode:
        row["error"] = log[-2000:]
        return row
    # when each rule's shell ran, by Slurm job id (inside a job SLURM_JOB_ID is set)
    stamps = {}
    for f in (d / "out").glob("*.txt"):
        t, jid = f.read_text().split()[:2]
        stamps[jid] = float(t)
    row["jobs_done"] = len(stamps)
    if mode != "local":
        m = re.search(r"SLURM run ID: (\S+)", log)
        ids = re.findall(r"submitted with SLURM jobid (\d+)", log)
        row["run_uuid"] = m.group(1) if m else None
        row["slurm_jobids"] = ids
        row |= sacct_stats(ids, stamps, d)
        row |= submit_stats(d / "sbatch.log", t0)
    shutil.rmtree(d, ignore_errors=True)
    return row


def ts(s: str) -> float | None:
    try:
        return datetime.strptime(s, "%Y-%m-%dT%H:%M:%S").timestamp()
    except ValueError:
        return None


def sacct_stats(ids: list[str], stamps: dict[str, float], d: Path) -> dict:
    """submit->start, start->end per job (sacct, whole seconds) and start->shell."""
    if not ids:
        return {}
    for _ in range(10):  # slurmdbd may lag the controller by a moment
        out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", ",".join(ids), "--format",
                              "JobID,Submit,Start,End,State"],
                             capture_output=True, text=True).stdout
        rows = [r.split("|") for r in out.strip().splitlines() if r]
        if len(rows) >= len(ids) and all(ts(r[3]) for r in rows):
            break
        time.sleep(1)
    q, run, shell, states = [], [], [], {}
    for jid, sub, start, end, state in (r[:5] for r in rows):
        states[state] = states.get(state, 0) + 1
        s, b, e = ts(sub), ts(start), ts(end)
        if s and b:
            q.append(b - s)
        if b and e:
            run.append(e - b)
        if b and jid in stamps:
            shell.append(stamps[jid] - b)
    subs = sorted(ts(r[1]) for r in rows if ts(r[1]))
    return {"sacct_jobs": len(rows), "states": states,
            "submit_to_start_p50": pct(q, .5), "submit_to_start_p95": pct(q, .95),
            "start_to_end_p50": pct(run, .5), "start_to_end_p95": pct(run, .95),
            "start_to_shell_p50": pct(shell, .5), "start_to_shell_p95": pct(shell, .95),
            "start_to_shell_n": len(shell),
            "submit_span_s": (subs[-1] - subs[0]) if subs else None}


def submit_stats(log: Path, t0: float) -> dict:
    """sbatch calls as the plugin makes them: each call's duration, and the gap between the
    starts of consecutive calls within a burst (< 2 s apart): the per-job submission cost."""
    if not log.is_file():
        return {}
    calls = sorted(tuple(map(float, line.split())) for line in log.read_text().splitlines()
                   if line.strip())
    dur = [e - s for s, e in calls]
    gaps = [b[0] - a[0] for a, b in zip(calls, calls[1:]) if b[0] - a[0] < 2]
    return {"sbatch_calls": len(calls), "sbatch_call_p50": pct(dur, .5),
            "sbatch_call_p95": pct(dur, .95), "submit_gap_p50": pct(gaps, .5),
            "submit_gap_p95": pct(gaps, .95), "submit_gaps_n": len(gaps),
            "first_submit_after_s": calls[0][0] - t0 if calls else None}


def timed(cmd: list[str], **kw) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    return time.perf_counter() - t0, p


def micro(n: int, dry_run_dir: str | None) -> dict:
    out = {"load_before": load()}
    # one sbatch submission (held, then cancelled: nothing runs)
    sb = []
    for _ in range(n):
        dt, p = timed(["sbatch", "--parsable", "--hold", "-p", "cpu", "--mem", "100", "-t", "1",
                       "-J", "ef-bench-submit", "--wrap", "true"])
        if p.returncode == 0:
            sb.append(dt)
            subprocess.run(["scancel", p.stdout.strip().split(";")[0]], capture_output=True)
    out["sbatch_s"] = sb
    # the plugin's status query (job_status_query.query_job_status_sacct: by run name, 2 days)
    sa = []
    since = datetime.fromtimestamp(time.time() - 2 * 86400).strftime("%Y-%m-%dT%H:00")
    for _ in range(n):
        dt, p = timed(["sacct", "-X", "--parsable2", "--clusters", "all", "--noheader",
                       "--format=JobIdRaw,State", "--starttime", since, "--endtime", "now",
                       "--name", "ef-bench-submit"])
        sa.append(dt)
    out["sacct_s"] = sa
    py = []
    for _ in range(n):
        dt, p = timed([sys.executable, "-c", "import torch, onnxruntime"])
        if p.returncode == 0:
            py.append(dt)
        else:
            out["import_error"] = p.stderr[-500:]
    out["import_torch_ort_s"] = py
    dt, p = timed([sys.executable, "-c", "import snakemake.cli"])
    out["import_snakemake_cli_s"] = [dt]
    if dry_run_dir:
        dr = []
        for _ in range(n):
            dt, p = timed([snakemake_bin(), "-n", "--quiet", "rules", "--cores", "2"],
                          cwd=dry_run_dir, env={**env(), "MLFLOW_TRACKING_URI":
                                                f"sqlite:///{dry_run_dir}/mlflow.db"})
            if p.returncode == 0:
                dr.append(dt)
                m = re.search(r"total\s+(\d+)", p.stdout)
                out["engineforge_dry_run_jobs"] = int(m.group(1)) if m else None
            else:
                out["dry_run_error"] = (p.stdout + p.stderr)[-800:]
        out["engineforge_dry_run_s"] = dr
    out["load_after"] = load()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", nargs="+", default=["local", "slurm"],
                    choices=["local", "slurm", "slurm-array"],
                    help="slurm-array: the slurm run with --slurm-array-jobs=all")
    ap.add_argument("--micro", type=int, default=5, help="repetitions of each micro timing")
    ap.add_argument("--engineforge-dry-run", metavar="DIR",
                    help="a copy of the repository to time `snakemake -n` in")
    ap.add_argument("--skip-micro", action="store_true")
    ap.add_argument("--jobs", type=int, default=8, help="snakemake --jobs of the Slurm runs")
    ap.add_argument("--out", default="/tmp/engineforge-bench/slurm_overhead.json")
    args = ap.parse_args()

    global JOBS
    JOBS = args.jobs
    base = Path(tempfile.mkdtemp(prefix="ef-slurm-bench-"))
    meta = {"started": time.strftime("%F %T"), "cpus": os.cpu_count(), "load_start": load(),
            "slurm_args": [a.replace("{jobs}", str(JOBS)) for a in SLURM_ARGS],
            "args": vars(args)}
    try:
        v = subprocess.run(["sinfo", "-V"], capture_output=True, text=True).stdout.strip()
        meta["slurm"] = v
    except OSError:
        pass
    rows, micros = [], []
    try:
        for rep in range(args.repeats):
            for k in args.k:
                for mode in args.modes:
                    extra = ["--slurm-array-jobs=all"] if mode == "slurm-array" else []
                    mode_dir = "slurm" if mode.startswith("slurm") else mode
                    row = run_workflow(mode_dir, k, base, f"{mode}-r{rep}", extra)
                    row["mode"] = mode
                    row["rep"] = rep
                    rows.append(row)
                    extra_s = ""
                    if "submit_to_start_p50" in row:
                        extra_s = (f", submit->start p50 {row['submit_to_start_p50']:.0f} s, "
                                   f"start->end p50 {row['start_to_end_p50']:.0f} s")
                    print(f"rep {rep} K={k} {mode}: {row['wall_s']:.1f} s rc {row['rc']}"
                          f"{extra_s}, load {row['load_before']} -> {row['load_after']}",
                          flush=True)
                    if row["rc"]:
                        print(row.get("error", "")[-1500:], flush=True)
            if not args.skip_micro:
                m = micro(args.micro, args.engineforge_dry_run)
                micros.append(m)
                print(f"rep {rep} micro: sbatch {med(m['sbatch_s'])}, sacct "
                      f"{med(m['sacct_s'])}, import torch+ort {med(m['import_torch_ort_s'])}",
                      flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    summary = []
    for k in args.k:
        loc = [r for r in rows if r["k"] == k and r["mode"] == "local" and not r["rc"]]
        for mode in [m for m in args.modes if m != "local"]:
            sl = [r for r in rows if r["k"] == k and r["mode"] == mode and not r["rc"]]
            lw, sw = med([r["wall_s"] for r in loc]), med([r["wall_s"] for r in sl])
            s = {"k": k, "mode": mode, "local_wall_s": lw, "slurm_wall_s": sw,
                 "local_runs": [round(r["wall_s"], 2) for r in loc],
                 "slurm_runs": [round(r["wall_s"], 2) for r in sl],
                 "per_job_overhead_s": (sw - lw) / k if lw is not None and sw is not None
                 else None, "failed_runs": sum(1 for r in rows if r["k"] == k and r["rc"])}
            for key in ("submit_to_start_p50", "submit_to_start_p95", "start_to_end_p50",
                        "start_to_end_p95", "start_to_shell_p50", "start_to_shell_p95",
                        "submit_span_s", "sbatch_call_p50", "submit_gap_p50",
                        "first_submit_after_s"):
                s[key] = med([r.get(key) for r in sl])
            s["load"] = "; ".join(f"{r['load_before'].split()[0]}→{r['load_after'].split()[0]}"
                                  for r in sl)
            summary.append(s)
    msum = {}
    if micros:
        for key in ("sbatch_s", "sacct_s", "import_torch_ort_s", "import_snakemake_cli_s",
                    "engineforge_dry_run_s"):
            allv = [x for m in micros for x in m.get(key, [])]
            if allv:
                msum[key] = {"median": med(allv), "p95": pct(allv, .95), "n": len(allv),
                             "first": micros[0].get(key, [None])[0]}
        msum["engineforge_dry_run_jobs"] = micros[0].get("engineforge_dry_run_jobs")
    meta |= {"finished": time.strftime("%F %T"), "load_end": load()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "summary": summary, "micro": msum,
                               "micro_runs": micros, "rows": rows}, indent=1))

    def f(v, fmt="{:.1f}"):
        return "–" if v is None else fmt.format(v)

    print(f"\nSlurm vs local, K independent `sleep 0` jobs; medians of {args.repeats}")
    print("| K | mode | local wall s | Slurm wall s | per-job overhead s | submit→start p50 / p95 s"
          " | start→end p50 / p95 s | start→rule shell p50 s | sbatch call / submit gap p50 ms"
          " | load (1-min) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for s in summary:
        print(f"| {s['k']} | {s['mode']} | {f(s['local_wall_s'])} | {f(s['slurm_wall_s'])} | "
              f"{f(s['per_job_overhead_s'], '{:.2f}')} | {f(s['submit_to_start_p50'], '{:.0f}')}"
              f" / {f(s['submit_to_start_p95'], '{:.0f}')} | "
              f"{f(s['start_to_end_p50'], '{:.0f}')} / {f(s['start_to_end_p95'], '{:.0f}')} | "
              f"{f(s['start_to_shell_p50'])} | "
              f"{f(s['sbatch_call_p50'] and s['sbatch_call_p50'] * 1000, '{:.0f}')} / "
              f"{f(s['submit_gap_p50'] and s['submit_gap_p50'] * 1000, '{:.0f}')} | "
              f"{s['load']} |")
    if msum:
        print("\n| micro | median s | p95 s | n | first |")
        print("|---|---|---|---|---|")
        for key, v in msum.items():
            if isinstance(v, dict):
                print(f"| {key} | {v['median']:.3f} | {v['p95']:.3f} | {v['n']} | "
                      f"{v['first']:.3f} |")
    print(f"\nJSON: {out}")


if __name__ == "__main__":
    main()
