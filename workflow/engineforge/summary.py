"""The closing table: per model × precision, audit verdict, drift, latency, speedup, sizes."""

from __future__ import annotations

from pathlib import Path

from engineforge.sidecar import atomic_path, read_json, write_json


def _fmt(v, spec=".3g"):
    return "—" if v is None else format(v, spec) if isinstance(v, (int, float)) else str(v)


def collect(artifacts: Path, models: dict, backends: dict) -> dict:
    """Read sidecars under ``artifacts`` into rows (one per model × precision × backend)."""
    rows = []
    for model, m in models.items():
        base = artifacts / model
        first = next(iter(m["profiles"]))
        baseline = read_json(base / "bench" / "pytorch" / f"{first}.json")["result"]
        for precision in m["precisions"]:
            prec_path = base / "precision" / precision / "precision.json"
            prec = read_json(prec_path)["result"] if prec_path.exists() else None
            for backend in m["backends"]:
                if not backends[backend]["ok"]:
                    continue
                row = {"model": model, "precision": precision, "backend": backend,
                       "onnx_mib": prec and prec["bytes"] / 2**20}
                audit_path = base / "audit" / backend / f"{precision}.json"
                if audit_path.exists():
                    a = read_json(audit_path)["result"]
                    row["audit"] = a["status"] if a["status"] != "not_runnable" else a["reason"]
                    if a.get("emulated", {}).get("outputs"):  # figures by the ONNX spec
                        a = a["emulated"]
                        row["audit"] = f"{a['status']} (emulated)"
                    outs = a.get("outputs") or {}
                    if outs:
                        row["max_abs"] = max(o["max_abs"] for o in outs.values())
                        row["cosine"] = min(o["cosine"] for o in outs.values())
                    if a.get("task"):
                        row["accuracy"] = a["task"]["accuracy"]
                build_path = base / "build" / backend / precision / first / "build.json"
                if build_path.exists():
                    b = read_json(build_path)["result"]
                    row["engine_mib"] = b.get("engine_bytes", 0) / 2**20
                    row["build_s"] = b.get("build_time_s")
                bench_path = base / "bench" / backend / precision / f"{first}.json"
                if bench_path.exists():
                    r = read_json(bench_path)["result"]
                    opt = (r.get("points") or {}).get("opt")
                    if opt:
                        row["p50_ms"] = opt["p50_ms"]
                        base_opt = (baseline.get("points") or {}).get("opt")
                        if base_opt:
                            row["speedup"] = base_opt["p50_ms"] / opt["p50_ms"]
                    elif r.get("reason"):
                        row["bench"] = r["reason"]
                rows.append(row)
    skipped = {b: v["line"] for b, v in backends.items() if not v["ok"]}
    return {"rows": rows, "skipped_backends": skipped}


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

    head = "| " + " | ".join(c for c, _ in COLUMNS) + " |"
    lines = ["# engineforge summary", "",
             "Latency: p50 at the first profile's opt shape; speedup vs eager PyTorch on the "
             "same shapes and threads.", "", head, "|" + "---|" * len(COLUMNS)]
    for r in summary["rows"]:
        cells = []
        for col, spec in COLUMNS:
            v = r.get(col)
            if col == "audit" and isinstance(v, str) and v.startswith("not runnable"):
                v = note(v)
            elif col == "p50_ms" and v is None and r.get("bench"):
                v = note(r["bench"])
            cells.append(_fmt(v, spec) if spec else _fmt(v))
        lines.append("| " + " | ".join(cells) + " |")
    if notes:
        lines += ["", "Notes:"] + [f"{i}. {n}" for i, n in enumerate(notes, 1)]
    if summary["skipped_backends"]:
        lines += ["", "Skipped backends:"]
        lines += [f"- {line}" for line in summary["skipped_backends"].values()]
    return "\n".join(lines) + "\n"


def write(artifacts: Path, models: dict, backends: dict, md_out: Path, json_out: Path) -> str:
    summary = collect(Path(artifacts), models, backends)
    write_json(json_out, summary)
    text = markdown(summary)
    with atomic_path(md_out) as tmp:
        tmp.write_text(text)
    return text
