"""Failed jobs are a result: their records, and the end of a run that had failures.

The runner writes one JSON record per failed job, ``<artifacts>/_failures/<job>.json``
(model, stage, variant, the one-line reason, the log path) and removes it when the job
succeeds; the run clears them all when it starts, so only this run's failures are listed.

When a run ends with failures, :func:`finalise` (the workflow's ``onerror`` handler, after
every job that could run has run) reports everything that succeeded: the drift matrix of
each model whose drift job could not run (rows from the audits that exist, plus the failed
and not-run audits), ``summary.md``/``summary.json`` with a "Failed jobs" section, and an
MLflow record per model that could not be tracked (what succeeded, plus its failures; the
parent run ends FAILED). Files it writes at rule-output paths get the modification time
1 s past the epoch (0 would read as "no time" to Snakemake): older than their inputs, so the
next run has Snakemake make them again instead of trusting them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from engineforge.layout import Layout, files_of
from engineforge.settings import base_precision
from engineforge.sidecar import read_json, write_json

VARIANT = ("precision", "backend", "profile")
UNTRUSTED_MTIME = 1  # seconds since the epoch: older than any input


def job_id(job) -> str:
    return "-".join([job.stage, *job.wildcards.values()])


def _dir(artifacts) -> Path:
    return Path(Layout(str(artifacts)).failures_dir())


def record(job, reason: str) -> Path:
    """Write the failure record of ``job`` (``reason``: its one-line error)."""
    from engineforge.redaction import redact

    w = job.wildcards
    rec = {"job": job_id(job), "model": job.model, "stage": job.stage,
           **{k: w.get(k) for k in VARIANT}, "reason": redact(" ".join(reason.split())),
           "log": str(job.log)}
    path = _dir(job.artifacts) / f"{rec['job']}.json"
    write_json(path, rec)
    return path


def record_unfinished(job) -> Path:
    """Written as the job starts and replaced by its outcome: a job killed from outside
    (``scancel``, a node that died, the OOM killer, ``kill -9``) leaves this line behind, so
    the end of the run lists it like any other failure."""
    import socket

    from engineforge.errors import EngineforgeError

    slurm = os.environ.get("SLURM_JOB_ID")
    where = (f"Slurm job {slurm} on {socket.gethostname()}; `sacct -j {slurm}` says why"
             if slurm else f"pid {os.getpid()} on {socket.gethostname()}")
    err = EngineforgeError(f"the job was stopped before it finished ({where}); nothing it "
                           "wrote is trusted.", model=job.model,
                           fix="run again; if it recurs, raise its resources (mem_mb, "
                               "time_limits) or check the node")
    err.stage = job.stage
    return record(job, str(err))


def clear(job) -> None:
    """The job succeeded: its failure record (of an earlier run) is gone."""
    (_dir(job.artifacts) / f"{job_id(job)}.json").unlink(missing_ok=True)


def clear_all(artifacts) -> None:
    """A run starts: failures of earlier runs are not this run's (nor the one-line .txt
    records of older engineforge versions)."""
    for path in _dir(artifacts).glob("*.*"):
        if path.suffix in (".json", ".txt"):
            path.unlink(missing_ok=True)


def load(artifacts) -> list[dict]:
    """Every failure record, sorted by model, stage and variant."""
    out = []
    for path in sorted(_dir(artifacts).glob("*.json")):
        try:
            out.append(read_json(path))
        except (OSError, ValueError):
            continue  # a record being replaced; the job is listed by Snakemake anyway
    return sorted(out, key=lambda f: tuple(str(f.get(k) or "") for k in
                                           ("model", "stage", *VARIANT, "job")))


def variant(f: dict) -> str:
    return "/".join(str(f[k]) for k in VARIANT if f.get(k)) or "—"


def concerns(f: dict, model: str, precision: str | None = None,
             backend: str | None = None) -> bool:
    """Whether failure ``f`` explains a missing result of ``model`` (× precision × backend):
    its own job, or a job upstream of it (export, simplify, a precision, a build)."""
    if f.get("model") != model:
        return False
    # a repaired variant is made from its plain one (its localisation): upstream too
    plain = base_precision(precision) if precision else None
    return all(f.get(k) in (None, v, *extra) for k, v, extra in (
        ("precision", precision, [plain]), ("backend", backend, [])) if v is not None)


def markdown(failures: list[dict]) -> str:
    """The "Failed jobs" section: one row per failed job."""
    if not failures:
        return ""
    lines = ["", "## Failed jobs", "", "| model | stage | variant | reason | log |",
             "|---|---|---|---|---|"]
    for f in failures:
        reason = str(f.get("reason", "")).replace("|", "\\|")
        lines.append(f"| {f.get('model') or '—'} | {f.get('stage') or f['job']} | "
                     f"{variant(f)} | {reason} | {f.get('log') or '—'} |")
    return "\n".join(lines) + "\n"


# -- the end of a run with failures ----------------------------------------------------------
def _stale(out: str, inputs: list[str]) -> bool:
    """``out`` was not made from ``inputs`` as they are: missing, an input missing (its job
    failed or did not run), or an input newer."""
    out = Path(out)
    if not out.is_file():
        return True
    mtime = out.stat().st_mtime
    return any(not Path(i).is_file() or Path(i).stat().st_mtime > mtime for i in inputs)


def _untrusted(*paths) -> None:
    """Snakemake must make these again next run: older than any input they have."""
    for p in paths:
        if Path(p).is_file():
            os.utime(p, (UNTRUSTED_MTIME, UNTRUSTED_MTIME))


def _drift(layout: Layout, model: str, audits: dict, failures: list[dict]) -> None:
    """The drift matrix from the audits that exist; failed and not-run audits as rows."""
    from engineforge.stages import drift

    done = [p for p in audits.values() if Path(p).is_file()]
    rows = drift.rows_of(done)
    for (backend, precision), path in audits.items():
        if Path(path).is_file():
            continue
        own = [f for f in failures if f.get("stage") == "audit"
               and concerns(f, model, precision, backend)]
        upstream = [f for f in failures if concerns(f, model, precision, backend)]
        row = {"precision": precision, "backend": backend,
               "status": "failed" if own else "not run"}
        if own or upstream:
            row["error"] = (own or upstream)[0]["reason"]
            row["failed_job"] = (own or upstream)[0]["job"]
        rows.append(row)
    md, js = layout.drift("md", model), layout.drift("json", model)
    write_json(js, {"model": model, "reference": drift.REFERENCE, "rows": rows,
                    "complete": False})
    Path(md).write_text(drift.markdown(model, rows) + markdown(
        [f for f in failures if f.get("model") == model]))
    _untrusted(md, js)


def _track(layout: Layout, model: str, settings, outputs: dict, failures: list[dict],
           try_upload: bool) -> dict:
    from engineforge.stages import track

    mine = [f for f in failures if f.get("model") == model]
    record = track.build_record(model, settings.model, settings.experiment, outputs, mine)
    out = layout.track(model)
    status = track.track(record, Path(out), layout.root, try_upload=try_upload,
                         extra={"complete": False, "failed_jobs": [f["job"] for f in mine]})
    _untrusted(out)
    return status


def finalise(artifacts: str, summary_settings, track_settings: dict) -> list[dict]:
    """Write what a run with failures can still report; print the summary and the
    failures. ``summary_settings``: the summary rule's settings; ``track_settings``: model
    -> the track rule's settings. Never raises: a problem here is one line."""
    layout = Layout(str(artifacts))
    failures = load(artifacts)
    try:
        _finalise(layout, failures, summary_settings, track_settings)
    except Exception as err:  # noqa: BLE001 - the failures themselves are still listed
        from engineforge.redaction import redact

        first = (str(err).strip().splitlines() or [""])[0][:300]
        print(f"engineforge: could not write the partial summary: {type(err).__name__}: "
              f"{redact(first)}", file=sys.stderr)
    print_failures(failures, layout)
    return failures


def _finalise(layout: Layout, failures, summary_settings, track_settings) -> None:
    from engineforge.stages import summary, track

    outputs = {m: track.model_outputs(layout, m, s) for m, s in track_settings.items()}
    track_stale = {m: _stale(layout.track(m), files_of(o)) for m, o in outputs.items()}
    summary_inputs = [f for m, o in outputs.items() for f in
                      [layout.drift("json", m), layout.track(m), *files_of(o["bench"]),
                       *files_of(o["baseline"])]]
    summary_stale = _stale(layout.summary("md"), summary_inputs)
    for m, o in outputs.items():
        if _stale(o["drift"], files_of(o["audit"])):
            _drift(layout, m, o["audit"], failures)
    _report(layout, outputs, track_settings, failures)
    reachable = True  # after one failed upload the others wait too (a Ctrl-C ends here)
    for m, o in outputs.items():
        if track_stale[m]:
            status = _track(layout, m, track_settings[m], o, failures, reachable)
            if status["status"] == "pending":
                reachable = False
                print(f"engineforge: MLflow record of {m} kept pending "
                      f"({status['pending']}); run `engineforge sync`", file=sys.stderr)
    if summary_stale:
        result = summary.collect(layout, summary_settings, failures)
        write_json(layout.summary("json"), result)
        Path(layout.summary("md")).write_text(summary.markdown(result))
        _untrusted(layout.summary("json"), layout.summary("md"))
    if Path(layout.summary("md")).is_file():
        print(Path(layout.summary("md")).read_text())


def _report(layout: Layout, outputs: dict, track_settings: dict, failures) -> None:
    """The report from what exists: a model's page where its report job did not run (its
    partial MLflow record then holds it), and the whole page with the failed jobs."""
    from engineforge.stages import report

    try:
        for m, o in outputs.items():
            out = {role: Path(layout.report(name, m)) for role, name in report.OUTPUTS.items()}
            if _stale(out["section"], files_of({k: v for k, v in o.items()
                                                if k not in ("engine", "report")})):
                report.write_model(layout, m, report.settings_of(track_settings[m]), out)
                _untrusted(*out.values())
        report.write_whole(layout, list(outputs), Path(layout.report_html()), failures)
        _untrusted(layout.report_html())
    except Exception as err:  # noqa: BLE001 - the summary and records still follow
        print(f"engineforge: could not write the partial report: {type(err).__name__}: "
              f"{(str(err).strip().splitlines() or [''])[0][:300]}", file=sys.stderr)


def print_failures(failures: list[dict], layout: Layout) -> None:
    if not failures:
        return
    print(f"\nengineforge: {len(failures)} job(s) failed; everything else is reported in "
          f"{layout.summary('md')}:", file=sys.stderr)
    for f in failures:
        where = " ".join(str(x) for x in (f.get("model"), f.get("stage"), variant(f))
                         if x and x != "—")
        log = f" (log: {f['log']})" if f.get("log") and f["log"] not in f["reason"] else ""
        print(f"  - {where or f['job']}: {f.get('reason')}{log}", file=sys.stderr)
