"""Stage 7 — MLflow lineage: one parent run per model, a child per precision × profile × backend.

The track job assembles a *record* from the model's sidecars (:func:`build_record`: runs
with tags, params, metrics and artifact paths), writes it to ``<artifacts>/_tracking/pending``
first, then uploads it (``mlflow_store.upload``, which signs every cache entry it sends). If
the tracking server is unreachable the record stays pending and ``engineforge sync`` uploads
it later. This is the only stage that uploads.

A model with failed jobs gets a record of what succeeded: its parent run (status FAILED)
lists every failure in tags and a ``failures.json`` artifact; a failed engine build is a
FAILED child run of its own. Runs carry where the work ran (``engineforge.ran.*``: host and
Slurm job of the sidecars' ``ran``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from engineforge import signing
from engineforge.mlflow_store import CACHE_TAG, pending_dir, tracking_uri, upload
from engineforge.redaction import redact
from engineforge.settings import Section
from engineforge.sidecar import canonical_json, read_json, sha256_file, write_json

log = logging.getLogger(__name__)

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
    s: Settings = job.settings
    sidecars = model_outputs(job.inputs_layout, job.model, s)
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
    if try_upload:
        signing.signing_key()  # a key problem fails the job in one line, not as "unreachable"
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


def _stage_files(artifact_dir: str, sidecar_path) -> list[list[str]]:
    """A stage's sidecar and its output files, under one artifact directory."""
    side = read_json(sidecar_path)
    files = [str(sidecar_path)] + [o["path"] for o in side["outputs"].values()]
    return [[f, artifact_dir] for f in files]


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
    tags = {"engineforge.model": model, "engineforge.kind": "model", **_ran_tags("", export)}
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
        audit_side = _read(audit_path)
        audit = (audit_side or {}).get("result", {})
        bench_path = sidecars["bench"].get((backend, precision, profile))
        bench_side = _read(bench_path)
        bench = (bench_side or {}).get("result", {})
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
            "span": _span(build, audit_side, bench_side),
            "tags": {"engineforge.model": model, "engineforge.kind": "engine",
                     "engineforge.backend": backend, "engineforge.precision": precision,
                     "engineforge.profile": profile,
                     "engineforge.fingerprint.precision": prec.get("fingerprint", "n/a"),
                     f"{CACHE_TAG}.build": build["fingerprint"],
                     "engineforge.audit": audit.get("status", "n/a"),
                     **({"engineforge.repair": repair["status"]} if repair else {}),
                     "engineforge.bench": bench.get("status", "n/a"),
                     **_ran_tags("", build), **_ran_tags(".audit", audit_side),
                     **_ran_tags(".bench", bench_side)},
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


def _ran_tags(infix: str, sidecar: dict | None) -> dict:
    """``engineforge.ran<infix>.host`` / ``.slurm_job_id``: where a sidecar's work ran."""
    ran = (sidecar or {}).get("ran") or {}
    return {f"engineforge.ran{infix}.{k}": str(ran[k])[:250]
            for k in ("host", "slurm_job_id") if ran.get(k)}


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
