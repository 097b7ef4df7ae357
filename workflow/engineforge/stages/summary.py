"""Report — the closing table: per model × precision × backend, audit verdict, drift,
latency, speedup, sizes; which quantizer made each int8/fp8 graph and which provider ran
(ONNX Runtime). Reads typed results from the sidecars the layout names.

After a run with failed jobs (``failures.finalise``) the same table holds every result
that exists, a ``failed`` column names the failed stages behind a row's missing results,
and a "Failed jobs" section lists each failure (model, stage, variant, reason, log).

Below the table: the localisation of every variant that failed its audit (first node, worst
nodes with op type and drop), and per repaired variant the trade-off against the plain one
(verdict and worst metric before -> after, excluded nodes, latency per backend and profile,
ONNX size). ``summary.json`` holds the same data (``localisations``, ``repairs``)."""

from __future__ import annotations

from pathlib import Path

from engineforge import failures as efailures
from engineforge.backends import backend_class
from engineforge.layout import Layout
from engineforge.results import (
    AuditResult,
    BenchResult,
    BuildResult,
    Localisation,
    PrecisionResult,
)
from engineforge.settings import Section, base_precision, is_repaired
from engineforge.sidecar import read_json, write_json
from engineforge.stages import gate

ISOLATED = False
TOOLS = ()


class Settings(Section):
    models: dict[str, dict]          # model -> {precisions, backends (usable), profile, gate}
    skipped_backends: dict[str, str]  # backend -> "skipped: why (how)"


def _fmt(v, spec=".3g"):
    return "—" if v is None else format(v, spec) if isinstance(v, (int, float)) else str(v)


def _result(path: Path | str, kind):
    path = Path(path)
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
                if base_precision(precision) not in cls.precisions:
                    continue
                graph = prec
                if q := cls.quantizer(precision):  # the backend's own quantizer's graph
                    graph = _result(Path(layout.quantized("precision.json", q, model,
                                                          precision)), PrecisionResult)
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
                    row["backend_note"] = b.extra.get("note")  # e.g. a runtime fallback
                r = _result(Path(layout.bench(model, backend, precision, first)), BenchResult)
                if r:
                    opt = r.points.get("opt")
                    if opt:
                        row["p50_ms"] = opt.p50_ms
                        row["backend_note"] = opt.extra.get("note") or row.get("backend_note")
                        base_ms = (base_opt.extra.get("cuda_fp32_p50_ms")
                                   if opt.extra.get("device") == "cuda" else base_opt.p50_ms
                                   ) if base_opt else None  # eager on the engine's device
                        if base_ms:
                            row["speedup"] = base_ms / opt.p50_ms
                        ran = opt.extra.get("providers")
                        if ran:  # the provider that actually ran (ONNX Runtime)
                            row["provider"] = ran[0].removesuffix("ExecutionProvider")
                        why = cls.note(base_precision(precision), opt.extra)
                        if why:
                            row["speedup_note"] = why
                    elif r.reason:
                        row["bench"] = r.reason
                failed = sorted({f.get("stage") or "?" for f in failures or ()
                                 if efailures.concerns(f, model, precision, backend)})
                if failed:
                    row["failed"] = ", ".join(failed)
                rows.append(row)
    _note_slower_than_fp32(rows)
    gates = {model: read_json(p) for model, m in s.models.items()
             if m.get("gate") and (p := Path(layout.gate("gate.json", model))).exists()}
    return {"rows": rows, "gates": gates, "skipped_backends": dict(s.skipped_backends),
            "complete": failures is None, "failures": list(failures or []),
            "localisations": localisations(layout, s), "repairs": repairs(layout, s)}


SLOWER = 1.10  # a variant this much slower than fp32 (beyond bench noise) gets a note
SLOWER_NOTE = ("slower than the model's fp32 on the same backend (p50 column): no speedup "
               "from this variant on this model and device")


def _note_slower_than_fp32(rows: list[dict]) -> None:
    """A variant at least ``SLOWER`` times its model's fp32 latency on the same backend gets
    a note, unless its backend said why already (ORT's int8 loses to fp32 on CPU for
    googlenet, squeezenet and shufflenet: the Q/DQ work outweighs the int8 kernels)."""
    fp32 = {(r["model"], r["backend"]): r["p50_ms"] for r in rows
            if r["precision"] == "fp32" and r.get("p50_ms")}
    for r in rows:
        base = fp32.get((r["model"], r["backend"]))
        if (r["precision"] != "fp32" and base and r.get("p50_ms")
                and r["p50_ms"] >= SLOWER * base and not r.get("speedup_note")):
            r["speedup_note"] = SLOWER_NOTE


def _node(d) -> dict:
    return {"node": d.node, "op_type": d.op_type, "drop_db": d.drop_db,
            "snr_out_db": d.snr_out_db}


def localisations(layout: Layout, s: Settings, worst: int = 3) -> list[dict]:
    """The localisation of every variant that did not pass its audits."""
    out = []
    for model, m in s.models.items():
        for v in m["precisions"]:
            loc = _result(Path(layout.localise(model, v)), Localisation) if v != "fp32" else None
            if loc is None or loc.status == "passes" or not loc.audits:
                continue  # passed, or no ONNX-graph audit to localise (torch-inductor only)
            out.append({"model": model, "precision": v, "status": loc.status,
                        "reason": loc.reason, "trigger": loc.trigger,
                        "first": loc.first and _node(loc.first),
                        "worst": [_node(d) for d in loc.worst[:worst] if d.drop_db > 0],
                        "time_s": loc.time_s, "peak_mem_mb": loc.peak_mem_mb})
    return out


def _verdict(a: AuditResult | None) -> dict | None:
    """The verdict that counts (emulated where the runtime could not run it) and the
    worst output's cosine / SNR / max_abs."""
    if a is None:
        return None
    m = a.emulated if a.status == "not_runnable" and a.emulated else a
    outs = m.outputs.values()
    return {"audit": m.status, "cosine": min((o.cosine for o in outs), default=None),
            "snr_db": min((o.snr_db for o in outs if o.snr_db is not None), default=None),
            "max_abs": max((o.max_abs for o in outs), default=None)}


def repairs(layout: Layout, s: Settings) -> list[dict]:
    """Per repaired variant: plain vs repaired verdict, metrics, latency and size."""
    out = []
    for model, m in s.models.items():
        for v in (v for v in m["precisions"] if is_repaired(v)):
            plain = base_precision(v)
            prec = {p: _result(Path(layout.precision("precision.json", model, p)),
                               PrecisionResult) for p in (plain, v)}
            rep = (prec[v].extra.get("repair") or {}) if prec[v] else {}
            entry = {"model": model, "precision": v, "from": plain,
                     "status": rep.get("status"), "excluded_nodes": rep.get("excluded_nodes"),
                     "rounds": max(len(rep.get("rounds", [])) - 1, 0),
                     "onnx_mib": {p: prec[p] and prec[p].bytes / 2**20 for p in (plain, v)},
                     "backends": {}}
            for backend in m["backends"]:
                if plain not in backend_class(backend).precisions:
                    continue
                side = {p: _verdict(_result(Path(layout.audit(model, backend, p)), AuditResult))
                        for p in (plain, v)}
                latency = {}
                for prof in m.get("profiles") or [m["profile"]]:
                    p50, mib = {}, {}
                    for p in (plain, v):
                        r = _result(Path(layout.bench(model, backend, p, prof)), BenchResult)
                        opt = r.points.get("opt") if r else None
                        p50[p] = opt.p50_ms if opt else None
                        b = _result(Path(layout.build(backend, model, p, prof)), BuildResult)
                        mib[p] = b.engine_bytes / 2**20 if b else None
                    latency[prof] = {"plain_p50_ms": p50[plain], "repaired_p50_ms": p50[v],
                                     "ratio": p50[v] / p50[plain] if p50[plain] and p50[v]
                                     else None, "plain_engine_mib": mib[plain],
                                     "repaired_engine_mib": mib[v]}
                entry["backends"][backend] = {"plain": side[plain], "repaired": side[v],
                                              "latency": latency}
            out.append(entry)
    return out


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
             "Latency: p50 at the first profile's opt shape; speedup vs eager PyTorch fp32 on the "
             "same shapes and device (CPU: same threads).", "", head, "|" + "---|" * len(columns)]
    for r in summary["rows"]:
        cells = []
        for col, spec in columns:
            v = r.get(col)
            if col == "backend" and r.get("backend_note"):
                v = f"{v} {note(r['backend_note'])[4:]}"  # "torch-inductor [3]"
            elif col == "audit" and isinstance(v, str) and v.startswith("not runnable"):
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
    lines += localisation_markdown(summary.get("localisations") or [])
    lines += repair_markdown(summary.get("repairs") or [])
    lines += gate_section(summary.get("gates") or {})
    if summary["skipped_backends"]:
        lines += ["", "Skipped backends:"]
        lines += [f"- {line}" for line in summary["skipped_backends"].values()]
    return "\n".join(lines) + "\n" + efailures.markdown(summary.get("failures") or [])


def _where(d: dict | None) -> str:
    return "—" if not d else f"`{d['node']}` ({d['op_type']}, drop {d['drop_db']:.1f} dB)"


def localisation_markdown(locs: list[dict]) -> list[str]:
    if not locs:
        return []
    lines = ["", "Where the drift enters (variants that failed their audit; "
                 "docs/drift-audit.md):", "",
             "| model | precision | status | first node | worst nodes |", "|---|---|---|---|---|"]
    for loc in locs:
        worst = "; ".join(_where(d) for d in loc["worst"]) or loc.get("reason") or "—"
        lines.append(f"| {loc['model']} | {loc['precision']} | {loc['status']} | "
                     f"{_where(loc['first'])} | {worst} |")
    return lines


def _metric(v: dict | None) -> str:
    if not v:
        return "—"
    return (f"{v['audit']} (cosine {_fmt(v['cosine'], '.6f')}, SNR {_fmt(v['snr_db'], '.1f')}"
            f" dB, max_abs {_fmt(v['max_abs'])})")


def repair_markdown(reps: list[dict]) -> list[str]:
    """One trade-off block per repaired variant."""
    lines = []
    for r in reps:
        sizes = r["onnx_mib"]
        kept = ", ".join(f"`{n}`" for n in r["excluded_nodes"] or []) or "none"
        lines += ["", f"Repair {r['model']} {r['from']} -> {r['precision']}: "
                      f"{r['status'] or 'not made'}, {r['rounds']} round(s), kept in high "
                      f"precision: {kept}; ONNX {_fmt(sizes[r['from']])} -> "
                      f"{_fmt(sizes[r['precision']])} MiB", "",
                  "| backend | plain | repaired | profile | p50 ms plain -> repaired | "
                  "engine MiB plain -> repaired |", "|---|---|---|---|---|---|"]
        for backend, b in r["backends"].items():
            for prof, lat in b["latency"].items():
                lines.append(f"| {backend} | {_metric(b['plain'])} | {_metric(b['repaired'])} "
                             f"| {prof} | {_fmt(lat['plain_p50_ms'], '.3f')} -> "
                             f"{_fmt(lat['repaired_p50_ms'], '.3f')} | "
                             f"{_fmt(lat['plain_engine_mib'])} -> "
                             f"{_fmt(lat['repaired_engine_mib'])} |")
    return lines


def gate_section(gates: dict) -> list[str]:
    """"Baseline gate": per model the verdict vs its baseline, and each regressed metric."""
    if not gates:
        return []
    lines = ["", "## Baseline gate", ""]
    for model, g in gates.items():
        lines.append(f"- {model}: **{g['status']}** vs {g['baseline']['label']} "
                     f"({g['compared']} metrics compared, {g['regressions']} regressed, "
                     f"{len(g['missing'])} on one side only)")
        lines += [f"  - {gate.regression_line(r, 'baseline')}" for r in g["rows"]
                  if r["regressed"]]
    return lines


def run(job) -> None:
    summary = collect(job.inputs_layout, job.settings)
    write_json(job.outputs["json"], summary)
    job.outputs["md"].write_text(markdown(summary))
