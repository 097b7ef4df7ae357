"""Stage 4b — localisation: where a failing variant's drift enters (engineforge/localise.py).

One job per non-fp32 variant. It reads the variant's audits by the backends that build
from its ONNX (``precision/<variant>/model.onnx``, graph mode): when every measured verdict
passes it records ``status: passes`` and runs nothing; when none measured it (not runnable
anywhere, emulation stopped) ``not_localisable``; when one fails (an emulated audit counts
where the runtime could not run the variant) it compares every node output of the variant
with the fp32 (simplified) graph on the audit inputs (reference.npz), in bounded passes,
and ranks the nodes. The failures that triggered it are kept in the result (``audits``,
``trigger``). A variant only an emulated audit measured is localised on the ONNX reference
evaluator too, within ``time_limits.emulated_audit`` (past it: ``not_localisable``).
"""

from __future__ import annotations

import contextlib

from engineforge import modelio
from engineforge.results import AuditResult, Localisation, Measurement
from engineforge.settings import LocaliseSettings, Section
from engineforge.sidecar import read_json
from engineforge.stages.audit import CONSTANT_REFERENCE

TOOLS = ("onnx", "onnxruntime-gpu", "onnxruntime")
LIKELY_FIX = ("the variant or the fp32 ONNX cannot be run node by node on ONNX Runtime CPU; "
              "raise models.<model>.time_limits.localise for a slow emulated variant")


class Settings(Section):
    precision: str                 # the variant
    localise: LocaliseSettings
    batch: int = 1                 # samples per pass (the audit's batch)


def settings(m: dict, w: dict) -> Settings:
    first = next(iter(m["profiles"].values()))
    return Settings(precision=w["precision"], localise=m["localise"],
                    batch=modelio.batch_size(m["inputs"], first, m["audit"]["samples"]))


def verdicts(audit_paths) -> tuple[dict[str, str], list[str]]:
    """backend -> the verdict that counts (the emulated one where the runtime could not
    run the variant), and one line per failure."""
    audits, trigger = {}, []
    for path in audit_paths:
        r = AuditResult.model_validate(read_json(path)["result"])
        m: Measurement = r
        label = r.backend
        if r.status == "not_runnable" and r.emulated and r.emulated.status != "not_runnable":
            m, label = r.emulated, f"{r.backend} (emulated)"
        audits[label] = m.status
        if m.status == "fail":
            trigger += [f"{label}: {f}" for f in m.failures] or [f"{label}: {m.reason}"]
    return audits, trigger


def run(job) -> Localisation:
    from engineforge.backends import onnx_reference
    from engineforge.localise import localise

    s: Settings = job.settings
    audits, trigger = verdicts(job.extra_inputs)
    if "pass" in audits.values() and not trigger:
        return Localisation(status="passes", precision=s.precision, audits=audits)
    if not audits:
        return Localisation(status="not_localisable", precision=s.precision, audits=audits,
                            reason="no backend that runs the ONNX variant audited it "
                                   "(localisation compares ONNX graphs; backends that build "
                                   "from PyTorch, such as torch-inductor, are not covered)")
    if not trigger:
        return Localisation(status="not_localisable", precision=s.precision, audits=audits,
                            reason="no audit measured this variant "
                                   f"({', '.join(sorted(audits))})")
    if any(CONSTANT_REFERENCE in t for t in trigger):
        return Localisation(status="not_localisable", precision=s.precision, audits=audits,
                            trigger=trigger, reason=f"{CONSTANT_REFERENCE}: no variant's "
                            "drift can be measured, so none can be localised")
    feed = {k[3:]: v for k, v in modelio.load_npz(job.inputs["reference"]).items()
            if k.startswith("in:")}
    limit = job.limits.get("emulated_audit", 300)
    emulated = any(v == "fail" and "(emulated)" in k for k, v in audits.items())
    try:
        with onnx_reference.time_limit(limit) if emulated else contextlib.nullcontext():
            loc = localise(job.inputs["fp32"], job.inputs["variant"], feed, batch=s.batch,
                           **s.localise.model_dump())
    except onnx_reference.Stopped:
        return Localisation(status="not_localisable", precision=s.precision, audits=audits,
                            trigger=trigger, reason=(
                                f"emulation stopped after {limit:g} s (models.{job.model}."
                                "time_limits.emulated_audit): ONNX's reference evaluator is "
                                "pure Python; raise the limit to localise it"))
    return loc.model_copy(update={"precision": s.precision, "audits": audits,
                                  "trigger": trigger})
