"""Stage 7 — MLflow lineage: one parent run per model, a child per precision × profile × backend.

A tracking *record* (plain JSON: runs with tags, params, metrics and artifact
paths) is written to disk first, then uploaded with ``MlflowClient`` (no
fluent global state: jobs may run in threads). If the tracking server is
unreachable the record stays in ``<artifacts>/_tracking/pending`` and
``engineforge sync`` uploads it later. Uploads are idempotent: a record whose
id is already tagged on a run is not logged twice.

A model with failed jobs gets a record of what succeeded: its parent run (status FAILED)
lists every failure in tags and a ``failures.json`` artifact; a failed engine build is a
FAILED child run of its own.

Credentials in the tracking URI (``http://user:password@host``) are handed to MLflow through
its ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` variables and MLflow gets the
URI without them; every message and log record of this process is redacted as well
(:func:`redact`: credentials and query tokens), so no secret reaches a terminal, a log, a
sidecar, ``track.json`` or a pending record.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path
from urllib.parse import parse_qsl, quote, unquote, urlsplit, urlunsplit

from engineforge.errors import first_line
from engineforge.settings import Section
from engineforge.sidecar import canonical_json, read_json, sha256_file, write_json

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


def create_local_store() -> None:
    """Create a local sqlite tracking store that does not exist yet, once, before jobs
    start: jobs in separate processes (cluster executors) that each open a fresh database
    race MLflow's schema migration ("table _alembic_tmp_experiments already exists")."""
    uri = tracking_uri()
    if not uri.startswith("sqlite:///") or Path(uri.removeprefix("sqlite:///")).exists():
        return
    try:
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001 - tracking never fails the build
        log.warning("could not create the MLflow store %s: %s", redact(uri),
                    first_line(err, 200, typed=False))


def tracking_uri() -> str:
    """The tracking URI MLflow is given: credentials in it (``user:password@``) move to
    MLflow's own variables ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` (and
    ``MLFLOW_TRACKING_URI`` loses them), so no MLflow message can contain them. Installs
    the log redaction of this process too."""
    install_log_redaction()
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, _, password = userinfo.partition(":")
    os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(user)
    if password:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(password)
    uri = urlunsplit(parts._replace(netloc=host))
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


# -- secrets: never in a message, a log, a sidecar or a record --------------------------------
_SECRET_VARS = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
_SECRET_NAME = r"(?:token|secret|passw|pwd|key|auth|sig|credential)"
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@'\"]+@")
_SECRET_PARAM = re.compile(rf"(?i)([?&;][\w.-]*{_SECRET_NAME}[\w.-]*=)[^&#\s'\"]+")


def _secret_values() -> set[str]:
    """Literal secrets of this environment: the tracking URI's password and query values,
    MLflow's password and token variables (raw and URL-encoded)."""
    found = {os.environ.get(v, "") for v in _SECRET_VARS}
    parts = urlsplit(os.environ.get("MLFLOW_TRACKING_URI", ""))
    if "@" in parts.netloc:
        found.add(parts.netloc.rsplit("@", 1)[0].partition(":")[2])
    found |= {v for k, v in parse_qsl(parts.query) if re.search(_SECRET_NAME, k, re.I)}
    found |= {f(v) for v in list(found) for f in (unquote, quote)}
    return {v for v in found if len(v) >= 4}


def redact(text: str) -> str:
    """``text`` without credentials: ``scheme://user:pass@`` -> ``scheme://***@``,
    ``?token=...`` -> ``?token=***``, and every secret value of this environment -> ``***``."""
    text = _SECRET_PARAM.sub(r"\1***", _USERINFO.sub(r"\1***@", str(text)))
    for value in sorted(_secret_values(), key=len, reverse=True):
        text = text.replace(value, "***")
    return text


def install_log_redaction() -> None:
    """Redact every log record this process creates from now on (MLflow's, urllib3's and
    ours, whatever handler writes them: terminal, job log). Idempotent."""
    factory = logging.getLogRecordFactory()
    if getattr(factory, "engineforge_redacts", False):
        return

    def redacting(*args, **kwargs):
        record = factory(*args, **kwargs)
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record stays as it is
            return record
        clean = redact(text)
        if clean != text:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return record

    redacting.engineforge_redacts = True
    logging.setLogRecordFactory(redacting)


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


def _read(path) -> dict | None:
    """A sidecar, or None where its job did not run (a model with failed jobs)."""
    return read_json(path) if path and Path(path).is_file() else None


def build_record(model: str, m: dict, experiment: str, sidecars: dict,
                 failures: list[dict] | None = None) -> dict:
    """Assemble the record from the stage sidecars that exist.

    ``m``: checkpoint, opset, precisions, backends, task, profiles. ``sidecars``: the
    ``Layout.model_outputs`` dict (export, simplify, drift, precision, audit, build, bench,
    baseline paths by role). ``failures``: None for a complete record; else the record is
    partial (a run with failed jobs): the model's failed jobs (``failures.load``) are listed
    and the parent run, and the children they concern, end FAILED.
    """
    export, simplify = _read(sidecars["export"]), _read(sidecars["simplify"])
    precs = {p: s for p, path in sidecars["precision"].items() if (s := _read(path))}
    tags = {"engineforge.model": model, "engineforge.kind": "model"}
    tags |= {f"{CACHE_TAG}.{stage}": s["fingerprint"]
             for stage, s in (("export", export), ("simplify", simplify)) if s}
    tags |= {f"{CACHE_TAG}.precision.{p}": s["fingerprint"] for p, s in precs.items()}
    numbers = {}
    if export:
        numbers["export_time_s"] = export["result"]["time_s"]
    if simplify:
        numbers |= {"nodes_before_simplify": simplify["result"]["nodes_before"],
                    "nodes_after_simplify": simplify["result"]["nodes_after"]}
    artifacts = [a for stage, s in (("export", export), ("simplify", simplify)) if s
                 for a in _stage_files(stage, sidecars[stage])]
    artifacts += [a for p in sorted(precs)
                  for a in _stage_files(f"precision/{p}", sidecars["precision"][p])]
    artifacts += [[str(sidecars[k]), "audit"] for k in ("drift", "drift_md", "gate")
                  if k in sidecars and Path(sidecars[k]).is_file()]
    if gate := _read(sidecars.get("gate")):  # the baseline gate's verdict
        tags |= {"engineforge.gate": gate["status"],
                 "engineforge.gate.baseline": gate["baseline"]["label"][:500]}
        numbers["gate_regressions"] = gate["regressions"]
    for v, path in sorted((sidecars.get("localise") or {}).items()):  # localisation
        if (loc := (_read(path) or {}).get("result")) is None:
            continue
        artifacts.append([str(path), "audit/localise"])
        tags[f"engineforge.localise.{v}"] = loc["status"]
        if loc.get("first"):
            tags[f"engineforge.localise.{v}.first"] = (
                f"{loc['first']['node']} ({loc['first']['op_type']})")[:500]
            numbers[f"localise.{v}.first_drop_db"] = loc["first"]["drop_db"]
        if loc["status"] != "passes":
            numbers |= {f"localise.{v}.time_s": loc["time_s"],
                        f"localise.{v}.peak_mem_mb": loc["peak_mem_mb"]}
    # the model's report page and figures (stages/report.py; absent after failures); the
    # page embeds the figures: its hash in a tag makes a redrawn report a new record
    report = [p for p in (sidecars.get("report") or {}).values() if Path(p).is_file()]
    artifacts += [[str(p), "report"] for p in report]
    page = (sidecars.get("report") or {}).get("report.html")
    if page in report:
        tags["engineforge.report.sha256"] = sha256_file(page)
    parent = {
        "name": model, "tags": tags,
        "span": _span(export, simplify, *precs.values(),
                      *(_read(p) for p in sidecars["build"].values()),
                      *(_read(p) for p in sidecars["audit"].values()),
                      *(_read(p) for p in sidecars["bench"].values())),
        "params": _flat("", {"checkpoint": m["checkpoint"], "opset": m["opset"],
                             "precisions": ",".join(m["precisions"]),
                             "backends": ",".join(m["backends"]), "task": m["task"],
                             "tools": (export or {}).get("tools", {})
                             | (simplify or {}).get("tools", {})}, {}),
        "metrics": _metrics("", numbers, {}),
        "artifacts": artifacts,
    }
    children = []
    for (backend, precision, profile), build_path in sorted(sidecars["build"].items()):
        build = _read(build_path)
        if build is None:
            continue
        prec = precs.get(precision) or {}
        audit_path = sidecars["audit"].get((backend, precision))
        audit = (_read(audit_path) or {}).get("result", {})
        bench_path = sidecars["bench"].get((backend, precision, profile))
        bench = (_read(bench_path) or {}).get("result", {})
        baseline = (_read(sidecars["baseline"].get(profile)) or {}).get("result", {})
        metrics = _metrics("build", {k: v for k, v in build["result"].items()
                                     if k in ("build_time_s", "engine_bytes")}, {})
        metrics |= _metrics("onnx", {"bytes": (prec.get("result") or {}).get("bytes")}, {})
        for name, stats in (audit.get("outputs") or {}).items():
            metrics |= _metrics(f"drift.{name}", {k: v for k, v in stats.items()
                                                  if k != "abs_error_hist"}, {})
        if audit.get("task"):
            metrics |= _metrics("task", audit["task"], {})
        for which, pt in (bench.get("points") or {}).items():
            metrics |= _metrics(f"latency.{which}", {k: v for k, v in pt.items()
                                                     if k.endswith("_ms") or k in (
                                                         "cv", "throughput_per_s")}, {})
            base = (baseline.get("points") or {}).get(which)
            if base and pt.get("p50_ms"):
                metrics[f"speedup_vs_pytorch.{which}"] = base["p50_ms"] / pt["p50_ms"]
        repair = ((prec.get("result") or {}).get("extra") or {}).get("repair")
        if repair:  # a repaired variant: what it keeps in high precision
            metrics["repair.rounds"] = float(max(len(repair["rounds"]) - 1, 0))
        artifacts = _stage_files("build", build_path)
        artifacts += [[str(audit_path), "audit"]] if audit else []
        artifacts += [[str(bench_path), "bench"]] if bench else []
        children.append({
            "name": f"{model}/{precision}/{profile}/{backend}",
            "span": _span(build, _read(audit_path), _read(bench_path)),
            "tags": {"engineforge.model": model, "engineforge.kind": "engine",
                     "engineforge.backend": backend, "engineforge.precision": precision,
                     "engineforge.profile": profile,
                     "engineforge.fingerprint.precision": prec.get("fingerprint", "n/a"),
                     f"{CACHE_TAG}.build": build["fingerprint"],
                     "engineforge.audit": audit.get("status", "n/a"),
                     **({"engineforge.repair": repair["status"]} if repair else {}),
                     "engineforge.bench": bench.get("status", "n/a")},
            "params": _flat("", {"backend": backend, "precision": precision,
                                 "profile": profile, "device": build.get("device"),
                                 "precision_config": prec.get("config", {}).get("method"),
                                 "shapes": m["profiles"].get(profile),
                                 **({"repair": {"from": repair["from"], "excluded_nodes": ",".join(
                                     repair["excluded_nodes"])}} if repair else {}),
                                 "tools": build["tools"]}, {}),
            "metrics": metrics,
            "artifacts": artifacts,
        })
        # a runtime fallback (torch-inductor: the package did not load), from bench or build
        note = (((bench.get("points") or {}).get("opt") or {}).get("extra", {}).get("note")
                or build["result"].get("extra", {}).get("note"))
        if note:
            children[-1]["tags"]["engineforge.note"] = note[:500]
    if failures is not None:
        _mark_failures(model, parent, children, list(failures))
    record = {"experiment": experiment, "model": model, "parent": parent, "children": children}
    record["id"] = hashlib.sha256(canonical_json(record).encode()).hexdigest()[:32]
    return record


def _span(*sidecars) -> list[int] | None:
    """[start, end] in epoch ms of the work the sidecars record (None: none recorded)."""
    starts = [s["started_at"] for s in sidecars if s and "started_at" in s]
    ends = [s["finished_at"] for s in sidecars if s and "finished_at" in s]
    return [int(min(starts) * 1000), int(max(ends) * 1000)] if starts and ends else None


def _failure_tags(failures: list[dict]) -> dict:
    """``engineforge.failure.<job>`` = the one-line reason, ``....log`` = its log."""
    tags = {}
    for f in failures:
        tags[f"engineforge.failure.{f['job']}"] = redact(f["reason"])[:1000]
        tags[f"engineforge.failure.{f['job']}.log"] = str(f.get("log"))[:500]
    return tags


def _mark_failures(model: str, parent: dict, children: list[dict], failures: list[dict]):
    """Failed jobs in the record: every one on the parent (tags + failures.json, status
    FAILED); an engine's build, audit or bench failure on its child run too (a failed
    build is a FAILED child of its own)."""
    parent["status"] = "FAILED"
    parent["tags"] |= {"engineforge.status": "failed" if failures else "incomplete",
                       "engineforge.failed_jobs": str(len(failures)),
                       **_failure_tags(failures)}
    parent["texts"] = {"failures.json": json.dumps(failures, indent=2, sort_keys=True)}
    by_name = {c["name"]: c for c in children}
    for f in failures:
        if f.get("stage") not in ("build", "audit", "bench") or not f.get("backend"):
            continue
        names = [n for n, c in by_name.items()
                 if c["tags"]["engineforge.backend"] == f["backend"]
                 and c["tags"]["engineforge.precision"] == f.get("precision")
                 and f.get("profile") in (None, c["tags"]["engineforge.profile"])]
        if not names and f["stage"] == "build":
            name = f"{model}/{f.get('precision')}/{f.get('profile')}/{f['backend']}"
            by_name[name] = {"name": name, "params": {}, "metrics": {}, "artifacts": [],
                             "tags": {"engineforge.model": model, "engineforge.kind": "engine",
                                      "engineforge.backend": f["backend"],
                                      "engineforge.precision": f.get("precision"),
                                      "engineforge.profile": f.get("profile")}}
            children.append(by_name[name])
            names = [name]
        for n in names:
            by_name[n]["status"] = "FAILED"
            by_name[n]["tags"] |= _failure_tags([f])
    children.sort(key=lambda c: c["name"])


# The MLflow 3 UI opens an untagged experiment in its GenAI view ("Traces: 0"); this tag
# (the one the UI reads) makes it open on the runs table.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def upload(record: dict, uri: str | None = None) -> dict:
    """Log a record to MLflow; returns {"parent": run_id, "children": {name: run_id}}."""
    from mlflow.tracking import MlflowClient

    quick_failing_http()
    client = MlflowClient(tracking_uri=uri or tracking_uri())
    exp = client.get_experiment_by_name(record["experiment"])
    exp_id = exp.experiment_id if exp else client.create_experiment(record["experiment"])
    if not exp or exp.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
        client.set_experiment_tag(exp_id, *EXPERIMENT_KIND)
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
    start, end = run.get("span") or (None, None)
    r = client.create_run(exp_id, start_time=start, run_name=run["name"], tags=tags)
    rid = r.info.run_id
    ts = end or int(time.time() * 1000)
    client.log_batch(rid, metrics=[Metric(k, v, ts, 0) for k, v in run["metrics"].items()],
                     params=[Param(k, v) for k, v in run["params"].items()], tags=[])
    for path, artifact_dir in run["artifacts"]:
        if Path(path).is_file():
            client.log_artifact(rid, path, artifact_dir)
    for name, text in (run.get("texts") or {}).items():
        client.log_text(rid, text, name)
    client.set_terminated(rid, run.get("status", "FINISHED"), end_time=end)
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
    gate: bool = False                # the model has a baseline gate (gate.json)


def settings(m: dict, w: dict, experiment: str, builds: dict[str, list[str]]) -> Settings:
    keys = ("checkpoint", "opset", "precisions", "backends", "task", "profiles")
    from engineforge.settings import variants

    model = {k: m[k] for k in keys} | {"precisions": variants(m)}  # repaired variants too
    return Settings(experiment=experiment, model=model, builds=builds,
                    gate=bool(m.get("gate")))


def model_outputs(layout, model: str, s: Settings) -> dict:
    return layout.model_outputs(model, s.model["precisions"], s.builds, list(s.model["profiles"]),
                                gate=s.gate)


def run(job) -> None:
    from engineforge.layout import Layout

    s: Settings = job.settings
    sidecars = model_outputs(Layout(job.artifacts), job.model, s)
    record = build_record(job.model, s.model, s.experiment, sidecars)
    track(record, job.outputs["track"], job.artifacts)


def track(record: dict, out: Path, artifacts: str | Path, extra: dict | None = None,
          try_upload: bool = True) -> dict:
    """Upload, or keep the record pending when the server cannot be reached (or
    ``try_upload`` is False: it was not, a moment ago). ``extra``: more fields for ``out``
    (a partial record's failures)."""
    pending = pending_dir(artifacts) / f"{record['model']}-{record['id']}.json"
    write_json(pending, record)
    uri = tracking_uri()
    try:
        if not try_upload:
            raise ConnectionError(f"{redact(uri)} was unreachable for an earlier record")
        ids = upload(record, uri)
        pending.unlink()
        status = {"status": "logged", "uri": redact(uri), **ids}
    except Exception as err:  # noqa: BLE001 - tracking must never fail the build
        first = redact((str(err).strip().splitlines() or [type(err).__name__])[0])
        log.warning("MLflow unreachable (%s); record kept at %s; run `engineforge sync`",
                    first[:200], pending)
        status = {"status": "pending", "uri": redact(uri), "pending": str(pending),
                  "error": first[:300]}
    write_json(out, {"record_id": record["id"], **status, **(extra or {})})
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

