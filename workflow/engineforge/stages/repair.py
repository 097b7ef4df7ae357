"""Stage 3b — repair: the ``<p>-repaired`` variant keeps the localised nodes in high precision.

Reads the plain variant's localisation (``audit/localise/<p>.json``). A variant that passes
its audits is its own repair (``not_needed``: the plain ONNX, copied); one no audit could
measure stays as it is (``unrepaired``). Otherwise, after a round 0 that audits the plain
variant in-process (the metrics before), round by round (at most ``repair.max_rounds``): the
next ``repair.nodes_per_round`` nodes of the localisation (``first``, then ``worst`` nodes
over the drop threshold; a node already kept in high precision that still ranks passes the
blame to the nodes producing its inputs: an exact subtraction of rounded operands, e.g.)
join ``nodes_to_exclude``; the variant is re-made from the fp32 ONNX by the precision
stage's own code (AutoCast for fp16/bf16, ModelOpt Q/DQ for int8/fp8), re-audited in-process
against the PyTorch reference (``audit.compare`` / ``audit.verdict`` with the precision's
tolerances, on ONNX Runtime CPU, or the ONNX reference evaluator where ORT has no kernel)
and re-localised. The first passing round is ``repaired``; no pass within the bound leaves
the last round's variant, ``unrepaired`` (its audit then fails honestly). ``extra.repair``
records every round.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from engineforge import modelio
from engineforge.results import Localisation, PrecisionResult
from engineforge.settings import (
    QUANTIZED,
    AutocastSettings,
    LocaliseSettings,
    QuantizeSettings,
    RepairSettings,
    Section,
    Tolerance,
    base_precision,
    repair_settings,
)
from engineforge.sidecar import read_json, scratch_prefix
from engineforge.stages import precision as efprecision

TOOLS = efprecision.TOOLS + ("polygraphy",)
LIKELY_FIX = ("ModelOpt could not re-make the variant with the localised nodes excluded: "
              "lower models.<model>.repair.nodes_per_round, or drop the precision from "
              "models.<model>.repair.precisions")


class Settings(Section):
    precision: str                 # the repaired variant, e.g. fp16-repaired
    base: str                      # its precision, e.g. fp16
    method: AutocastSettings | QuantizeSettings
    inputs: dict
    task: str
    tolerance: Tolerance
    batch: int = 1
    repair: RepairSettings
    localise: LocaliseSettings


def settings(m: dict, w: dict) -> Settings:
    from engineforge.stages import localise

    base = base_precision(w["precision"])
    plain = efprecision.settings(m, {"precision": base})
    return Settings(precision=w["precision"], base=base, method=plain.method,
                    inputs=m["inputs"], task=m["task"], tolerance=m["tolerances"][base],
                    batch=localise.settings(m, w).batch, repair=repair_settings(m),
                    localise=m["localise"])


def cache_group(job) -> str:
    return f"precision.{job.precision}"


def candidates(loc: Localisation, excluded: list[str], producers: dict[str, list[str]],
               n: int) -> list[str]:
    """The next ``n`` nodes to keep in high precision: ``first`` then ``worst`` (nodes whose
    drop reaches the localisation's threshold: a node adding 1 dB is not worth its cost); a
    node already excluded hands the blame to the producers of its inputs."""
    ranked = ([loc.first] if loc.first else []) + [
        d for d in loc.worst if d.drop_db >= loc.drop_threshold_db]
    out: list[str] = []
    for d in ranked:
        for name in ([d.node] if d.node not in excluded else producers.get(d.node, [])):
            if name and name not in excluded and name not in out:  # (unnamed: no pattern)
                out.append(name)
    return out[:n]


def _producers(fp32_path: Path) -> dict[str, list[str]]:
    """node -> the nodes computing its (non-constant) inputs, in the fp32 graph."""
    import onnx

    graph = onnx.load(str(fp32_path), load_external_data=False).graph
    made = {o: n for n in graph.node for o in n.output}
    return {n.name: [made[i].name for i in n.input if i in made
                     and made[i].op_type not in ("Constant", "Shape")] for n in graph.node}


class Stopped(Exception):
    """An emulated check or localisation ran past ``time_limits.emulated_audit``."""


def check(job, path: Path, feed: dict, ref_out: dict) -> dict:
    """The audit's verdict of the ONNX at ``path`` against the reference outputs, in
    process: ONNX Runtime CPU (the onnxruntime backend's optimization level), else the ONNX
    reference evaluator. {passed, runtime, metrics (per output), failures}."""
    from polygraphy.backend.onnxrt import OnnxrtRunner

    from engineforge.backends import onnx_reference
    from engineforge.backends.onnxruntime import session
    from engineforge.stages import audit

    s: Settings = job.settings
    runtime = "onnxruntime-cpu"
    try:
        cpu = OnnxrtRunner(lambda: session(path, optimize=True, use=["CPUExecutionProvider"]))
        produced = audit.infer_all(cpu, feed, s.batch, job.model, path)
    except audit.NotRunnable as err:
        if not onnx_reference.usable(path):
            return {"passed": False, "runtime": None, "metrics": {},
                    "failures": [f"not runnable on ONNX Runtime CPU: {err}"]}
        runtime = onnx_reference.NAME
        limit = job.limits.get("emulated_audit", 300)
        try:
            with onnx_reference.time_limit(limit):
                produced = audit.infer_all(onnx_reference.OnnxReferenceRunner(path), feed,
                                           s.batch, job.model, path)
        except onnx_reference.Stopped:
            raise Stopped(f"emulation stopped after {limit:g} s (models.{job.model}."
                          "time_limits.emulated_audit)") from None
    outputs, failures = audit.compare(ref_out, produced, s.task)
    failures = audit.non_finite(produced, "variant", ref_out) + failures
    failures += audit.verdict({"outputs": outputs}, s.tolerance, s.task)[1]
    metrics = {name: {k: o[k] for k in ("cosine", "snr_db", "max_abs")}
               for name, o in outputs.items()}
    return {"passed": not failures, "runtime": runtime, "metrics": metrics,
            "failures": failures}


def remake(job, excluded: list[str], out: Path) -> PrecisionResult:
    """The plain variant's precision job, re-run with ``excluded`` added to its
    ``nodes_to_exclude`` (exact-name patterns: ModelOpt matches them with ``re.match``)."""
    s: Settings = job.settings
    patterns = list(s.method.nodes_to_exclude) + [f"{re.escape(n)}$" for n in excluded]
    method = s.method.model_copy(update={"nodes_to_exclude": patterns})
    sub = replace(job, stage="precision", wildcards={**job.wildcards, "precision": s.base},
                  settings=efprecision.Settings(precision=s.base, method=method,
                                                inputs=s.inputs if s.base in QUANTIZED
                                                else None),
                  inputs={k: v for k, v in job.inputs.items() if k in ("onnx", "calibration")},
                  outputs={"onnx": out})
    return efprecision.run(sub)


def _copy(src: Path, dst: Path) -> None:
    for rel in efprecision._external_files(src):
        shutil.copyfile(src.parent / rel, dst.parent / rel)
    shutil.copyfile(src, dst)


def _relocalise(job, attempt: Path, feed: dict, emulated: bool) -> Localisation:
    """The attempt's localisation (within ``time_limits.emulated_audit`` when emulated)."""
    from engineforge.backends import onnx_reference
    from engineforge.localise import localise

    s: Settings = job.settings
    limit = job.limits.get("emulated_audit", 300)
    try:
        with onnx_reference.time_limit(limit) if emulated else contextlib.nullcontext():
            return localise(job.inputs["onnx"], attempt, feed, batch=s.batch,
                            **s.localise.model_dump())
    except onnx_reference.Stopped:
        raise Stopped(f"emulated localisation stopped after {limit:g} s (models.{job.model}."
                      "time_limits.emulated_audit)") from None


def _rounds(job, loc: Localisation, repair: dict, kept: dict, scratch: Path, feed: dict,
            ref_out: dict) -> None:
    """Round 0 (the plain variant's metrics), then exclude, re-make, check, re-localise until
    a round passes or ``max_rounds``. Fills ``repair``; ``kept``: the last variant made
    (``onnx``) and its PrecisionResult (``made``), also when a round is stopped."""
    s: Settings = job.settings
    repair["status"] = "unrepaired"
    before = check(job, job.inputs["variant"], feed, ref_out)
    repair["rounds"].append({"round": 0, "excluded": [], **before})
    producers = _producers(job.inputs["onnx"])
    excluded: list[str] = []
    for r in range(1, s.repair.max_rounds + 1):
        new = candidates(loc, excluded, producers, s.repair.nodes_per_round)
        if not new:
            repair["reason"] = f"round {r}: no further node to exclude"
            break
        excluded += new
        attempt = scratch / f"round{r}" / "model.onnx"
        attempt.parent.mkdir()
        kept |= {"onnx": attempt, "made": remake(job, excluded, attempt)}
        repair["excluded_nodes"] = list(excluded)
        verdict = check(job, attempt, feed, ref_out)
        repair["rounds"].append({"round": r, "excluded": new, **verdict})
        if verdict["passed"]:
            repair["status"] = "repaired"
            break
        loc = _relocalise(job, attempt, feed, verdict["runtime"] != "onnxruntime-cpu")
        repair["rounds"][-1]["first"] = loc.first and loc.first.node
    else:
        repair["reason"] = ("repair.max_rounds is 0" if s.repair.max_rounds == 0
                            else f"no pass within {s.repair.max_rounds} rounds")


def run(job) -> PrecisionResult:
    s: Settings = job.settings
    t0 = time.perf_counter()
    loc = Localisation.model_validate(read_json(job.inputs["localise"])["result"])
    plain, out = job.inputs["variant"], job.outputs["onnx"]
    repair = {"status": "not_needed", "from": s.base, "excluded_nodes": [], "rounds": [],
              "localisation": loc.status}
    kept = {"onnx": plain, "made": None}
    scratch = Path(tempfile.mkdtemp(prefix=scratch_prefix(), dir=out.parent.parent))
    try:
        if loc.status == "not_localisable":
            repair |= {"status": "unrepaired", "reason": f"not localisable: {loc.reason}"}
        elif loc.status != "passes":
            ref = modelio.load_npz(job.inputs["reference"])
            feed = {k[3:]: v for k, v in ref.items() if k.startswith("in:")}
            ref_out = {k[4:]: v for k, v in ref.items() if k.startswith("out:")}
            try:
                _rounds(job, loc, repair, kept, scratch, feed, ref_out)
            except Stopped as err:  # an emulated check or localisation ran too long
                repair["reason"] = str(err)
        _copy(kept["onnx"], out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    summary = efprecision._summary(out)
    files = [out] + [out.parent / rel for rel in efprecision._external_files(out)]
    extra = dict(kept["made"].extra) if kept["made"] else {}
    return PrecisionResult(precision=s.precision, method=efprecision.METHODS[s.base],
                           time_s=round(time.perf_counter() - t0, 3),
                           bytes=sum(f.stat().st_size for f in files), **summary,
                           extra=extra | {"repair": repair})
