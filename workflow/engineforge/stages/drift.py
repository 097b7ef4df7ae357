"""Report — the drift matrix of one model: rows precision × backend (every audited variant,
emulated rows included), columns the headline metrics of the worst output and the number of
samples compared. JSON + Markdown; a failed or not-runnable row says why (a numbered note)."""

from __future__ import annotations

import math

from engineforge.backends import names as backend_names
from engineforge.backends import onnx_reference
from engineforge.results import AuditResult
from engineforge.settings import VARIANTS
from engineforge.sidecar import read_json, write_json

ISOLATED = False
TOOLS = ()
REFERENCE = "pytorch"
HEADLINE = ("status", "max_abs", "p99_abs", "mean_rel", "cosine", "snr_db", "top1_agreement",
            "top5_agreement", "accuracy", "accuracy_drop", "samples")
EMULATED = f"{onnx_reference.NAME} (emulated)"


def settings(m: dict, w: dict):
    return None


def _worst(pick, values: list[float]) -> float:
    """The worst of ``values`` (``max`` or ``min``); a value that is not finite wins
    (Python's max/min are order-dependent with NaN)."""
    bad = [v for v in values if not math.isfinite(v)]
    return bad[0] if bad else pick(values)


def rows_of(audits) -> list[dict]:
    """One row per audited variant (emulated audits as rows of their own), sorted by
    backend (registry order, emulated after the first) then precision."""
    results = []
    for path in audits:
        r = AuditResult.model_validate(read_json(path)["result"])
        results.append((r.backend, r.precision, r))
        if r.emulated:
            results.append((EMULATED, r.precision, r.emulated))
    rows = []
    for backend, precision, r in results:
        row = {"precision": precision, "backend": backend, "status": r.status,
               "reason": r.reason or ("; ".join(r.failures) if r.failures else None),
               "samples": r.samples}
        outs = r.outputs
        if outs:
            row["max_abs"] = _worst(max, [o.max_abs for o in outs.values()])
            row["p99_abs"] = _worst(max, [o.p99_abs for o in outs.values()])
            row["mean_rel"] = _worst(max, [o.mean_rel for o in outs.values()])
            row["cosine"] = _worst(min, [o.cosine for o in outs.values()])
            if all(o.snr_db is not None for o in outs.values()):
                row["snr_db"] = _worst(min, [o.snr_db for o in outs.values()])
            for key in ("top1_agreement", "top5_agreement"):
                if all(getattr(o, key) is not None for o in outs.values()):
                    row[key] = _worst(min, [getattr(o, key) for o in outs.values()])
        if r.task:
            row["accuracy"] = r.task.accuracy
            row["reference_accuracy"] = r.task.reference_accuracy
            row["accuracy_drop"] = r.task.accuracy_drop
        rows.append(row)
    names = backend_names()
    order = names[:1] + [EMULATED] + names[1:]
    rows.sort(key=lambda r: (order.index(r["backend"]) if r["backend"] in order else 99,
                             VARIANTS.index(r["precision"]) if r["precision"] in VARIANTS
                             else 99))
    return rows


def markdown(model: str, rows: list[dict]) -> str:
    notes: list[str] = []
    lines = [f"# Drift matrix — {model} (reference: PyTorch fp32)", "",
             "| precision | backend | " + " | ".join(HEADLINE) + " |",
             "|---|---|" + "---|" * len(HEADLINE)]
    for r in rows:
        cells = []
        for key in HEADLINE:
            v = r.get(key)
            if key == "status" and r.get("reason"):
                notes += [r["reason"]] if r["reason"] not in notes else []
                label = "not runnable" if v == "not_runnable" else v
                v = f"{label} [{notes.index(r['reason']) + 1}]"
            spec = ".6f" if key == "cosine" else ".4g"
            cells.append("—" if v is None else format(v, spec) if isinstance(v, float)
                         else str(v))
        lines.append(f"| {r['precision']} | {r['backend']} | " + " | ".join(cells) + " |")
    lines += [""] + [f"{i}. {n}" for i, n in enumerate(notes, 1)] if notes else []
    return "\n".join(lines) + "\n"


def run(job) -> None:
    rows = rows_of(job.extra_inputs)
    write_json(job.outputs["json"], {"model": job.model, "reference": REFERENCE, "rows": rows})
    job.outputs["md"].write_text(markdown(job.model, rows))
