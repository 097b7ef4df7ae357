"""Stage 7 — MLflow lineage: one parent run per model, a child per precision × profile × backend.

A tracking *record* (plain JSON: runs with tags, params, metrics and artifact
paths) is written to disk first, then uploaded with ``MlflowClient`` (no
fluent global state: jobs may run in threads). If the tracking server is
unreachable the record stays in ``<artifacts>/_tracking/pending`` and
``engineforge sync`` uploads it later. Uploads are idempotent: a record whose
id is already tagged on a run is not logged twice.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

from engineforge.settings import Section
from engineforge.sidecar import canonical_json, read_json, write_json

log = logging.getLogger(__name__)

DEFAULT_URI = "sqlite:///mlflow.db"
RECORD_TAG = "engineforge.record_id"
CACHE_TAG = "engineforge.cache"  # engineforge.cache.<group> = fingerprint of that stage output
REF_TAG = "engineforge.ref"  # engineforge.ref.<group> = runs:/<id>/<dir> holding the same files


def _stage_files(artifact_dir: str, sidecar_path) -> list[list[str]]:
    """A stage's sidecar and its output files, under one artifact directory."""
    side = read_json(sidecar_path)
    files = [str(sidecar_path)] + [o["path"] for o in side["outputs"].values()]
    return [[f, artifact_dir] for f in files]


def find_holder(client, group: str, fingerprint: str, experiment_ids: list[str]) -> str | None:
    """Run id of a FINISHED run holding ``group``'s files with this fingerprint, or None.

    The one query behind both the build cache and artifact deduplication.
    """
    if not experiment_ids:
        return None
    runs = client.search_runs(experiment_ids, f"tags.`{CACHE_TAG}.{group}` = '{fingerprint}' "
                              "and attributes.status = 'FINISHED'", max_results=1)
    return runs[0].info.run_id if runs else None


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def quick_failing_http() -> None:
    """Fail within seconds, not minutes, when a tracking server is down (user env wins)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def _flat(prefix: str, obj, out: dict) -> dict:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = str(obj)[:500]
    return out


def _metrics(prefix: str, obj, out: dict) -> dict:
    """Numeric leaves only, MLflow metric names (keys joined with '.')."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            _metrics(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix] = float(obj)
    return out


def build_record(model: str, m: dict, experiment: str, sidecars: dict) -> dict:
    """Assemble the record from stage sidecars.

    ``m``: checkpoint, opset, precisions, backends, task, profiles. ``sidecars``: the
    ``Layout.model_outputs`` dict (export, simplify, drift, precision, audit, build, bench,
    baseline paths by role).
    """
    export, simplify = read_json(sidecars["export"]), read_json(sidecars["simplify"])
    parent = {
        "name": model,
        "tags": {"engineforge.model": model, "engineforge.kind": "model",
                 f"{CACHE_TAG}.export": export["fingerprint"],
                 f"{CACHE_TAG}.simplify": simplify["fingerprint"],
                 **{f"{CACHE_TAG}.precision.{p}": read_json(path)["fingerprint"]
                    for p, path in sidecars["precision"].items()}},
        "params": _flat("", {"checkpoint": m["checkpoint"], "opset": m["opset"],
                             "precisions": ",".join(m["precisions"]),
                             "backends": ",".join(m["backends"]), "task": m["task"],
                             "tools": export["tools"] | simplify["tools"]}, {}),
        "metrics": _metrics("", {"export_time_s": export["result"]["time_s"],
                                 "nodes_before_simplify": simplify["result"]["nodes_before"],
                                 "nodes_after_simplify": simplify["result"]["nodes_after"]}, {}),
        "artifacts": _stage_files("export", sidecars["export"])
        + _stage_files("simplify", sidecars["simplify"])
        + [a for p, path in sorted(sidecars["precision"].items())
           for a in _stage_files(f"precision/{p}", path)]
        + [[str(sidecars["drift"]), "audit"], [str(sidecars["drift_md"]), "audit"]],
    }
    children = []
    for (backend, precision, profile), build_path in sorted(sidecars["build"].items()):
        build = read_json(build_path)
        prec = read_json(sidecars["precision"][precision])
        audit_path = sidecars["audit"].get((backend, precision))
        audit = read_json(audit_path)["result"] if audit_path else {}
        bench_path = sidecars["bench"].get((backend, precision, profile))
        bench = read_json(bench_path)["result"] if bench_path else {}
        baseline_path = sidecars["baseline"].get(profile)
        baseline = read_json(baseline_path)["result"] if baseline_path else {}
        metrics = _metrics("build", {k: v for k, v in build["result"].items()
                                     if k in ("build_time_s", "engine_bytes")}, {})
        metrics |= _metrics("onnx", {"bytes": prec["result"].get("bytes")}, {})
        for name, stats in (audit.get("outputs") or {}).items():
            metrics |= _metrics(f"drift.{name}", stats, {})
        if audit.get("task"):
            metrics |= _metrics("task", audit["task"], {})
        for which, pt in (bench.get("points") or {}).items():
            metrics |= _metrics(f"latency.{which}", {k: v for k, v in pt.items()
                                                     if k.endswith("_ms") or k in (
                                                         "cv", "throughput_per_s")}, {})
            base = (baseline.get("points") or {}).get(which)
            if base and pt.get("p50_ms"):
                metrics[f"speedup_vs_pytorch.{which}"] = base["p50_ms"] / pt["p50_ms"]
        artifacts = _stage_files("build", build_path)
        artifacts += [[str(audit_path), "audit"]] if audit_path else []
        artifacts += [[str(bench_path), "bench"]] if bench_path else []
        children.append({
            "name": f"{model}/{precision}/{profile}/{backend}",
            "tags": {"engineforge.model": model, "engineforge.kind": "engine",
                     "engineforge.backend": backend, "engineforge.precision": precision,
                     "engineforge.profile": profile,
                     "engineforge.fingerprint.precision": prec["fingerprint"],
                     f"{CACHE_TAG}.build": build["fingerprint"],
                     "engineforge.audit": audit.get("status", "n/a"),
                     "engineforge.bench": bench.get("status", "n/a")},
            "params": _flat("", {"backend": backend, "precision": precision,
                                 "profile": profile, "device": build.get("device"),
                                 "precision_config": prec["config"].get("method"),
                                 "shapes": m["profiles"].get(profile),
                                 "tools": build["tools"]}, {}),
            "metrics": metrics,
            "artifacts": artifacts,
        })
    record = {"experiment": experiment, "model": model, "parent": parent, "children": children}
    record["id"] = hashlib.sha256(canonical_json(record).encode()).hexdigest()[:32]
    return record


def upload(record: dict, uri: str | None = None) -> dict:
    """Log a record to MLflow; returns {"parent": run_id, "children": {name: run_id}}."""
    from mlflow.tracking import MlflowClient

    quick_failing_http()
    client = MlflowClient(tracking_uri=uri or tracking_uri())
    exp = client.get_experiment_by_name(record["experiment"])
    exp_id = exp.experiment_id if exp else client.create_experiment(record["experiment"])
    done = client.search_runs([exp_id], f"tags.`{RECORD_TAG}` = '{record['id']}'",
                              max_results=1)
    if done:
        return {"parent": done[0].info.run_id, "children": {}, "reused": True}
    exps = [e.experiment_id for e in client.search_experiments()]
    parent = _log_run(client, exp_id, _dedupe(client, record["parent"], exps), record["id"],
                      None)
    children = {c["name"]: _log_run(client, exp_id, _dedupe(client, c, exps), record["id"],
                                    parent)
                for c in record["children"]}
    # Tag the parent last: a crash midway leaves no "done" marker, so sync retries.
    client.set_tag(parent, RECORD_TAG, record["id"])
    return {"parent": parent, "children": children, "reused": False}


def _dedupe(client, run: dict, experiment_ids: list[str]) -> dict:
    """Files of a stage output already held by a finished run are referenced, not re-sent.

    A one-precision change then uploads that precision's files only. The holding run keeps
    the cache tag; this run gets ``engineforge.ref.<group> = runs:/<id>/<dir>``.
    """
    run = {**run, "tags": dict(run["tags"]), "artifacts": list(run["artifacts"])}
    for key, fp in list(run["tags"].items()):
        if not key.startswith(CACHE_TAG + "."):
            continue
        group = key[len(CACHE_TAG) + 1:]
        holder = find_holder(client, group, fp, experiment_ids)
        if holder:
            folder = group.replace(".", "/")
            del run["tags"][key]
            run["tags"][f"{REF_TAG}.{group}"] = f"runs:/{holder}/{folder}"
            run["artifacts"] = [a for a in run["artifacts"] if a[1] != folder]
    return run


def _log_run(client, exp_id: str, run: dict, record_id: str, parent: str | None) -> str:
    from mlflow.entities import Metric, Param

    tags = dict(run["tags"])
    tags["mlflow.runName"] = run["name"]
    if parent:
        tags["mlflow.parentRunId"] = parent
        tags[RECORD_TAG + ".parent"] = record_id
    r = client.create_run(exp_id, run_name=run["name"], tags=tags)
    rid = r.info.run_id
    ts = int(time.time() * 1000)
    client.log_batch(rid, metrics=[Metric(k, v, ts, 0) for k, v in run["metrics"].items()],
                     params=[Param(k, v) for k, v in run["params"].items()], tags=[])
    for path, artifact_dir in run["artifacts"]:
        if Path(path).is_file():
            client.log_artifact(rid, path, artifact_dir)
    client.set_terminated(rid, "FINISHED")
    return rid


def pending_dir(artifacts: str | Path) -> Path:
    return Path(artifacts) / "_tracking" / "pending"


# -- the track stage (one job per model; the runner calls run) ---------------------------------
ISOLATED = False  # MLflow client only; `resources: mlflow=1` serializes the writers
TOOLS = ()


class Settings(Section):
    experiment: str
    model: dict                       # checkpoint, opset, precisions, backends, task, profiles
    builds: dict[str, list[str]]      # usable backend -> profiles it builds


def settings(m: dict, w: dict, experiment: str, builds: dict[str, list[str]]) -> Settings:
    keys = ("checkpoint", "opset", "precisions", "backends", "task", "profiles")
    return Settings(experiment=experiment, model={k: m[k] for k in keys}, builds=builds)


def model_outputs(layout, model: str, s: Settings) -> dict:
    return layout.model_outputs(model, s.model["precisions"], s.builds, list(s.model["profiles"]))


def run(job) -> None:
    from engineforge.layout import Layout

    s: Settings = job.settings
    sidecars = model_outputs(Layout(job.artifacts), job.model, s)
    record = build_record(job.model, s.model, s.experiment, sidecars)
    track(record, job.outputs["track"], job.artifacts)


def track(record: dict, out: Path, artifacts: str | Path) -> dict:
    """Upload, or keep the record pending when the server cannot be reached."""
    pending = pending_dir(artifacts) / f"{record['model']}-{record['id']}.json"
    write_json(pending, record)
    try:
        ids = upload(record)
        pending.unlink()
        status = {"status": "logged", "uri": _redact(tracking_uri()), **ids}
    except Exception as err:  # noqa: BLE001 - tracking must never fail the build
        log.warning("MLflow unreachable (%s); record kept at %s; run `engineforge sync`",
                    str(err).splitlines()[0][:200], pending)
        status = {"status": "pending", "uri": _redact(tracking_uri()), "pending": str(pending),
                  "error": str(err).splitlines()[0][:300]}
    write_json(out, {"record_id": record["id"], **status})
    return status


def sync(artifacts: str | Path) -> list[dict]:
    """Upload every pending record; keep the ones that still fail."""
    results = []
    for path in sorted(pending_dir(artifacts).glob("*.json")):
        record = read_json(path)
        ids = upload(record)
        path.unlink()
        results.append({"record": path.name, **ids})
    return results


def _redact(uri: str) -> str:
    return uri.split("@")[-1] if "@" in uri else uri
