"""Report — the closing table: per model × precision × backend, audit verdict, drift,
latency, speedup, sizes; which quantizer made each int8/fp8 graph and which provider ran
(ONNX Runtime). Reads typed results from the sidecars the layout names.

After a run with failed jobs (``failures.finalise``) the same table holds every result
that exists, a ``failed`` column names the failed stages behind a row's missing results,
and a "Failed jobs" section lists each failure (model, stage, variant, reason, log)."""

from __future__ import annotations

from pathlib import Path

from engineforge import failures as efailures
from engineforge.backends import backend_class
from engineforge.layout import Layout
from engineforge.results import AuditResult, BenchResult, BuildResult, PrecisionResult
from engineforge.settings import Section
from engineforge.sidecar import read_json, write_json

ISOLATED = False
TOOLS = ()


class Settings(Section):
    models: dict[str, dict]          # model -> {precisions, backends (usable), profile}
    skipped_backends: dict[str, str]  # backend -> "skipped: why (how)"


def _fmt(v, spec=".3g"):
    return "—" if v is None else format(v, spec) if isinstance(v, (int, float)) else str(v)


def _result(path: Path, kind):
    return kind.model_validate(read_json(path)["result"]) if path.exists() else None


def collect(layout: Layout, s: Settings, failures: list[dict] | None = None) -> dict:
    """Rows (one per model × precision × backend) from the sidecars. ``failures``: the
    failed jobs of a run that had some (None: a complete run)."""
    rows = []
    for model, m in s.models.items():
        first = m["profile"]
        baseline = _result(Path(layout.baseline(model, first)), BenchResult)
        base_opt = baseline.points.get("opt") if baseline else None
        for precision in m["precisions"]:
            prec = _result(Path(layout.precision("precision.json", model, precision)),
                           PrecisionResult)
            for backend in m["backends"]:
                cls = backend_class(backend)
                if precision not in cls.precisions:
                    continue
                graph = prec
                if precision in cls.quantizers:  # the backend's own quantizer's graph
                    graph = _result(Path(layout.quantized(
                        "precision.json", cls.quantizers[precision], model, precision)),
                        PrecisionResult)
                row = {"model": model, "precision": precision, "backend": backend,
                       "onnx_mib": graph and graph.bytes / 2**20}
                if graph and graph.method in QUANTIZERS:
                    row["quantizer"] = graph.extra.get("quantizer") or QUANTIZERS[graph.method]
                a = _result(Path(layout.audit(model, backend, precision)), AuditResult)
                if a:
                    row["audit"] = a.status if a.status != "not_runnable" else a.reason
                    if a.emulated and a.emulated.outputs:  # figures by the ONNX spec
                        a = a.emulated
                        row["audit"] = f"{a.status} (emulated)"
                    if a.status == "fail" and a.reason:  # why (NaN outputs, a tolerance)
                        row["audit_reason"] = a.reason
                    if a.outputs:
                        row["max_abs"] = max(o.max_abs for o in a.outputs.values())
                        row["cosine"] = min(o.cosine for o in a.outputs.values())
                    if a.task:
                        row["accuracy"] = a.task.accuracy
                b = _result(Path(layout.build(backend, model, precision, first)), BuildResult)
                if b:
                    row["engine_mib"] = b.engine_bytes / 2**20
                    row["build_s"] = b.build_time_s
                r = _result(Path(layout.bench(model, backend, precision, first)), BenchResult)
                if r:
                    opt = r.points.get("opt")
                    if opt:
                        row["p50_ms"] = opt.p50_ms
                        if base_opt:
                            row["speedup"] = base_opt.p50_ms / opt.p50_ms
                        ran = opt.extra.get("providers")
                        if ran:  # the provider that actually ran (ONNX Runtime)
                            row["provider"] = ran[0].removesuffix("ExecutionProvider")
                        note = getattr(cls, "note", None)
                        if note and (why := note(precision, ran[0] if ran else None)):
                            row["speedup_note"] = why
                    elif r.reason:
                        row["bench"] = r.reason
                failed = sorted({f.get("stage") or "?" for f in failures or ()
                                 if efailures.concerns(f, model, precision, backend)})
                if failed:
                    row["failed"] = ", ".join(failed)
                rows.append(row)
    return {"rows": rows, "skipped_backends": dict(s.skipped_backends),
            "complete": failures is None, "failures": list(failures or [])}


# PrecisionResult.method -> who made a quantized graph (the sidecar may say more)
QUANTIZERS = {"qdq": "ModelOpt Q/DQ", "ort_qdq": "onnxruntime quantize_static"}
COLUMNS = [("model", None), ("precision", None), ("backend", None), ("audit", None),
           ("max_abs", ".3g"), ("cosine", ".6f"), ("accuracy", ".4f"), ("p50_ms", ".3f"),
           ("speedup", ".2f"), ("onnx_mib", ".2f"), ("engine_mib", ".2f"), ("build_s", ".2f")]


def markdown(summary: dict) -> str:
    """One row per model × precision × backend; long reasons become numbered notes."""
    notes: list[str] = []

    def note(reason: str) -> str:
        if reason not in notes:
            notes.append(reason)
        return f"n/a [{notes.index(reason) + 1}]"

    optional = [("quantizer", None), ("provider", None), ("failed", None)]
    columns = COLUMNS + [c for c in optional if any(r.get(c[0]) for r in summary["rows"])]
    head = "| " + " | ".join(c for c, _ in columns) + " |"
    lines = ["# engineforge summary", "",
             "Latency: p50 at the first profile's opt shape; speedup vs eager PyTorch on the "
             "same shapes and threads.", "", head, "|" + "---|" * len(columns)]
    for r in summary["rows"]:
        cells = []
        for col, spec in columns:
            v = r.get(col)
            if col == "audit" and isinstance(v, str) and v.startswith("not runnable"):
                v = note(v)
            elif col == "audit" and r.get("audit_reason"):
                v = f"{v} {note(r['audit_reason'])[4:]}"  # "fail [2]"
            elif col == "audit" and v is None and r.get("failed"):
                v = "failed" if "audit" in r["failed"].split(", ") else "not run"
            elif col == "p50_ms" and v is None and r.get("bench"):
                v = note(r["bench"])
            elif (r.get("speedup_note") and v is not None
                  and col == ("speedup" if r.get("speedup") is not None else "p50_ms")):
                v = f"{v:{spec}} {note(r['speedup_note'])[4:]}"  # "0.95 [3]"
            cells.append(_fmt(v, spec) if spec else _fmt(v))
        lines.append("| " + " | ".join(cells) + " |")
    if notes:
        lines += ["", "Notes:"] + [f"{i}. {n}" for i, n in enumerate(notes, 1)]
    if summary["skipped_backends"]:
        lines += ["", "Skipped backends:"]
        lines += [f"- {line}" for line in summary["skipped_backends"].values()]
    return "\n".join(lines) + "\n" + efailures.markdown(summary.get("failures") or [])


def run(job) -> None:
    summary = collect(Layout(job.artifacts), job.settings)
    write_json(job.outputs["json"], summary)
    job.outputs["md"].write_text(markdown(summary))
