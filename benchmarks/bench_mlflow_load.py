"""Load on the team's MLflow server from N concurrent track jobs (issue 18, "Figures").

Each client is a process that uploads ``--records`` model records into its own experiment
with ``engineforge.mlflow_store.upload`` -- the call the track stage makes (signing, the
dedupe look-ups, one ``create_run``/``log_batch``/``log_artifact``/``log_text``/
``set_terminated`` per run). The records are synthetic but have the shape
``stages.track.build_record`` produces: a parent run (6 cache groups -- export, simplify,
4 precisions -- each with a JSON sidecar and an ONNX file, ~15 tags, ~30 params) and
``--children`` engine runs (~15 tags, ~30 params, ~40 metrics; the build group's sidecar
of ``--sidecar-kb``, an engine file of ``--engine-mb`` MB and a bench JSON). Every
fingerprint is random (nothing dedupes), ``ENGINEFORGE_CACHE=0``, and a throw-away signing
key is made for the run (``ENGINEFORGE_SIGNING_KEY_FILE``), so nothing touches ~/.config.

Every HTTP request is counted by wrapping ``requests.Session.request`` in the clients
(MLflow's REST client and its proxied artifact uploads both go through it). Per N and
repetition: wall time (barrier release to the last client done), requests/s, p50/p95
latency per request (all, metadata only, artifact PUTs only), records/s, artifact MB/s,
errors (exceptions and HTTP >= 400; a client whose upload raised counts its record as
failed). Medians over ``--repeats`` are printed as a markdown table; everything goes to
``--out`` as JSON.

After each repetition (outside the timed window) the runs' artifacts are deleted through
the server's proxy (per run: ``mlflow-artifacts:/<exp>/<run>/artifacts``) and the
experiments are deleted, so the shared Ceph store does not fill up; ``--keep`` keeps them.

Usage (team stack env: ``set -a; . /tmp/engineforge-stack/stack.env; set +a``):
    .venv/bin/python benchmarks/bench_mlflow_load.py --clients 1 8 32 --repeats 3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

from benchstats import med, pct

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
BACKENDS = ("onnxruntime", "tensorrt-rtx", "tensorrt")
PROFILES = ("bs1-8",)
TOOLS = ("torch", "onnx", "onnxruntime", "onnxsim", "modelopt", "polygraphy", "tensorrt_rtx",
         "tensorrt", "numpy", "python", "snakemake", "engineforge", "onnxscript", "cuda",
         "cudnn", "driver", "mlflow", "protobuf", "ml_dtypes", "safetensors", "torchvision")


def load() -> str:
    try:
        a, b, c = os.getloadavg()
        return f"{a:.2f} {b:.2f} {c:.2f}"
    except OSError:
        return "n/a"




# ----------------------------------------------------------------------------- the records

def fp() -> str:
    return os.urandom(8).hex()


def write_json(path: Path, obj: dict, pad_to: int = 0) -> Path:
    """A sidecar-like JSON, padded (an ``outputs_detail`` list) to about ``pad_to`` bytes."""
    text = json.dumps(obj, indent=2, sort_keys=True)
    if pad_to > len(text):
        n = (pad_to - len(text)) // 60 + 1
        obj = {**obj, "detail": [{"node": f"/layer{i}/Conv_{i}", "sha256": fp() * 4}
                                 for i in range(n)]}
        text = json.dumps(obj, indent=2, sort_keys=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def ran(rng: random.Random) -> dict:
    t = time.time() - rng.uniform(60, 600)
    return {"host": f"node{rng.randrange(64):02d}", "slurm_job_id": str(rng.randrange(10**6)),
            "started_at": t, "finished_at": t + rng.uniform(1, 100)}


def make_record(tag: str, where: Path, pool: dict, args, rng: random.Random) -> dict:
    """A record shaped like ``stages.track.build_record``'s (see the module doc)."""
    model = f"model_{tag}"
    tools = {t: f"{rng.randrange(1, 20)}.{rng.randrange(30)}.{rng.randrange(9)}" for t in TOOLS}
    parent_tags = {"engineforge.model": model, "engineforge.kind": "model",
                   "engineforge.ran.host": "node00", "engineforge.ran.slurm_job_id": "4242",
                   "engineforge.report.sha256": fp() * 4,
                   "engineforge.gate": "pass", "engineforge.gate.baseline": "release:1.0",
                   "engineforge.localise.int8": "passes", "engineforge.localise.fp16": "passes"}
    artifacts, numbers = [], {"export_time_s": 5.5, "nodes_before_simplify": 61,
                              "nodes_after_simplify": 49, "gate_regressions": 0,
                              "localise.int8.first_drop_db": 3.2}
    groups = ["export", "simplify"] + [f"precision.{p}" for p in PRECISIONS]
    for g in groups:
        f = fp()
        parent_tags[f"engineforge.cache.{g}"] = f
        d = where / "parent" / g.replace(".", "_")
        side = write_json(d / f"{g.split('.')[0]}.json",
                          {"fingerprint": f, "ran": ran(rng), "tools": tools,
                           "outputs": {"onnx": {"path": str(pool["onnx"])}}},
                          int(args.parent_sidecar_kb * 1024))
        artifacts += [[str(side), g.replace(".", "/")], [str(pool["onnx"]), g.replace(".", "/")]]
    params = {"checkpoint.kind": "state_dict", "checkpoint.arch": "torchvision.models:resnet18",
              "checkpoint.path": f"models/{model}.safetensors", "checkpoint.seed": "0",
              "opset": "18", "precisions": ",".join(PRECISIONS),
              "backends": ",".join(BACKENDS), "task": "classification"}
    params |= {f"tools.{k}": v for k, v in tools.items()}
    parent = {"name": model, "tags": parent_tags, "span": None, "params": params,
              "metrics": numbers, "artifacts": artifacts}
    children = []
    combos = [(b, p, pr) for b in BACKENDS for p in PRECISIONS for pr in PROFILES]
    engines = pool["engines"]
    for i in range(args.children):
        b, p, prof = combos[i % len(combos)]
        f = fp()
        d = where / f"child{i:02d}"
        engine = engines[i % len(engines)]
        side = write_json(d / "build.json", {"fingerprint": f, "ran": ran(rng), "tools": tools,
                                             "outputs": {"engine": {"path": str(engine)}}},
                          int(args.sidecar_kb * 1024))
        bench = write_json(d / f"{prof}.json", {"fingerprint": fp(), "ran": ran(rng),
                                                "result": {"p50_ms": 1.0}},
                           int(args.bench_kb * 1024))
        metrics = {"build.build_time_s": rng.uniform(0.1, 100),
                   "build.engine_bytes": float(engine.stat().st_size),
                   "onnx.bytes": float(pool["onnx"].stat().st_size)}
        for k in ("max_abs", "mean_abs", "median_abs", "p99_abs", "max_rel", "mean_rel",
                  "median_rel", "p99_rel", "cosine", "snr_db", "top1", "top5"):
            metrics[f"drift.logits.{k}"] = rng.random()
        metrics |= {"task.accuracy": 0.99, "task.accuracy_ref": 0.996, "task.drop": 0.006}
        for w in ("min", "opt", "max"):
            for k in ("p50_ms", "p90_ms", "p95_ms", "p99_ms", "mean_ms", "cv",
                      "throughput_per_s"):
                metrics[f"latency.{w}.{k}"] = rng.uniform(0.1, 100)
            metrics[f"speedup_vs_pytorch.{w}"] = rng.uniform(0.5, 10)
        cparams = {"backend": b, "precision": p, "profile": prof, "device": "cuda:0",
                   "precision_config": "autocast",
                   "shapes.image.min": "[1, 3, 224, 224]", "shapes.image.opt": "[4, 3, 224, 224]",
                   "shapes.image.max": "[8, 3, 224, 224]"}
        cparams |= {f"tools.{k}": v for k, v in tools.items()}
        ctags = {"engineforge.model": model, "engineforge.kind": "engine",
                 "engineforge.backend": b, "engineforge.precision": p,
                 "engineforge.profile": prof, "engineforge.fingerprint.precision": fp(),
                 "engineforge.cache.build": f, "engineforge.audit": "pass",
                 "engineforge.bench": "ok"}
        for infix in ("", ".audit", ".bench"):
            r = ran(rng)
            ctags |= {f"engineforge.ran{infix}.host": r["host"],
                      f"engineforge.ran{infix}.slurm_job_id": r["slurm_job_id"]}
        name = f"{model}/{p}/{prof}/{b}" + (f"#{i}" if i >= len(combos) else "")
        children.append({"name": name, "span": None, "tags": ctags,
                         "params": cparams, "metrics": metrics,
                         "artifacts": [[str(side), "build"], [str(engine), "build"],
                                       [str(bench), "bench"]]})
    record = {"experiment": f"{args.prefix}-{tag}", "model": model, "parent": parent,
              "children": children}
    record["id"] = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:32]
    return record


def record_bytes(record: dict) -> int:
    runs = [record["parent"], *record["children"]]
    return sum(Path(p).stat().st_size for r in runs for p, _ in r["artifacts"])


# ----------------------------------------------------------------------------- a client

def client_main(idx: int, rep: int, n: int, args, pool: dict, work: Path, barrier,
                out: Path) -> None:
    import requests
    from engineforge import mlflow_store
    from engineforge.redaction import redact

    log: list[list] = []
    real = requests.Session.request

    def counted(self, method, url, *a, **kw):
        t0 = time.time()
        status, err = None, None
        try:
            resp = real(self, method, url, *a, **kw)
            status = resp.status_code
            return resp
        except Exception as e:  # noqa: BLE001 - recorded, re-raised
            err = type(e).__name__
            raise
        finally:
            parts = urlsplit(url)
            path = parts.path
            kind = ("other" if parts.netloc.rsplit("@", 1)[-1] != server
                    else "artifact" if "/mlflow-artifacts/" in path else "meta")
            name = path.split("/api/2.0/mlflow/")[-1] if kind == "meta" else "artifacts"
            log.append([t0, time.time() - t0, method, kind, name, status, err])

    server = urlsplit(args.uri).netloc.rsplit("@", 1)[-1]
    requests.Session.request = counted
    # MLflow prints a "View run ... at" line per run: to a file, not the table
    with open(work / f"client{idx}.log", "w") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    rng = random.Random(hash((rep, n, idx)))
    records = []
    for k in range(args.records):
        d = work / f"c{idx:02d}" / f"r{k}"
        records.append(make_record(f"{args.stamp}-rep{rep}-n{n}-c{idx:02d}-m{k}", d, pool,
                                   args, rng))
    nbytes = sum(record_bytes(r) for r in records)
    result = {"client": idx, "bytes": nbytes, "records": [], "errors": []}
    barrier.wait()
    t_start = time.time()
    for r in records:
        t0 = time.time()
        try:
            ids = mlflow_store.upload(r, args.uri)
            result["records"].append({"ok": True, "s": time.time() - t0, "ids": ids})
        except Exception as e:  # noqa: BLE001 - a failed upload is a measured error
            result["records"].append({"ok": False, "s": time.time() - t0})
            result["errors"].append(redact(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                                           if str(e) else type(e).__name__))
    result |= {"start": t_start, "end": time.time(), "requests": log}
    out.write_text(json.dumps(result))


# ----------------------------------------------------------------------------- CPU use

SERVICES = ("mlflow", "postgres", "radosgw", "ceph-osd")


def service_cpu() -> dict:
    """CPU seconds so far of each stack service (its pid file under $ENGINEFORGE_STACK_DIR/pids,
    every descendant, and the reaped children its processes waited for: PostgreSQL's
    per-connection backends). {"pids": roots, name: seconds}; {} without the stack dir."""
    root = Path(os.environ.get("ENGINEFORGE_STACK_DIR", "/tmp/engineforge-stack")) / "pids"
    if not root.is_dir():
        return {}
    tick = os.sysconf("SC_CLK_TCK")
    stat, kids = {}, {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            f = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, ppid = int(d.name), int(f[1])
        stat[pid] = sum(int(x) for x in f[11:15]) / tick  # utime stime cutime cstime
        kids.setdefault(ppid, []).append(pid)
    out = {"pids": {}}
    for name in SERVICES:
        try:
            top = int((root / f"{name}.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        todo, total = [top], 0.0
        while todo:
            p = todo.pop()
            total += stat.get(p, 0.0)
            todo += kids.get(p, [])
        out["pids"][name] = top
        out[name] = total
    return out


def cpu_delta(a: dict, b: dict) -> dict:
    """Per service CPU seconds between two service_cpu() calls (None: it was restarted)."""
    return {n: (round(b[n] - a[n], 2) if a.get("pids", {}).get(n) == b.get("pids", {}).get(n)
                else None) for n in SERVICES if n in a and n in b}


# ----------------------------------------------------------------------------- one round

def one_round(n: int, rep: int, args, pool: dict, base: Path) -> dict:
    work = base / f"rep{rep}-n{n}"
    work.mkdir(parents=True)
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(n + 1)
    outs = [work / f"client{i}.json" for i in range(n)]
    procs = [ctx.Process(target=client_main, args=(i, rep, n, args, pool, work, barrier, outs[i]))
             for i in range(n)]
    load_before = load()
    for p in procs:
        p.start()
    try:
        barrier.wait(timeout=600)  # every client has built its records
        cpu0, kids0 = service_cpu(), os.times()
    except Exception:  # noqa: BLE001
        for p in procs:
            p.kill()
        raise
    for p in procs:
        p.join(timeout=args.timeout)
        if p.is_alive():
            p.kill()
    load_after = load()
    cpu1, kids1 = service_cpu(), os.times()
    res = [json.loads(o.read_text()) for o in outs if o.is_file()]
    crashed = n - len(res)
    other = [q for r in res for q in r["requests"] if q[3] == "other"]  # e.g. telemetry
    reqs = [q for r in res for q in r["requests"] if q[3] != "other"]

    def failed(q) -> bool:  # get-by-name's 404 is how MLflow says "no such experiment yet"
        return bool(q[6]) or ((q[5] or 0) >= 400 and not (q[5] == 404 and "get-by-name" in q[4]))

    lat = [q[1] * 1000 for q in reqs]
    lat_meta = [q[1] * 1000 for q in reqs if q[3] == "meta"]
    lat_art = [q[1] * 1000 for q in reqs if q[3] == "artifact" and q[2] == "PUT"]
    errors = sum(1 for q in reqs if failed(q)) + crashed
    failed_records = sum(1 for r in res for x in r["records"] if not x["ok"]) \
        + crashed * args.records
    ok_records = sum(1 for r in res for x in r["records"] if x["ok"])
    wall = (max(r["end"] for r in res) - min(r["start"] for r in res)) if res else None
    # bytes of the records that were logged (a client's records are the same size)
    nbytes = sum(r["bytes"] * sum(x["ok"] for x in r["records"]) / max(len(r["records"]), 1)
                 for r in res)
    by_name: dict[str, list[float]] = {}
    for q in reqs:
        by_name.setdefault(f"{q[2]} {q[4]}", []).append(q[1] * 1000)
    row = {
        "clients": n, "rep": rep, "wall_s": wall, "requests": len(reqs),
        "requests_per_s": len(reqs) / wall if wall else None,
        "p50_ms": pct(lat, .5), "p95_ms": pct(lat, .95),
        "meta_p50_ms": pct(lat_meta, .5), "meta_p95_ms": pct(lat_meta, .95),
        "artifact_put_p50_ms": pct(lat_art, .5), "artifact_put_p95_ms": pct(lat_art, .95),
        "meta_requests": len(lat_meta), "artifact_puts": len(lat_art),
        "records_ok": ok_records, "records_failed": failed_records,
        "records_per_s": ok_records / wall if wall else None,
        "artifact_mb": nbytes / 1e6, "artifact_mb_per_s": nbytes / 1e6 / wall if wall else None,
        "record_s_p50": pct([x["s"] for r in res for x in r["records"]], .5),
        "record_s_max": max([x["s"] for r in res for x in r["records"]], default=None),
        "errors": errors,
        "error_samples": sorted({e for r in res for e in r["errors"]})[:5]
        + sorted({f"{q[2]} {q[4]} -> {q[5] or q[6]}" for q in reqs if failed(q)})[:5],
        "error_counts": dict(Counter(f"{q[2]} {q[4]} -> {q[5] or q[6]}" for q in reqs
                                     if failed(q))),
        "crashed_clients": crashed,
        "other_host_requests": len(other),
        "per_request": {k: {"count": len(v), "p50_ms": pct(v, .5), "p95_ms": pct(v, .95)}
                        for k, v in sorted(by_name.items())},
        "load_before": load_before, "load_after": load_after,
        # CPU seconds in the timed window: the stack's services, and the clients (which
        # also built their records before the barrier: an upper bound for their upload)
        "server_cpu_s": cpu_delta(cpu0, cpu1),
        "clients_cpu_s": round(kids1.children_user + kids1.children_system
                               - kids0.children_user - kids0.children_system, 2),
    }
    sc = row["server_cpu_s"]
    if sc and None not in sc.values() and row["requests"]:
        row["server_cpu_ms_per_request"] = 1000 * sum(sc.values()) / row["requests"]
        row["server_cpu_s_per_mb"] = sum(sc.values()) / max(row["artifact_mb"], 1e-9)
    run_ids = [rid for r in res for x in r["records"] if x.get("ids")
               for rid in [x["ids"]["parent"], *x["ids"]["children"].values()]]
    if not args.keep:
        row["cleanup"] = cleanup(args, n, rep, run_ids)
    shutil.rmtree(work, ignore_errors=True)
    return row


def cleanup(args, n: int, rep: int, run_ids: list[str]) -> dict:
    """Delete this round's artifacts (per run, through the server's proxy) and experiments."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=args.uri)
    t0 = time.time()
    errs = 0

    def rm(rid):
        nonlocal errs
        try:
            uri = client.get_run(rid).info.artifact_uri
            if f"/{rid}/" in uri + "/":  # the run's own folder, never anything wider
                get_artifact_repository(uri).delete_artifacts()
        except Exception:  # noqa: BLE001
            errs += 1

    prefix = f"{args.prefix}-{args.stamp}-rep{rep}-n{n}-"
    exps = client.search_experiments(filter_string=f"name LIKE '{prefix}%'", max_results=1000)
    # every run of these experiments: a failed upload leaves runs that `run_ids` lacks
    ids = set(run_ids)
    for e in exps:
        token = None
        while True:
            page = client.search_runs([e.experiment_id], max_results=1000, page_token=token)
            ids |= {r.info.run_id for r in page}
            token = page.token
            if not token:
                break
    with ThreadPoolExecutor(4) as ex:
        list(ex.map(rm, sorted(ids)))
    for e in exps:
        try:
            client.delete_experiment(e.experiment_id)
        except Exception:  # noqa: BLE001
            errs += 1
    return {"runs": len(ids), "experiments": len(exps), "errors": errs,
            "s": round(time.time() - t0, 1)}


# ----------------------------------------------------------------------------- main

COLS = [("clients", "N", "{:d}"), ("wall_s", "wall s", "{:.1f}"),
        ("requests", "requests", "{:.0f}"), ("requests_per_s", "req/s", "{:.1f}"),
        ("p50_ms", "p50 ms", "{:.0f}"), ("p95_ms", "p95 ms", "{:.0f}"),
        ("meta_p50_ms", "meta p50/p95 ms", "{:.0f}"), ("artifact_put_p50_ms",
                                                      "PUT p50/p95 ms", "{:.0f}"),
        ("records_per_s", "records/s", "{:.2f}"), ("record_s_p50", "s/record p50", "{:.1f}"),
        ("artifact_mb_per_s", "artifact MB/s", "{:.1f}"), ("errors", "errors", "{:.0f}"),
        ("server_cpu_ms_per_request", "server CPU ms/req", "{:.1f}"),
        ("load", "load (1-min, before→after)", "{}")]


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for n in sorted({r["clients"] for r in rows}):
        rs = [r for r in rows if r["clients"] == n]
        m = {"clients": n, "repeats": len(rs)}
        for k in ("wall_s", "requests", "requests_per_s", "p50_ms", "p95_ms", "meta_p50_ms",
                  "meta_p95_ms", "artifact_put_p50_ms", "artifact_put_p95_ms", "records_per_s",
                  "record_s_p50", "artifact_mb", "artifact_mb_per_s", "errors",
                  "records_failed", "meta_requests", "artifact_puts",
                  "server_cpu_ms_per_request", "clients_cpu_s"):
            m[k] = med([r[k] for r in rs])
        m["runs"] = {k: [r[k] for r in rs] for k in ("wall_s", "requests_per_s",
                                                     "artifact_mb_per_s", "errors")}
        m["server_cpu_s"] = {k: med([(r.get("server_cpu_s") or {}).get(k) for r in rs])
                             for k in SERVICES}
        m["load"] = "; ".join(f"{r['load_before'].split()[0]}→{r['load_after'].split()[0]}"
                              for r in rs)
        out.append(m)
    return out


def table(summary: list[dict]) -> str:
    head = "| " + " | ".join(c[1] for c in COLS) + " |"
    lines = [head, "|" + "---|" * len(COLS)]
    for m in summary:
        cells = []
        for key, _, f in COLS:
            v = m.get(key)
            if key == "meta_p50_ms":
                cells.append(f"{m['meta_p50_ms']:.0f} / {m['meta_p95_ms']:.0f}"
                             if m["meta_p50_ms"] is not None else "–")
            elif key == "artifact_put_p50_ms":
                cells.append(f"{m['artifact_put_p50_ms']:.0f} / {m['artifact_put_p95_ms']:.0f}"
                             if m["artifact_put_p50_ms"] is not None else "–")
            elif v is None:
                cells.append("–")
            else:
                cells.append(f.format(int(v) if f == "{:d}" else v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                    help="tracking server (default: $MLFLOW_TRACKING_URI)")
    ap.add_argument("--out", default="/tmp/engineforge-bench/mlflow_load.json")
    ap.add_argument("--records", type=int, default=1, help="model records per client")
    ap.add_argument("--children", type=int, default=12, help="engine runs per record")
    ap.add_argument("--engine-mb", type=float, nargs=2, default=[1.0, 4.0],
                    metavar=("MIN", "MAX"), help="engine files spread evenly over MIN..MAX MB")
    ap.add_argument("--onnx-mb", type=float, default=1.0,
                    help="the parent's ONNX file per cache group (6 groups)")
    ap.add_argument("--sidecar-kb", type=float, default=50)
    ap.add_argument("--parent-sidecar-kb", type=float, default=20)
    ap.add_argument("--bench-kb", type=float, default=6)
    ap.add_argument("--timeout", type=float, default=900, help="per client, seconds")
    ap.add_argument("--prefix", default="bench-mlflow-load")
    ap.add_argument("--keep", action="store_true", help="keep the runs, artifacts, experiments")
    ap.add_argument("--telemetry", action="store_true",
                    help="leave MLflow's usage telemetry on (default: MLFLOW_DISABLE_TELEMETRY)")
    args = ap.parse_args()
    if not args.uri or not args.uri.startswith("http"):
        sys.exit("--uri (or MLFLOW_TRACKING_URI) must name the team's http(s) tracking server")
    args.stamp = time.strftime("%Y%m%d%H%M%S") + f"-{os.getpid()}"

    base = Path(tempfile.mkdtemp(prefix="ef-mlflow-load-"))
    os.environ["ENGINEFORGE_CACHE"] = "0"
    os.environ.pop("ENGINEFORGE_SIGNING_KEY", None)
    os.environ["ENGINEFORGE_SIGNING_KEY_FILE"] = str(base / "key" / "signing.key")
    os.environ["MLFLOW_TRACKING_URI"] = args.uri
    if not args.telemetry:  # its thread races requests on os.environ (KeyError, seen once)
        os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    import mlflow.tracking  # noqa: F401
    from engineforge import mlflow_store, signing  # noqa: F401 - warm imports before fork

    signing.generate(base / "key" / "signing.key")  # never printed
    # the server answers (urllib: no requests session exists before the clients fork)
    with urllib.request.urlopen(args.uri.rstrip("/") + "/health", timeout=10) as r:
        assert r.status == 200
    pool = {"onnx": base / "pool" / "model.onnx", "engines": []}
    pool["onnx"].parent.mkdir(parents=True)
    pool["onnx"].write_bytes(os.urandom(int(args.onnx_mb * 1e6)))
    lo, hi = args.engine_mb
    k = max(args.children, 1)
    for i in range(k):
        mb = lo + (hi - lo) * i / max(k - 1, 1)
        path = base / "pool" / f"engine{i:02d}.bin"
        path.write_bytes(os.urandom(int(mb * 1e6)))
        pool["engines"].append(path)

    from engineforge.redaction import redact

    meta = {"uri": redact(args.uri),
        "args": {k: v for k, v in vars(args).items() if k != "uri"},
        "cpus": os.cpu_count(), "load_start": load(), "started": time.strftime("%F %T"),
        "python": sys.version.split()[0]}
    try:
        import mlflow
        meta["mlflow"] = mlflow.__version__
    except Exception:  # noqa: BLE001
        pass
    rows = []
    try:
        for rep in range(args.repeats):
            for n in args.clients:
                row = one_round(n, rep, args, pool, base)
                rows.append(row)
                print(f"rep {rep} N={n}: wall {row['wall_s']:.1f} s, {row['requests']} req "
                      f"({row['requests_per_s']:.1f}/s), p50 {row['p50_ms']:.0f} ms, p95 "
                      f"{row['p95_ms']:.0f} ms, {row['artifact_mb_per_s']:.1f} MB/s, "
                      f"errors {row['errors']}, load {row['load_before']} -> "
                      f"{row['load_after']}", flush=True)
                for e in row["error_samples"]:
                    print("   error:", e, flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    summary = summarize(rows)
    meta["load_end"] = load()
    meta["finished"] = time.strftime("%F %T")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=1))
    print()
    print(f"MLflow load: {args.records} record(s) per client, parent + {args.children} children, "
          f"{summary[0]['artifact_mb'] / max(summary[0]['clients'], 1) / args.records:.1f} MB "
          f"of artifacts per record; medians of {args.repeats}")
    print(table(summary))
    print(f"\nJSON: {out}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        traceback.print_exc()
        sys.exit(130)
