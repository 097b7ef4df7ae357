"""Discrete-event simulation of a model zoo through the Slurm profile (issue 18, "Figures").

What is simulated (one Snakemake scheduler, as ``profiles/slurm`` runs it):

* the zoo: ``--models`` models, each with the demo zoo's jobs per model (``snakemake -n``
  on config.yaml: 241 jobs for 5 models; per stage below) and their dependencies
  (export -> simplify -> precision -> build -> audit/bench -> drift -> report -> track);
* the scheduler: one Snakemake process, a serial server. Each submission costs
  ``--submit-s`` (the plugin's per-job work + ``sbatch``), each finished job
  ``--finish-s`` of bookkeeping, each status round ``--poll-s`` (one ``sacct``). At most
  ``--jobs`` cluster jobs in flight (the profile's 64). Status rounds come every
  ``--status-interval-s`` (profile: 5 s); a round that sees nothing finish adds 10 s to the
  interval (up to 180 s) and one that does resets it -- the slurm plugin's own back-off;
* Slurm: a FIFO queue with first fit over ``--nodes`` nodes of ``--cores`` cores and
  ``--gpus`` GPUs; a job starts ``--dispatch-s`` after it fits, then holds its cores (and
  GPU) for ``--job-overhead-s`` (srun + Snakemake's jobstep, twice, + the engineforge
  Snakefile parse) + ``--import-s`` (torch + ONNX Runtime import, cold process) + its work;
* the submit host: the profile's localrules (drift, report, track, summary) run there on
  ``--local-cores``; ``track`` also holds one of ``--mlflow-writers`` tokens (the profile's
  ``resources: mlflow=1``). A track job takes ``--track-s`` alone; with w writers at once it
  takes max(track_s, w * requests / server req/s, w * MB / server MB/s), the MLflow server's
  capacity measured by bench_mlflow_load.py at saturation.

Work per stage comes from docs/benchmarks.md (``--scenario cpu``: the 2-core CPU figures of
sections 1, 2 and "Other measured figures"; ``--scenario h100``: the H100 workflow runs of
sessions 3/4 for builds and benches, CPU figures for the CPU stages). Each value is on the
command line (``--work stage=seconds``); ``--list`` prints the table with its source.

Output per node count: makespan, node core and GPU utilisation (work only, and work +
per-job overhead), the scheduler's and the MLflow writer's busy share, and the lower
bounds whose largest says what dominates: compute (work+overhead core-s / cores), GPU,
scheduler (serial per-job cost x jobs), tracking (models x track time / writers), and one
model's critical path.

Usage: .venv/bin/python benchmarks/simulate_scaleout.py [--nodes 1 8 64] [--scenario h100]
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import sys
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path

# ---------------------------------------------------------------------------------------
# Jobs per model: the demo zoo's dry run (`snakemake -n`, config.yaml, 5 models, 241 jobs):
# export 5, profile_check 6, simplify 5, ort_quantize 6, precision 20, build_onnxruntime 27,
# build_tensorrt_rtx 27, audit 46, bench 54, bench_pytorch 6, localise 18, repair 3,
# drift_matrix 5, report_model 5, track 5, + report_html, summary, all.
# Rounded to whole jobs per model (48 per model).
JOBS_PER_MODEL = {
    "export": 1, "profile_check": 1, "simplify": 1, "ort_quantize": 1, "precision": 4,
    "build": 11, "audit": 9, "bench": 11, "bench_pytorch": 1, "localise": 4, "repair": 1,
    "drift": 1, "report_model": 1, "track": 1,
}
LOCAL = {"drift", "report_model", "track"}  # Snakefile `localrules` (+ summary at the end)

# (seconds of work per job, cores, gpus, source)
SCENARIOS = {
    "cpu": {
        "export": (5.5, 1, 0, "benchmarks.md §1: export (dynamo) 5.5 s, resnet18"),
        "profile_check": (0.5, 1, 0, "assumed: one ORT session per profile shape"),
        "simplify": (1.3, 1, 0, "benchmarks.md §1: onnxsim 1.3 s"),
        "ort_quantize": (1.5, 1, 0, "benchmarks.md §0c: ~1.5 s for the 5 new jobs (upper)"),
        "precision": (3.3, 1, 0, "benchmarks.md §1/§0: fp16 1.9 s, int8 4.1 s, fp32 ~0, "
                                 "+1.3 s ModelOpt import per job (mean of 4)"),
        "build": (0.5, 1, 0, "benchmarks.md 'Other': TensorRT-RTX CPU builds 0.1-0.6 s"),
        "audit": (0.5, 1, 0, "benchmarks.md §2: ~2 s for 4 builds + 2 audits"),
        "bench": (1.25, 2, 0, "benchmarks.md §2: ~5 s for 4 benches (10 iterations), 2 threads"),
        "bench_pytorch": (4.0, 2, 0, "benchmarks.md §1: torch import + eager baseline ~4 s"),
        "localise": (1.0, 1, 0, "assumed (passing variants: one ORT run)"),
        "repair": (5.0, 1, 0, "assumed (a ModelOpt round + re-audit)"),
        "drift": (0.2, 1, 0, "assumed (JSON merge)"),
        "report_model": (0.9, 1, 0, "report.md: figures 0.58 s + page 0.33 s"),
        "track": (None, 1, 0, "bench_mlflow_load.py N=1: seconds per record"),
    },
    "h100": {
        "export": (5.5, 1, 0, "benchmarks.md §1 (CPU)"),
        "profile_check": (0.5, 1, 0, "assumed"),
        "simplify": (1.3, 1, 0, "benchmarks.md §1 (CPU)"),
        "ort_quantize": (1.5, 1, 0, "benchmarks.md §0c (CPU)"),
        "precision": (3.3, 1, 0, "benchmarks.md §1/§0 (CPU)"),
        "build": (95.0, 1, 0, "benchmarks.md session 4: AOTInductor builds median 95 s "
                              "(12-164 s), 16 in parallel on 16 cores"),
        "audit": (10.0, 2, 1, "assumed: GPU audit of 32 samples (not timed in the docs)"),
        "bench": (44.0, 32, 1, "benchmarks.md issue 10: bench jobs 41-47 s (resnet50, "
                               "mobilenet); claim every core + the GPU"),
        "bench_pytorch": (20.0, 32, 1, "assumed: eager baseline at 3 batch points (claims "
                                       "the node like a bench)"),
        "localise": (1.0, 1, 0, "assumed"),
        "repair": (5.0, 1, 0, "assumed"),
        "drift": (0.2, 1, 0, "assumed"),
        "report_model": (0.9, 1, 0, "report.md: 0.58 + 0.33 s"),
        "track": (None, 1, 0, "bench_mlflow_load.py N=1"),
    },
}

# Measured defaults (this machine, see docs/benchmarks-team.md); filled from the JSON of the
# two benchmarks when --mlflow-json / --slurm-json are given.
MEASURED = {
    # bench_mlflow_load.py (medians of 3; team stack on the shared 2-core box)
    "track_s": 6.0,            # N=1: seconds per record (parent + 12 children)
    "track_requests": 156,     # HTTP requests per record
    "record_mb": 37.8,         # artifact MB per record
    "server_rps": 41.8,        # requests/s at N=32 (saturated; 39.4 at N=8)
    "server_mbps": 10.0,       # artifact MB/s at N=32 (the same records: 0.27 records/s)
    # bench_slurm_overhead.py (medians of 3)
    "submit_s": 0.014,         # gap between back-to-back sbatch calls of the plugin
    "poll_s": 0.10,            # one sacct status query
    "finish_s": 0.03,          # per job, Snakemake's own cost: local (K=32 - K=8) / 24
    "dispatch_s": 1.0,         # submit -> start with free cores: 0-1 s (sacct, whole s)
    "job_overhead_s": 9.0,     # start -> end of a `sleep 0` job (srun + 2 Snakemake starts)
    "import_s": 3.7,           # python -c "import torch, onnxruntime", fresh process
    # engineforge Snakefile parse beyond a trivial one's, x2 (a job starts Snakemake twice):
    # `snakemake --list-rules` 500-model config 5.5-6.5 s vs trivial 2.6-3.1 s
    "parse_extra_s": 6.0,
    "startup_s": 176.0,        # `snakemake -n` of the 500-model zoo (23,803 jobs): the DAG
}


@dataclass
class Job:
    jid: int
    model: int
    stage: str
    work: float
    cores: int
    gpus: int
    local: bool
    deps: int = 0
    children: list = field(default_factory=list)
    submitted: float = math.nan
    started: float = math.nan
    ended: float = math.nan
    noticed: float = math.nan
    node: int = -1


def build_dag(n_models: int, work: dict, jobs_per_model: dict) -> list[Job]:
    jobs: list[Job] = []

    def add(m, stage, deps=()):
        w, c, g, _ = work[stage]
        j = Job(len(jobs), m, stage, w, c, g, stage in LOCAL)
        jobs.append(j)
        for d in deps:
            d.children.append(j)
            j.deps += 1
        return j

    tracks = []
    for m in range(n_models):
        n = jobs_per_model
        ex = add(m, "export")
        pcs = [add(m, "profile_check", [ex]) for _ in range(n["profile_check"])]
        bpt = [add(m, "bench_pytorch", [ex]) for _ in range(n["bench_pytorch"])]
        si = add(m, "simplify", [ex])
        oq = [add(m, "ort_quantize", [si]) for _ in range(n["ort_quantize"])]
        pr = [add(m, "precision", [si]) for _ in range(n["precision"])]
        variants = pr + oq
        bu = [add(m, "build", [variants[i % len(variants)], *pcs])
              for i in range(n["build"])]
        au = [add(m, "audit", [bu[i % len(bu)]]) for i in range(n["audit"])]
        be = [add(m, "bench", [bu[i % len(bu)], *bpt]) for i in range(n["bench"])]
        lo = [add(m, "localise", [au[i % len(au)]]) for i in range(n["localise"])]
        rp = [add(m, "repair", [lo[i % len(lo)]]) for i in range(n["repair"])]
        dr = add(m, "drift", au + lo + rp)
        re = add(m, "report_model", [dr, *be])
        tracks.append(add(m, "track", [re, *be, *au]))
    return jobs


def critical_path(jobs: list[Job], per_job: float) -> float:
    """Longest chain of (work + per-job overhead) through one model's DAG."""
    finish: dict[int, float] = {}
    preds = defaultdict(list)
    for j in jobs:
        for c in j.children:
            preds[c.jid].append(j)
    for j in jobs:  # topological order: a job is added after its dependencies
        start = max((finish[p.jid] for p in preds[j.jid]), default=0.0)
        finish[j.jid] = start + j.work + (0 if j.local else per_job)
    return max(finish.values())


class ReadyQueue:
    """Jobs whose dependencies are done, in the order Snakemake submits them: ``fifo``
    (as they became ready: breadth-first over the zoo) or ``model`` (lowest model first:
    models finish, and are tracked, one after another)."""

    def __init__(self, order: str):
        self.order, self.q, self.h = order, deque(), []

    def append(self, j: Job):
        if self.order == "fifo":
            self.q.append(j)
        else:
            heapq.heappush(self.h, (j.model, j.jid, j))

    def popleft(self) -> Job:
        return self.q.popleft() if self.order == "fifo" else heapq.heappop(self.h)[2]

    def __bool__(self):
        return bool(self.q or self.h)


def simulate(n_nodes: int, a, work: dict, jobs_per_model: dict) -> dict:
    jobs = build_dag(a.models, work, jobs_per_model)
    for j in jobs:
        j.cores = min(j.cores, a.cores)
        if j.gpus and a.gpus == 0:
            j.gpus = 0  # no GPU nodes: the stage runs on CPU cores (same work time)
    per_job = a.dispatch_s + a.job_overhead_s + a.import_s + a.parse_extra_s
    now = 0.0
    ev: list = []  # (time, seq, kind, payload)
    seq = 0

    def push(t, kind, payload=None):
        nonlocal seq
        seq += 1
        heapq.heappush(ev, (t, seq, kind, payload))

    free_cores = [a.cores] * n_nodes
    free_gpus = [a.gpus] * n_nodes
    slurm_queue: deque[Job] = deque()      # submitted, waiting for resources
    ready_cluster = ReadyQueue(a.order)    # deps done, not yet submitted
    ready_local: deque[Job] = deque()
    inflight = 0
    running_ended: list[Job] = []          # ended on the node, not yet seen by a poll
    local_free = a.local_cores
    mlflow_free = a.mlflow_writers
    writers = 0
    sched_free = 0.0                       # the scheduler (serial) is busy until
    sched_busy = 0.0
    interval = a.status_interval_s
    work_core_s = 0.0
    overhead_core_s = 0.0
    gpu_s = 0.0
    track_busy = 0.0
    done = 0
    n_cluster = sum(1 for j in jobs if not j.local)
    poll_scheduled = False

    for j in jobs:
        if j.deps == 0:
            (ready_local if j.local else ready_cluster).append(j)

    def sched(cost: float) -> float:
        """Run `cost` seconds of scheduler work as soon as it is free; returns the end."""
        nonlocal sched_free, sched_busy
        start = max(now, sched_free)
        sched_free = start + cost
        sched_busy += cost
        return sched_free

    def try_local():
        nonlocal local_free, mlflow_free, writers, track_busy
        keep = deque()
        while ready_local:
            j = ready_local.popleft()
            if local_free < 1 or (j.stage == "track" and mlflow_free < 1):
                keep.append(j)
                continue
            local_free -= 1
            if j.stage == "track":
                mlflow_free -= 1
                writers += 1
                w = writers
                dur = max(a.track_s, w * a.track_requests / a.server_rps,
                          w * a.record_mb / a.server_mbps)
                track_busy += dur
            else:
                dur = j.work
            j.started = now
            push(now + dur, "local_end", j)
        ready_local.extend(keep)

    def try_submit():
        nonlocal inflight
        while ready_cluster and inflight < a.jobs:
            j = ready_cluster.popleft()
            inflight += 1
            t = sched(a.submit_s)
            j.submitted = t
            push(t, "submitted", j)

    def try_start():
        """Slurm: FIFO with first fit (backfill: a job that fits may pass a waiting one)."""
        keep = deque()
        while slurm_queue:
            j = slurm_queue.popleft()
            placed = False
            for n in range(n_nodes):
                if free_cores[n] >= j.cores and free_gpus[n] >= j.gpus:
                    free_cores[n] -= j.cores
                    free_gpus[n] -= j.gpus
                    j.node = n
                    j.started = now + a.dispatch_s
                    push(j.started + a.job_overhead_s + a.import_s + a.parse_extra_s + j.work,
                         "node_end", j)
                    placed = True
                    break
            if not placed:
                keep.append(j)
        slurm_queue.extend(keep)

    def finish(j: Job):
        nonlocal done
        done += 1
        for c in j.children:
            c.deps -= 1
            if c.deps == 0:
                (ready_local if c.local else ready_cluster).append(c)

    def ensure_poll():
        nonlocal poll_scheduled
        if not poll_scheduled and inflight > 0:
            poll_scheduled = True
            push(max(now, sched_free) + interval, "poll")

    now = a.startup_s  # parse + DAG: nothing is submitted before
    sched_free = sched_busy = now
    try_local()
    try_submit()
    ensure_poll()
    while ev:
        now, _, kind, j = heapq.heappop(ev)
        if kind == "submitted":
            slurm_queue.append(j)
            try_start()
        elif kind == "node_end":
            free_cores[j.node] += j.cores
            free_gpus[j.node] += j.gpus
            j.ended = now
            work_core_s += j.work * j.cores
            overhead_core_s += (now - j.started - j.work) * j.cores
            gpu_s += (now - j.started) * j.gpus
            running_ended.append(j)
            try_start()
        elif kind == "poll":
            poll_scheduled = False
            t = sched(a.poll_s)
            seen = running_ended[:]
            running_ended.clear()
            if seen:
                interval = a.status_interval_s
                for j in seen:
                    j.noticed = sched(a.finish_s)
                    inflight -= 1
                    finish(j)
                try_local()
                try_submit()
            else:
                interval = min(interval + 10, 180)
            now = max(now, t)
            ensure_poll()
        elif kind == "local_end":
            local_free += 1
            if j.stage == "track":
                mlflow_free += 1
                writers -= 1
            j.ended = j.noticed = now
            finish(j)
            try_local()
            try_submit()
            ensure_poll()
    makespan = max(j.noticed for j in jobs)
    compute_done = max(j.noticed for j in jobs if not j.local)
    first_track = min(j.started for j in jobs if j.stage == "track")
    # the summary job (local, after every track) is negligible and left out
    assert done == len(jobs), (done, len(jobs))
    cores_total = n_nodes * a.cores
    model_jobs = [j for j in jobs if j.model == 0]
    cp = critical_path(model_jobs, per_job)
    cl = [j for j in jobs if not j.local]
    bounds = {
        "compute": sum((j.work + per_job - a.dispatch_s) * j.cores for j in cl) / cores_total,
        "gpu": (sum((j.work + per_job - a.dispatch_s) * j.gpus for j in cl)
                / (n_nodes * a.gpus)) if a.gpus else 0.0,
        "scheduler": a.startup_s + n_cluster * (a.submit_s + a.finish_s),
        # at most --jobs cluster jobs in flight, each holding its slot from submission to
        # the status round that sees it end (on average half an interval after the end)
        "jobs_cap": sum(j.work + per_job + a.submit_s + a.status_interval_s / 2 for j in cl)
        / a.jobs,
        # w writers: each record takes max(track_s, w*R/rps, w*MB/mbps), w at a time
        "tracking": a.models * max(a.track_s / a.mlflow_writers,
                                   a.track_requests / a.server_rps,
                                   a.record_mb / a.server_mbps),
        "local_host": sum(j.work for j in jobs if j.local and j.stage != "track")
        / a.local_cores,
        "critical_path": a.startup_s + cp,
    }
    dominant = max(bounds, key=bounds.get)
    return {
        "nodes": n_nodes, "jobs": len(jobs), "cluster_jobs": n_cluster,
        "makespan_s": makespan, "last_cluster_job_s": compute_done,
        "tail_s": makespan - compute_done, "first_track_s": first_track,
        "util_work": work_core_s / (cores_total * makespan),
        "util_with_overhead": (work_core_s + overhead_core_s) / (cores_total * makespan),
        "gpu_util": gpu_s / (n_nodes * a.gpus * makespan) if a.gpus else None,
        "scheduler_busy": sched_busy / makespan,
        "slot_util": sum(j.noticed - j.submitted for j in cl) / (a.jobs * makespan),
        "tracking_busy": track_busy / makespan / a.mlflow_writers,
        "bounds": bounds, "dominant": dominant,
        "overhead_share": overhead_core_s / max(work_core_s + overhead_core_s, 1e-9),
    }


def load_measured(a) -> None:
    """Fill the defaults from the benchmarks' JSON (medians), unless given explicitly."""
    if a.mlflow_json:
        d = json.loads(Path(a.mlflow_json).read_text())
        s = {r["clients"]: r for r in d["summary"]}
        one = s[min(s)]
        MEASURED["track_s"] = one["record_s_p50"]
        MEASURED["track_requests"] = one["requests"] / one["clients"] / d["meta"]["args"]["records"]
        MEASURED["record_mb"] = one["artifact_mb"] / one["clients"] / d["meta"]["args"]["records"]
        MEASURED["server_rps"] = max(r["requests_per_s"] for r in s.values())
        MEASURED["server_mbps"] = max(r["artifact_mb_per_s"] for r in s.values())
    if a.slurm_json:
        d = json.loads(Path(a.slurm_json).read_text())
        m = d.get("micro", {})
        sm = [r for r in d["summary"] if r["mode"] == "slurm"]
        if "sacct_s" in m:
            MEASURED["poll_s"] = m["sacct_s"]["median"]
        if "import_torch_ort_s" in m:
            MEASURED["import_s"] = m["import_torch_ort_s"]["median"]
        if sm:
            MEASURED["job_overhead_s"] = min(r["start_to_end_p50"] for r in sm)
        gaps = [r.get("submit_gap_p50") for r in sm if r.get("submit_gap_p50")]
        if gaps:
            MEASURED["submit_s"] = min(gaps)


def main() -> None:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--mlflow-json")
    pre.add_argument("--slurm-json")
    known, _ = pre.parse_known_args()
    load_measured(known)
    M = MEASURED
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], parents=[pre])
    ap.add_argument("--models", type=int, default=500)
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--cores", type=int, default=32, help="cores per node")
    ap.add_argument("--gpus", type=int, default=1, help="GPUs per node (0: none)")
    ap.add_argument("--scenario", choices=sorted(SCENARIOS), default="h100")
    ap.add_argument("--work", nargs="*", default=[], metavar="STAGE=S",
                    help="override a stage's work seconds")
    ap.add_argument("--jobs", type=int, default=64, help="cluster jobs in flight (profile)")
    ap.add_argument("--order", choices=["fifo", "model"], default="fifo",
                    help="submission order of ready jobs (see ReadyQueue)")
    ap.add_argument("--local-cores", type=int, default=2, help="submit host (profile)")
    ap.add_argument("--mlflow-writers", type=int, default=1,
                    help="track jobs at once (profile: resources mlflow=1)")
    ap.add_argument("--status-interval-s", type=float, default=5.0, help="profile: 5")
    ap.add_argument("--track-s", type=float, default=M["track_s"])
    ap.add_argument("--track-requests", type=float, default=M["track_requests"])
    ap.add_argument("--record-mb", type=float, default=M["record_mb"])
    ap.add_argument("--server-rps", type=float, default=M["server_rps"])
    ap.add_argument("--server-mbps", type=float, default=M["server_mbps"])
    ap.add_argument("--submit-s", type=float, default=M["submit_s"])
    ap.add_argument("--poll-s", type=float, default=M["poll_s"])
    ap.add_argument("--finish-s", type=float, default=M["finish_s"])
    ap.add_argument("--dispatch-s", type=float, default=M["dispatch_s"])
    ap.add_argument("--job-overhead-s", type=float, default=M["job_overhead_s"])
    ap.add_argument("--import-s", type=float, default=M["import_s"])
    ap.add_argument("--parse-extra-s", type=float, default=M["parse_extra_s"])
    ap.add_argument("--startup-s", type=float, default=M["startup_s"],
                    help="Snakemake start + DAG before the first submission (scales with the "
                         "zoo: 5.6 s for 5 models, 44 s for 100, 176 s for 500)")
    ap.add_argument("--list", action="store_true", help="print the work table and exit")
    ap.add_argument("--out", help="JSON results")
    a = ap.parse_args()

    work = {k: list(v) for k, v in SCENARIOS[a.scenario].items()}
    work["track"][0] = a.track_s
    for kv in a.work:
        k, v = kv.split("=")
        work[k][0] = float(v)
    work = {k: tuple(v) for k, v in work.items()}
    if a.list:
        print("| stage | jobs/model | work s | cores | GPU | source |\n|---|---|---|---|---|---|")
        for k, (w, c, g, src) in work.items():
            print(f"| {k} | {JOBS_PER_MODEL[k]} | {w:g} | {c} | {g} | {src} |")
        return
    params = {k: getattr(a, k) for k in ("models", "cores", "gpus", "scenario", "jobs", "order",
                                          "local_cores", "mlflow_writers", "status_interval_s",
                                          "track_s", "track_requests", "record_mb",
                                          "server_rps", "server_mbps", "submit_s", "poll_s",
                                          "finish_s", "dispatch_s", "job_overhead_s",
                                          "import_s", "parse_extra_s", "startup_s")}
    print("parameters: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                     for k, v in params.items()))
    rows = []
    for n in a.nodes:
        r = simulate(n, a, work, JOBS_PER_MODEL)
        rows.append(r)
    print(f"\n{a.models} models x {sum(JOBS_PER_MODEL.values())} jobs, {a.scenario} work times, "
          f"nodes of {a.cores} cores + {a.gpus} GPU")
    print("| nodes | makespan | last cluster job | tracking after it | core util (work / "
          "+overhead) | GPU util | `--jobs` slots busy | scheduler busy | MLflow writer busy | "
          "bounds s: compute / GPU / jobs cap / scheduler / tracking / submit host / critical "
          "path | largest bound |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        b = r["bounds"]
        gu = f"{r['gpu_util']:.0%}" if r["gpu_util"] is not None else "–"
        print(f"| {r['nodes']} | {hms(r['makespan_s'])} | {hms(r['last_cluster_job_s'])} | "
              f"{hms(r['tail_s'])} | {r['util_work']:.0%} / "
              f"{r['util_with_overhead']:.0%} | {gu} | {r['slot_util']:.0%} | "
              f"{r['scheduler_busy']:.0%} | "
              f"{r['tracking_busy']:.0%} | {b['compute']:.0f} / {b['gpu']:.0f} / "
              f"{b['jobs_cap']:.0f} / "
              f"{b['scheduler']:.0f} / {b['tracking']:.0f} / {b['local_host']:.0f} / "
              f"{b['critical_path']:.0f} | {r['dominant']} |")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"params": params, "work": work, "rows": rows},
                                          indent=1))


def hms(s: float) -> str:
    h, rem = divmod(int(round(s)), 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


if __name__ == "__main__":
    sys.exit(main())
